"""The SDXL family (base 1.0 and its fine-tunes): two text encoders, size/crop conditioning, SGM adapter names.

Single files (`shared/reference/sdxl-reference.md` §2.5): the UNet under `model.diffusion_model.` in SGM names (the
SD converters, plus `label_emb` <-> `add_embedding`), TE1 (CLIP ViT-L) in transformers layout under
`conditioner.embedders.0.transformer.`, TE2 (OpenCLIP ViT-bigG) in open_clip layout under
`conditioner.embedders.1.model.` (fused `in_proj_weight`, `text_projection` stored as SGM uses it: `x @ P`), the
VAE under `first_stage_model.`. In memory the modules are diffusers' and transformers': TE2's `text_projection.weight`
is the transpose of the stored `text_projection`, as diffusers, ComfyUI and A1111 (SGM code) read it. sd-scripts
copies it untransposed, so its pooled output differs from every inference tool's; we follow the tools, and a file
round-trips byte for byte either way.

Prompt encoding (§2.2): TE1 `hidden_states[11]` and TE2 `hidden_states[-2]`, both before the final layer norm,
concatenated to the UNet's context; the pooled output is TE2's final-normed state at the first EOS, projected.
`--clip_skip` does not apply. Latent scale 0.13025.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from library.errors import UserError
from library.models import ldm_convert as lc
from library.models.components import Components
from library.models.family import AdapterTargets, ImageConditioning, ModelFamily, TextConditioning, register
from library.models.ldm_configs import NORM_GROUPS, key_indices, heads_for, infer_vae_config, make_vae_config
from library.models.tokenizer import MODEL_MAX_LENGTH, load_tokenizer

TE1_PREFIX = "conditioner.embedders.0.transformer."
TE2_PREFIX = "conditioner.embedders.1.model."
REFINER_PREFIX = "conditioner.embedders.0.model."  # the refiner has only OpenCLIP bigG, as embedder 0
LATENT_SCALE = 0.13025  # sd-scripts' sdxl_model_util.VAE_SCALE_FACTOR
TE1_LAYER = 11  # sd-scripts reads TE1's hidden_states[11] whatever the layer count
TIME_EMBED_DIM = 256  # per size value (sd-scripts' get_size_embeddings; diffusers' addition_time_embed_dim)
SIZE_VALUES = 6  # original (h, w), crop (top, left), target (h, w)


def _sgm_paths(unet: torch.nn.Module):
    config = dict(unet.config)
    return lambda path: lc.unet_path_to_ldm(path, config)


CLIP_CLASSES = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")
UNET_TARGETS = AdapterTargets("lora_unet", ("Transformer2DModel",), ("ResnetBlock2D", "Downsample2D", "Upsample2D"),
                              path_map=_sgm_paths, blocks="sdxl")
TEXT_TARGETS = (AdapterTargets("lora_te1", CLIP_CLASSES), AdapterTargets("lora_te2", CLIP_CLASSES))


@dataclass(frozen=True, eq=False)
class StableDiffusionXL(ModelFamily):
    lora_modelspec_implementation = "https://github.com/Stability-AI/generative-models"
    latent_cache_suffix = "_sdxl.npz"
    scripts = {"network": "sdxl_train_network.py", "db": "sdxl_train.py", "ti": "sdxl_train_textual_inversion.py"}
    script_options = {"db": ("learning_rate_te1", "learning_rate_te2", "block_lr", "diffusers_xformers",
                             "fused_optimizer_groups")}  # sdxl_train.py's own
    script_options_hint = {"learning_rate_te": "use --learning_rate_te1 / --learning_rate_te2",
                           "stop_text_encoder_training": "the text encoders train with --train_text_encoder, for the "
                           "whole run"}
    bucket_step = 32

    # ------------------------------------------------------------------ detection
    def recognises(self, shapes: Mapping[str, torch.Tensor]) -> bool:
        keys = [k for k in shapes if isinstance(k, str)]
        return any(k.startswith(TE2_PREFIX) for k in keys) and any(k.startswith(lc.UNET_PREFIX) for k in keys)

    def claims_folder(self, model_index: Mapping[str, Any]) -> bool:
        return "XL" in str(model_index.get("_class_name", ""))

    def file_notes(self, shapes: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        return ["CLIP ViT-L (conditioner.embedders.0) + OpenCLIP bigG (conditioner.embedders.1) text encoders"], []

    def option_problems(self, options: Any, bucket_steps: Sequence[int]) -> list[str]:
        problems = super().option_problems(options, bucket_steps)
        if options.get("v2"):
            problems.append("--v2 cannot be used with SDXL (it insists on an SD 2.x model); drop it")
        return problems

    def full_tune_text_encoders(self, options: Any) -> tuple[float | None, ...]:
        """sdxl_train.py: the text encoders train only with --train_text_encoder, each at --learning_rate_te1/2 (or
        learning_rate); a rate of 0 leaves that one frozen (sd-scripts' sdxl_train.py)."""
        base = options.get("learning_rate")
        rates = [options.get("learning_rate_te1"), options.get("learning_rate_te2")]
        rates = [base if rate is None else rate for rate in rates]
        trained = bool(options.get("train_text_encoder"))
        return tuple(rate if trained and rate != 0 else None for rate in rates)

    def unet_block_of(self, unet: torch.nn.Module) -> Callable[[str], int]:
        """sd-scripts' 23 SDXL blocks (sdxl_train.py --block_lr): 0 time/label embeddings, 1-9 input_blocks 0-8,
        10-12 middle_block 0-2, 13-21 output_blocks 0-8, 22 out (the final norm and conv)."""
        paths = UNET_TARGETS.paths(unet)
        first = {"time_embed": 0, "label_emb": 0, "input_blocks": 1, "middle_block": 10, "output_blocks": 13, "out": 22}

        def block(name: str) -> int:
            head, *rest = paths(name.rpartition(".")[0]).split(".")
            return first[head] + (int(rest[0]) if head in ("input_blocks", "middle_block", "output_blocks") else 0)

        return block

    # ------------------------------------------------------------------ loading
    def load_single_file(self, file, source: str, tokenizer: str | None, dtype: torch.dtype) -> Components:
        from library.models.loading import Prefixed, build_module, build_vae_and_unet, main_dtype, stream

        meta = file.meta
        unet_ldm = lc.strip_prefix(meta, lc.UNET_PREFIX)
        vae_ldm = lc.strip_prefix(meta, lc.VAE_PREFIX)
        te1_ldm = lc.strip_prefix(meta, TE1_PREFIX)
        te2_all = lc.strip_prefix(meta, TE2_PREFIX)
        te2_ldm = {k: v for k, v in te2_all.items() if k != "logit_scale"}
        extras = {"logit_scale": file.load(TE2_PREFIX + "logit_scale").clone()} if "logit_scale" in te2_all else {}
        unet_cfg = infer_unet_config(unet_ldm, source)
        vae_cfg = infer_vae_config(vae_ldm, source=source, scaling_factor=self.latent_scale)
        te1_cfg = _text_config(lc.clip_to_transformers(te1_ldm), source, "text encoder 1", act="quick_gelu")
        te2_cfg = _text_config(_strip_text_model(_openclip_to_transformers(te2_ldm)), source, "text encoder 2",
                               act="gelu")
        te2 = build_module(CLIPTextModelWithProjection, te2_cfg,
                           stream(file, Prefixed(te2_ldm, TE2_PREFIX), _openclip_to_transformers, dtype),
                           source, "text encoder 2", dtype)
        te1 = build_module(CLIPTextModel, te1_cfg, stream(file, Prefixed(te1_ldm, TE1_PREFIX), lc.clip_to_transformers,
                                                          dtype), source, "text encoder 1", dtype)
        vae, unet = build_vae_and_unet(file, vae_ldm, vae_cfg, unet_ldm, unet_cfg, source, dtype)
        # ComfyUI's markers (OneTrainer writes them): an empty `v_pred` tensor for v-prediction, `ztsnr` for
        # zero-terminal-SNR training. sd-scripts writes neither; without them a v-prediction SDXL needs the flag.
        v_pred = "v_pred" in meta
        if v_pred:
            print(f"{source}: has a v_pred key: a v-prediction SDXL model, trained with v-parameterization")
        if "ztsnr" in meta:
            print(f"{source}: has a ztsnr key: trained with zero-terminal SNR; pass --zero_terminal_snr to keep it")
        return Components(unet=unet, vae=vae, text_encoders=(te1, te2), tokenizers=_tokenizers(tokenizer),
                          family=self, v_parameterization=v_pred, source=source, source_dtype=main_dtype(unet_ldm),
                          text_encoder_extras=extras)

    def load_diffusers(self, source: str, tokenizer: str | None, *, local: bool) -> Components:
        from library.models.loading import load_diffusers_parts, prediction_type, stored_unet_dtype

        loaded = load_diffusers_parts(
            source, {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
                     "text_encoder_2": CLIPTextModelWithProjection}, local=local,
            hint="an SDXL refiner (no text_encoder) is not supported: train SDXL base or a fine-tune")
        unet, vae, te1, te2 = (loaded[k] for k in ("unet", "vae", "text_encoder", "text_encoder_2"))
        prediction = prediction_type(source, local=local)
        folder = source if local and tokenizer is None and (Path(source) / "tokenizer_2").is_dir() else tokenizer
        return Components(unet=unet, vae=vae, text_encoders=(te1, te2), tokenizers=_tokenizers(folder),
                          family=self, v_parameterization=prediction == "v_prediction", source=source,
                          source_dtype=stored_unet_dtype(source, unet.dtype) if local else unet.dtype)

    @property
    def tiny_models(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("tiny-sdxl",)

    def build_tiny(self, name: str, *, seed: int = 0, tokenizer=None) -> Components:
        from library.models.tiny import seeded_modules

        unet_cfg, vae_cfg, te1_cfg, te2_cfg = tiny_configs(self.latent_scale)
        modules = seeded_modules(seed, lambda: UNet2DConditionModel(**unet_cfg), lambda: AutoencoderKL(**vae_cfg),
                                 lambda: CLIPTextModel(CLIPTextConfig(**te1_cfg)),
                                 lambda: CLIPTextModelWithProjection(CLIPTextConfig(**te2_cfg)))
        unet, vae, te1, te2 = (m.eval() for m in modules)
        tokenizers = tokenizer if isinstance(tokenizer, tuple) else _tokenizers(tokenizer)
        return Components(unet=unet, vae=vae, text_encoders=(te1, te2), tokenizers=tokenizers, family=self,
                          v_parameterization=False, source=name)

    # ------------------------------------------------------------------ saving
    def single_file_state_dict(self, parts: Components) -> dict[str, torch.Tensor]:
        te1, te2 = parts.text_encoders
        sd = lc.add_prefix(lc.unet_to_ldm(parts.unet.state_dict(), parts.unet.config), lc.UNET_PREFIX)
        sd |= lc.add_prefix(lc.clip_to_ldm(_strip_text_model(te1.state_dict())), TE1_PREFIX)
        sd |= lc.add_prefix(_transformers_to_openclip(te2.state_dict(), parts.text_encoder_extras), TE2_PREFIX)
        sd |= lc.add_prefix(lc.vae_to_ldm(parts.vae.state_dict(), parts.vae.config), lc.VAE_PREFIX)
        if parts.v_parameterization:
            sd["v_pred"] = torch.tensor([])  # ComfyUI's marker: without it ComfyUI samples a v-model as epsilon
        return sd

    def save_diffusers(self, parts: Components, folder: Path) -> None:
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

        from library.models.saving import respell_text_encoder

        scheduler = EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
            steps_offset=1, timestep_spacing="leading",
            prediction_type="v_prediction" if parts.v_parameterization else "epsilon")
        te1, te2 = parts.text_encoders
        tok1, tok2 = parts.tokenizers
        pipe = StableDiffusionXLPipeline(vae=parts.vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1,
                                         tokenizer_2=tok2, unet=parts.unet, scheduler=scheduler)
        pipe.save_pretrained(folder, safe_serialization=True)
        respell_text_encoder(folder / "text_encoder")

    # ------------------------------------------------------------------ text and the UNet call
    def prompt_encoder(self, parts: Components, *, clip_skip: int | None, max_token_length: int | None,
                       weighted: bool = False):
        return SdxlPromptEncoder(parts, clip_skip=clip_skip, max_token_length=max_token_length, weighted=weighted)

    def predict(self, unet: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                text: TextConditioning, images: Sequence[ImageConditioning]) -> torch.Tensor:
        added = {"text_embeds": text.pooled, "time_ids": time_ids(images, noisy_latents.device, text.pooled.dtype)}
        return unet(noisy_latents, timesteps, text.hidden, added_cond_kwargs=added).sample

    text_cache_suffix = "_te_outputs.npz"  # sd-scripts' SdxlTextEncoderOutputsCachingStrategy

    def text_cache_arrays(self, parts: Components, row: TextConditioning) -> dict[str, Any]:
        """sd-scripts' keys: hidden_state1 (T, TE1 width), hidden_state2 (T, TE2 width), pool2 (P,), float32."""
        width = parts.text_encoders[0].config.hidden_size
        hidden = row.hidden.float().cpu()
        return {"hidden_state1": hidden[:, :width].numpy(), "hidden_state2": hidden[:, width:].numpy(),
                "pool2": row.pooled.float().cpu().numpy()}

    def text_cache_row(self, parts: Components, arrays: Mapping[str, Any]) -> TextConditioning | None:
        if not {"hidden_state1", "hidden_state2", "pool2"} <= set(arrays):
            return None
        hidden = torch.cat([torch.from_numpy(arrays["hidden_state1"]), torch.from_numpy(arrays["hidden_state2"])], -1)
        return TextConditioning(hidden, torch.from_numpy(arrays["pool2"]))

    def embedding_keys(self) -> tuple[str, ...]:
        return ("clip_l", "clip_g")

    # ------------------------------------------------------------------ sampling and metadata
    def pipeline(self, parts: Components, img2img: bool = False):
        from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

        cls = StableDiffusionXLImg2ImgPipeline if img2img else StableDiffusionXLPipeline
        te1, te2 = parts.text_encoders
        tok1, tok2 = parts.tokenizers
        pipe = cls(vae=parts.vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2,
                   unet=parts.unet, scheduler=None)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def ss_keys(self, v_parameterization: bool) -> dict[str, Any]:
        return {"ss_v2": False, "ss_base_model_version": "sdxl_base_v1-0"}

    def modelspec_architecture(self, v_parameterization: bool, suffix: str | None = None) -> str:
        arch = "stable-diffusion-xl-v1-base"
        return f"{arch}/{suffix}" if suffix else arch

    def default_resolution(self, v_parameterization: bool) -> int:
        return 1024

    def text_cache_widths(self) -> tuple[int, int]:
        return 768 + 1280, 1280  # both encoders' hidden states side by side; TE2's projected pooled output


# ---------------------------------------------------------------- prompt encoding

class SdxlPromptEncoder:
    """captions -> TextConditioning (context (B, 77|152|227, W1+W2), pooled (B, P)) as sd-scripts' strategy_sdxl."""

    def __init__(self, parts: Components, *, clip_skip: int | None, max_token_length: int | None,
                 source: str | None = None, weighted: bool = False):
        from library.training.text_encoding import chunk_count

        chunk_count(max_token_length)  # bad values fail before training starts
        if clip_skip not in (None, 1, 2):
            print(f"--clip_skip {clip_skip}: ignored for SDXL (sd-scripts too: TE1 layer 11, TE2 the penultimate)")
        self.parts, self.max_token_length = parts, max_token_length
        self.source = source or parts.source
        self.weighted = weighted  # --weighted_captions: both encoders' hidden states weighted, the pooled output not

    def tokenize(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from library.training.text_encoding import tokenize

        unique = list(dict.fromkeys(captions))
        rows = torch.tensor([unique.index(c) for c in captions], dtype=torch.long)
        return tuple(tokenize(tok, unique, max_token_length=self.max_token_length)[rows]
                     for tok in self.parts.tokenizers)

    def conditioning(self, captions: Sequence[str], *, weighted: bool | None = None) -> TextConditioning:
        """`weighted` (default: as constructed) reads the prompt-weight syntax."""
        from library.training.prompt_weights import apply_weights, tokenize_weighted
        from library.training.text_encoding import join_windows

        te1, te2 = self.parts.text_encoders
        weighted = self.weighted if weighted is None else weighted
        if weighted:
            (ids1, weights1), (ids2, weights2) = (
                tokenize_weighted(tok, captions, max_token_length=self.max_token_length)
                for tok in self.parts.tokenizers)
        else:
            ids1, ids2 = self.tokenize(captions)
        b, n = ids1.shape[:2]
        # non_blocking: the host does not wait for the device to take the ids (see text_encoding.encode)
        out1 = te1(ids1.reshape(-1, MODEL_MAX_LENGTH).to(te1.device, non_blocking=True), output_hidden_states=True)
        out2 = te2(ids2.reshape(-1, MODEL_MAX_LENGTH).to(te2.device, non_blocking=True), output_hidden_states=True)
        hidden1 = join_windows(out1.hidden_states[TE1_LAYER].reshape(b, n, MODEL_MAX_LENGTH, -1))
        hidden2 = join_windows(out2.hidden_states[-2].reshape(b, n, MODEL_MAX_LENGTH, -1))
        if weighted:
            hidden1, hidden2 = apply_weights(hidden1, weights1), apply_weights(hidden2, weights2)
        pooled = _pool(te2, out2.last_hidden_state, ids2.reshape(-1, MODEL_MAX_LENGTH),
                       self.parts.tokenizers[1].eos_token_id)[::n]
        return TextConditioning(torch.cat([hidden1, hidden2.to(hidden1.dtype)], dim=-1), pooled)

    def __call__(self, captions: Sequence[str], *, weighted: bool | None = None) -> torch.Tensor:
        return self.conditioning(captions, weighted=weighted).hidden

    def encoder_identity(self) -> str:
        from library.training.text_encoding import CHUNK_TOKENS, chunk_count, weights_fingerprint

        n = chunk_count(self.max_token_length)
        te1, te2 = self.parts.text_encoders
        digest = weights_fingerprint(te1, 8) + weights_fingerprint(te2, 8)
        return ";".join([f"source={self.source}", "family=sdxl", f"weights={digest}",
                         f"max_token_length={n * CHUNK_TOKENS}", f"dtype={str(te1.dtype).removeprefix('torch.')}",
                         *(["weighted=1"] if self.weighted else [])])


def _pool(te2, last_hidden: torch.Tensor, ids: torch.Tensor, eos: int) -> torch.Tensor:
    """sd-scripts' _pool_workaround: the final-normed state at the first EOS (position 0 if none), projected
    (not transformers' argmax pooling, which added textual-inversion tokens with ids above EOS would break)."""
    ids = ids.to(last_hidden.device, non_blocking=True)
    is_eos = ids == eos
    first = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), torch.zeros_like(ids[:, 0]))
    state = last_hidden[torch.arange(len(ids), device=ids.device), first]
    projection = te2.text_projection
    return projection(state.to(projection.weight.dtype))


