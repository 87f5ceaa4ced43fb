"""The SD 1.x and SD 2.x (512 and 768-v) families: everything about them the rest of the code asks through the seam.

SD 1.x: CLIP ViT-L/14 text encoder (`cond_stage_model.transformer.*` in single files), 768-wide cross-attention.
SD 2.x: OpenCLIP ViT-H/14 (`cond_stage_model.model.*`), 1024-wide cross-attention, linear attention projections,
a tokenizer that pads with "!"; 2.x-v models predict velocity (the prediction type stays a separate flag, as in
sd-scripts: `--v_parameterization`). Their internals live beside this module: `ldm_convert` (single-file <->
diffusers layouts), `ldm_configs` (configs from tensor shapes), `tokenizer` (the bundled CLIP tokenizer) and `tiny`
(built-in tiny models).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from library.errors import UserError
from library.models import ldm_convert as lc
from library.models.components import Components
from library.models.family import AdapterTargets, ModelFamily, register
from library.models.ldm_configs import infer_text_config, infer_unet_config, infer_vae_config
from library.models.tokenizer import load_tokenizer

CLIP_ADAPTER_CLASSES = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")
SD_UNET_TARGETS = AdapterTargets("lora_unet", ("Transformer2DModel",),
                                 ("ResnetBlock2D", "Downsample2D", "Upsample2D"))


@dataclass(frozen=True, eq=False)
class StableDiffusion(ModelFamily):
    v2: bool = False
    script_options = {"db": ("learning_rate_te", "stop_text_encoder_training", "no_token_padding")}  # train_db.py's own
    script_options_hint = {"learning_rate_te1": "use --learning_rate_te", "learning_rate_te2": "use --learning_rate_te"}

    # ------------------------------------------------------------------ detection
    def recognises(self, shapes: Mapping[str, torch.Tensor]) -> bool:
        keys = [k for k in shapes if isinstance(k, str)]
        if not any(k.startswith(lc.UNET_PREFIX) for k in keys) or any(k.startswith("conditioner.") for k in keys):
            return False
        return _is_v2(shapes) == self.v2

    def claims_folder(self, model_index: Mapping[str, Any]) -> bool:
        # One loader reads both versions' folders and tells them apart by the loaded text encoder: SD 1.x claims
        # every Stable Diffusion pipeline folder but SDXL's (and loads what it can, reporting what it cannot).
        return not self.v2 and "XL" not in str(model_index.get("_class_name", ""))

    def requested_by(self, options: Any) -> bool:
        flag = options.get("v2") if isinstance(options, Mapping) else getattr(options, "v2", False)
        return self.v2 and bool(flag)

    def refuse_requested(self, found: ModelFamily, source: str) -> None:
        if found is not self:
            what = " (CLIP ViT-L text encoder)" if found.name == "sd1" else ""
            raise UserError(f"{source}: --v2 was given but this is an {found.label} model{what}; drop --v2")

    def file_notes(self, shapes: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        encoder = ("OpenCLIP text encoder (cond_stage_model.model.*)" if lc.has_openclip(shapes)
                   else "CLIP text encoder (cond_stage_model.transformer.*)")
        notes = ["v-prediction or not is not in the weights (pass --v_parameterization for a 768-v model)"]
        return [encoder], notes if self.v2 else []

    # ------------------------------------------------------------------ loading
    def load_single_file(self, file, source: str, tokenizer: str | None, dtype: torch.dtype) -> Components:
        from library.models.loading import Prefixed, build_module, build_vae_and_unet, main_dtype, stream

        meta = file.meta
        extras: dict[str, torch.Tensor] = {}
        if lc.has_openclip(meta):
            used, extra_meta = lc.split_openclip(lc.strip_prefix(meta, lc.OPENCLIP_PREFIX))
            te_source, te_convert = Prefixed(used, lc.OPENCLIP_PREFIX), lc.openclip_to_transformers
            extras = {k: file.load(lc.OPENCLIP_PREFIX + k).clone() for k in extra_meta}
        else:
            te_source = Prefixed(lc.strip_prefix(meta, lc.CLIP_PREFIX), lc.CLIP_PREFIX)
            te_convert = lc.clip_to_transformers
        unet_ldm = lc.strip_prefix(meta, lc.UNET_PREFIX)
        vae_ldm = lc.strip_prefix(meta, lc.VAE_PREFIX)
        unet_cfg = infer_unet_config(unet_ldm, v2=self.v2, source=source)
        vae_cfg = infer_vae_config(vae_ldm, source=source, scaling_factor=self.latent_scale)
        text_cfg = CLIPTextConfig(**infer_text_config(te_convert(te_source.stripped), v2=self.v2, source=source))
        # Every module streams, one source tensor at a time (OpenCLIP's fused q/k/v are split as views).
        text_encoder = build_module(CLIPTextModel, text_cfg, stream(file, te_source, te_convert, dtype), source,
                                    "text encoder", dtype)
        vae, unet = build_vae_and_unet(file, vae_ldm, vae_cfg, unet_ldm, unet_cfg, source, dtype)
        return Components(
            unet=unet, vae=vae, text_encoders=(text_encoder,), tokenizers=(load_tokenizer(self.v2, tokenizer),),
            family=self, v_parameterization=False, source=source, source_dtype=main_dtype(unet_ldm),
            text_encoder_extras=extras,
        )

    def load_diffusers(self, source: str, tokenizer: str | None, *, local: bool) -> Components:
        from library.models.loading import load_diffusers_parts, prediction_type, stored_unet_dtype

        root = Path(source)
        loaded = load_diffusers_parts(
            source, {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}, local=local,
            hint="for offline use pass a local file or folder")
        unet, vae, text_encoder = loaded["unet"], loaded["vae"], loaded["text_encoder"]
        te_cfg = text_encoder.config
        v2 = te_cfg.hidden_act == "gelu" or te_cfg.hidden_size == 1024 or unet.config.cross_attention_dim == 1024
        tok_source = tokenizer or (str(root) if local and (root / "tokenizer").is_dir() else None)
        return Components(
            unet=unet, vae=vae, text_encoders=(text_encoder,), tokenizers=(load_tokenizer(v2, tok_source),),
            family=SD2 if v2 else SD1,
            v_parameterization=prediction_type(source, local=local) == "v_prediction",
            source=source, source_dtype=stored_unet_dtype(source, unet.dtype) if local else unet.dtype,
        )

    def after_load(self, parts: Components) -> None:
        if self.v2 and parts.v_parameterization:
            parts.unet.register_to_config(sample_size=96)  # 768-v models generate at 768 px (96 latent px)

    @property
    def tiny_models(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("tiny-sd2",) if self.v2 else ("tiny-sd1",)

    def build_tiny(self, name: str, *, seed: int = 0, tokenizer=None) -> Components:
        from library.models.tiny import build_tiny_sd

        if tokenizer is None or isinstance(tokenizer, str):
            tokenizer = load_tokenizer(self.v2, tokenizer)
        return build_tiny_sd(self, v2=self.v2, seed=seed, tokenizer=tokenizer)

    # ------------------------------------------------------------------ saving
    def single_file_state_dict(self, parts: Components) -> dict[str, torch.Tensor]:
        sd = lc.add_prefix(lc.unet_to_ldm(parts.unet.state_dict(), parts.unet.config), lc.UNET_PREFIX)
        sd |= lc.add_prefix(lc.vae_to_ldm(parts.vae.state_dict(), parts.vae.config), lc.VAE_PREFIX)
        te = parts.text_encoder.state_dict()
        if self.v2:
            sd |= lc.add_prefix(lc.openclip_to_ldm(te, parts.text_encoder_extras), lc.OPENCLIP_PREFIX)
        else:
            sd |= lc.add_prefix(lc.clip_to_ldm(te), lc.CLIP_PREFIX)
        return sd

    def save_diffusers(self, parts: Components, folder: Path) -> None:
        from diffusers import PNDMScheduler, StableDiffusionPipeline

        from library.models.saving import respell_text_encoder

        scheduler = PNDMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
            skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
            prediction_type="v_prediction" if parts.v_parameterization else "epsilon",
        )
        pipe = StableDiffusionPipeline(
            vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.save_pretrained(folder, safe_serialization=True)
        respell_text_encoder(folder / "text_encoder")

    # ------------------------------------------------------------------ text
    def prompt_encoder(self, parts: Components, *, clip_skip: int | None, max_token_length: int | None,
                       weighted: bool = False):
        from library.training.text_encoding import PromptEncoder

        return PromptEncoder(parts.tokenizer, parts.text_encoder, clip_skip=clip_skip,
                             max_token_length=max_token_length, source=parts.source, weighted=weighted)

    def embedding_keys(self) -> tuple[str, ...]:
        return ("emb_params",)

    # ------------------------------------------------------------------ sampling and metadata
    def pipeline(self, parts: Components, img2img: bool = False):
        from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

        cls = StableDiffusionImg2ImgPipeline if img2img else StableDiffusionPipeline
        pipe = cls(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
                   scheduler=None, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def ss_keys(self, v_parameterization: bool) -> dict[str, Any]:
        """model_util.get_model_version_str_for_sd1_sd2: sd_v1, sd_v2, sd_v2_v (and sd_v1_v)."""
        version = ("sd_v2" if self.v2 else "sd_v1") + ("_v" if v_parameterization else "")
        return {"ss_v2": self.v2, "ss_base_model_version": version}

    def modelspec_architecture(self, v_parameterization: bool, suffix: str | None = None) -> str:
        """`stable-diffusion-v1`, `stable-diffusion-v2-512` or `stable-diffusion-v2-768-v`, plus `/lora` etc."""
        if self.v2:
            arch = "stable-diffusion-v2-768-v" if v_parameterization else "stable-diffusion-v2-512"
        else:
            arch = "stable-diffusion-v1"
        return f"{arch}/{suffix}" if suffix else arch

    def default_resolution(self, v_parameterization: bool) -> int:
        return 768 if self.v2 and v_parameterization else 512

    def text_cache_widths(self) -> tuple[int, int]:
        return (1024 if self.v2 else 768), 0  # OpenCLIP ViT-H's / CLIP ViT-L's hidden states; no pooled output


def _is_v2(shapes: Mapping[str, torch.Tensor]) -> bool:
    """SD 2.x: OpenCLIP text encoder, or 1024-wide cross-attention (some converters store SD 2.x with a HF-layout
    CLIP)."""
    if lc.has_openclip(shapes):
        return True
    key = next((k for k in shapes if isinstance(k, str) and k.startswith(lc.UNET_PREFIX)
                and k.endswith("attn2.to_k.weight")), None)
    return key is not None and shapes[key].shape[1] == 1024


# sd-scripts' NetworkTrainer.vae_scale_factor for SD 1.x/2.x (also their VAE config's scaling_factor).
LATENT_SCALE = 0.18215
_TEXT = (AdapterTargets("lora_te", CLIP_ADAPTER_CLASSES),)
SD1 = StableDiffusion("sd1", "SD 1.x", "Stable Diffusion 1.x", LATENT_SCALE, SD_UNET_TARGETS, _TEXT, v2=False)
SD2 = StableDiffusion("sd2", "SD 2.x", "Stable Diffusion 2.x", LATENT_SCALE, SD_UNET_TARGETS, _TEXT, v2=True)
register(SD1, SD2)