def time_ids(images: Sequence[ImageConditioning], device, dtype) -> torch.Tensor:
    """(B, 6) [orig_h, orig_w, crop_top, crop_left, target_h, target_w] per image, as integers (sd-scripts)."""
    if not images:
        raise ValueError("SDXL needs each image's size conditioning (Batch.conditioning is empty)")
    rows = [[int(v) for v in (*c.original_size, *c.crop_top_left, *c.target_size)] for c in images]
    # built on the host, then copied without making the host wait (torch.tensor(..., device=) would wait)
    return torch.tensor(rows, dtype=dtype).to(device, non_blocking=True)


# ---------------------------------------------------------------- conversions and configs

def _strip_text_model(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("text_model."): v for k, v in sd.items()}


def _openclip_to_transformers(openclip: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TE2 open_clip tensors (prefix stripped, no logit_scale) -> CLIPTextModelWithProjection keys (its text model
    under `text_model.`), as views of the sources: the fused q/k/v split, `text_projection` transposed."""
    return {k if k == "text_projection.weight" else "text_model." + k: v
            for k, v in lc.openclip_to_transformers(openclip).items()}


def _transformers_to_openclip(te2_sd: Mapping[str, torch.Tensor], extras: Mapping[str, torch.Tensor]):
    """CLIPTextModelWithProjection state dict -> open_clip keys (fused q/k/v, `text_projection` transposed back)."""
    sd = _strip_text_model(te2_sd)
    projection = sd.pop("text_projection.weight")
    return lc.openclip_to_ldm(sd, {"text_projection": projection.T.contiguous(), **extras})


def _text_config(sd: Mapping[str, torch.Tensor], source: str, what: str, *, act: str) -> CLIPTextConfig:
    try:
        tokens = sd["embeddings.token_embedding.weight"]
        width = tokens.shape[1]
        projection = sd.get("text_projection.weight")
        return CLIPTextConfig(**_clip_config(
            vocab=tokens.shape[0], width=width, layers=len(key_indices(sd, r"encoder\.layers\.(\d+)\.")),
            mlp=sd["encoder.layers.0.mlp.fc1.weight"].shape[0], act=act,
            projection=projection.shape[0] if projection is not None else width,
            positions=sd["embeddings.position_embedding.weight"].shape[0]))
    except KeyError as err:
        raise UserError(f"{source}: the {what} tensors do not form a CLIP text model (missing {err})") from None


def _clip_config(*, vocab: int, width: int, layers: int, mlp: int, act: str, projection: int,
                 positions: int = MODEL_MAX_LENGTH) -> dict:
    return {"vocab_size": vocab, "hidden_size": width, "intermediate_size": mlp, "num_hidden_layers": layers,
            "num_attention_heads": heads_for(width), "max_position_embeddings": positions, "hidden_act": act,
            "projection_dim": projection, "layer_norm_eps": 1e-5, "bos_token_id": 49406, "eos_token_id": 49407,
            "pad_token_id": 1}


def unet_config(*, block_out_channels: Sequence[int], transformer_layers: Sequence[int], cross_attention_dim: int,
                pooled_dim: int, in_channels: int = 4, out_channels: int = 4, sample_size: int = 128) -> dict:
    """A diffusers UNet config in SDXL's shape (sd-scripts' DIFFUSERS_SDXL_UNET_CONFIG at full size): three levels,
    no attention at the first, linear projections, "text_time" conditioning of pooled text + 6 size values."""
    return {
        "sample_size": sample_size, "in_channels": in_channels, "out_channels": out_channels,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": list(block_out_channels), "layers_per_block": 2,
        "transformer_layers_per_block": list(transformer_layers),
        "attention_head_dim": [heads_for(c) for c in block_out_channels],
        "cross_attention_dim": cross_attention_dim, "use_linear_projection": True,
        "addition_embed_type": "text_time", "addition_time_embed_dim": TIME_EMBED_DIM,
        "projection_class_embeddings_input_dim": pooled_dim + SIZE_VALUES * TIME_EMBED_DIM,
        "norm_num_groups": NORM_GROUPS, "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0,
        "act_fn": "silu", "center_input_sample": False, "upcast_attention": False,
    }


def infer_unet_config(sd: Mapping[str, torch.Tensor], source: str) -> dict:
    """`sd`: SGM UNet tensors without the `model.diffusion_model.` prefix."""
    try:
        firsts = (1, 4, 7)
        depth = [len(key_indices(sd, rf"input_blocks\.{i}\.1\.transformer_blocks\.(\d+)\.")) or 1 for i in firsts]
        to_k = next(v for k, v in sd.items() if k.endswith("attn2.to_k.weight"))
        return unet_config(
            block_out_channels=[sd[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0] for i in firsts],
            transformer_layers=depth, cross_attention_dim=to_k.shape[1],
            pooled_dim=sd["label_emb.0.0.weight"].shape[1] - SIZE_VALUES * TIME_EMBED_DIM,
            in_channels=sd["input_blocks.0.0.weight"].shape[1], out_channels=sd["out.2.weight"].shape[0])
    except (KeyError, StopIteration) as err:
        raise UserError(f"{source}: the UNet tensors do not form an SDXL UNet (missing {err}); "
                        "this architecture is not supported") from None


def tiny_configs(latent_scale: float) -> tuple[dict, dict, dict, dict]:
    """UNet, VAE, TE1 and TE2 configs of `tiny-sdxl`: SDXL's structure (3 levels, no attention at the first, text_time
    conditioning, TE1 with 12 layers so hidden_states[11] is its penultimate) at widths 32-96."""
    # The two encoders differ in width, as in SDXL (768 / 1280): diffusers' single-file loader tells them apart so.
    te1 = _clip_config(vocab=49408, width=32, layers=12, mlp=64, act="quick_gelu", projection=32)
    te2 = _clip_config(vocab=49408, width=64, layers=2, mlp=128, act="gelu", projection=64)
    unet = unet_config(block_out_channels=[32, 64, 64], transformer_layers=[1, 1, 2], cross_attention_dim=96,
                       pooled_dim=64, sample_size=16)
    vae = make_vae_config(in_channels=3, out_channels=3, block_out_channels=[32, 32, 64, 64], layers_per_block=1,
                          latent_channels=4, scaling_factor=latent_scale)
    return unet, vae, te1, te2


def _tokenizers(source: str | None):
    """TE1: CLIP's tokenizer (pads with EOS); TE2: OpenCLIP bigG's, the same BPE vocabulary padding with "!" (id 0),
    as `laion/CLIP-ViT-bigG-14` and SDXL's tokenizer_2 do. Both bundled: nothing is downloaded."""
    if source is not None and (Path(source) / "tokenizer_2").is_dir():
        folder = Path(source)
        return load_tokenizer(False, str(folder / "tokenizer")), load_tokenizer(True, str(folder / "tokenizer_2"))
    return load_tokenizer(False, source), load_tokenizer(True, source)


SDXL = StableDiffusionXL("sdxl", "SDXL", "Stable Diffusion XL", LATENT_SCALE, UNET_TARGETS, TEXT_TARGETS)
register(SDXL)
