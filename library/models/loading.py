"""Load an SD 1.x/2.x model — single file, diffusers folder, hub id or built-in tiny model — into diffusers modules."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from library.errors import UserError
from library.models import ldm_convert as lc
from library.models.checkpoint_io import TensorFile, open_checkpoint, read_state_dict
from library.models.components import Components
from library.models.detect import check_base_model, has_openclip_text_encoder
from library.models.ldm_configs import infer_text_config, infer_unet_config, infer_vae_config
from library.models.tiny import TINY_MODELS, build_tiny
from library.models.tokenizer import load_tokenizer

VAE_TOP_LEVEL = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def load_components(
    source: str,
    *,
    v2: bool = False,
    v_parameterization: bool = False,
    vae: str | None = None,
    tokenizer: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Components:
    """Load a base model. `v2=True` insists on SD 2.x (an SD 1.x file is then an error); otherwise it is detected."""
    source = str(source)
    path = Path(source).expanduser()
    # The same header check the trainers run before the dataset scan: a wrong kind of file fails here, unread.
    check_base_model(source)
    if source in TINY_MODELS:
        parts = build_tiny(source, tokenizer=load_tokenizer(TINY_MODELS[source], tokenizer))
    elif path.is_dir():
        parts = _load_diffusers(str(path), tokenizer, local=True)
    elif path.exists():
        parts = _load_single_file(path, tokenizer, dtype)
    else:  # a hub id: check_base_model refused every other missing path
        parts = _load_diffusers(source, tokenizer, local=False)
    if v2 and not parts.v2:
        raise UserError(f"{source}: --v2 was given but this is an SD 1.x model (CLIP ViT-L text encoder); drop --v2")
    parts.v_parameterization = parts.v_parameterization or v_parameterization
    if parts.v2 and parts.v_parameterization:
        parts.unet.register_to_config(sample_size=96)  # 768-v models generate at 768 px (96 latent px)
    if vae:
        parts.vae = load_vae(vae)
    for module in (parts.unet, parts.vae, parts.text_encoder):
        if module.dtype != dtype:
            module.to(dtype=dtype)
        module.requires_grad_(False).eval()
    return parts


# ---------------------------------------------------------------- single file
#
# The file is read tensor by tensor: names and shapes decide the architecture and configs, the layout conversion runs
# on `meta` tensors to learn which source tensor (or view of one) each module parameter is, then each parameter is
# read, cast to the training dtype and kept, so memory holds the built modules plus one source tensor — never the
# whole file next to its upcast copy.

def _load_single_file(path: Path, tokenizer: str | None, dtype: torch.dtype) -> Components:
    with open_checkpoint(path) as file:
        meta = file.meta
        src = str(path)
        extras: dict[str, torch.Tensor] = {}
        if has_openclip_text_encoder(meta):
            used, extra_meta = lc.split_openclip(lc.strip_prefix(meta, lc.OPENCLIP_PREFIX))
            te_source, te_convert = _Prefixed(used, lc.OPENCLIP_PREFIX), lc.openclip_to_transformers
            extras = {k: file.load(lc.OPENCLIP_PREFIX + k).clone() for k in extra_meta}
        else:
            te_source = _Prefixed(lc.strip_prefix(meta, lc.CLIP_PREFIX), lc.CLIP_PREFIX)
            te_convert = lc.clip_to_transformers
        unet_ldm = lc.strip_prefix(meta, lc.UNET_PREFIX)
        vae_ldm = lc.strip_prefix(meta, lc.VAE_PREFIX)
        # SD 2.x: OpenCLIP text encoder, or 1024-wide cross-attention (some converters store SD 2.x with a HF-layout CLIP).
        v2 = has_openclip_text_encoder(meta) or _cross_attention_width(unet_ldm) == 1024

        unet_cfg = infer_unet_config(unet_ldm, v2=v2, source=src)
        vae_cfg = infer_vae_config(vae_ldm, source=src)
        text_cfg = CLIPTextConfig(**infer_text_config(te_convert(te_source.stripped), v2=v2, source=src))
        # Modules whose conversion copies tensors (OpenCLIP's fused q/k/v) are read whole, so they go first, while
        # the least is held; the UNet, a pure renaming, streams last.
        text_encoder = _build(CLIPTextModel, text_cfg, _stream(file, te_source, te_convert, dtype), src, "text encoder", dtype)
        vae = _build(AutoencoderKL, vae_cfg, _stream(file, _Prefixed(vae_ldm, lc.VAE_PREFIX),
                                                   lambda sd: lc.vae_to_diffusers(sd, vae_cfg), dtype), src, "VAE", dtype)
        unet = _build(UNet2DConditionModel, unet_cfg, _stream(file, _Prefixed(unet_ldm, lc.UNET_PREFIX),
                                                             lambda sd: lc.unet_to_diffusers(sd, unet_cfg), dtype), src, "UNet", dtype)
    return Components(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=load_tokenizer(v2, tokenizer), v2=v2,
        v_parameterization=False, source=src, source_dtype=_main_dtype(unet_ldm), text_encoder_extras=extras,
    )


class _Prefixed:
    """Tensors with their file prefix stripped (what the converters take), remembering the prefix to read them."""

    def __init__(self, stripped: dict[str, torch.Tensor], prefix: str):
        self.stripped, self.prefix = stripped, prefix


def _stream(file: TensorFile, source: _Prefixed, convert, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(module key, tensor) pairs, read one source tensor at a time.

    The converter runs on the meta tensors first: an output that is a source tensor, or a view of one, is read on
    its own; if any output is a computed copy (no lineage to follow), the module's sources are read whole and
    converted for real.
    """
    converted = convert(source.stripped)
    by_id = {id(t): k for k, t in source.stripped.items()}
    plan = {}
    for key, out in converted.items():
        if id(out) in by_id:
            plan[key] = (by_id[id(out)], None)
        elif out._base is not None and id(out._base) in by_id:
            plan[key] = (by_id[id(out._base)], (tuple(out.shape), out.stride(), out.storage_offset()))
        else:
            yield from convert({k: file.load(source.prefix + k, dtype) for k in source.stripped}).items()
            return
    for key, (name, view) in plan.items():
        tensor = file.load(source.prefix + name, dtype)
        yield key, (tensor.as_strided(*view) if view else tensor)


def _cross_attention_width(unet_ldm: dict[str, torch.Tensor]) -> int | None:
    key = next((k for k in unet_ldm if k.endswith("attn2.to_k.weight")), None)
    return unet_ldm[key].shape[1] if key else None


def _main_dtype(sd: dict[str, torch.Tensor]) -> torch.dtype:
    counts = Counter(v.dtype for v in sd.values() if v.is_floating_point())
    return counts.most_common(1)[0][0] if counts else torch.float32


def _build(cls, config, tensors: Iterable[tuple[str, torch.Tensor]], source: str, what: str, dtype: torch.dtype):
    """Instantiate without random init (meta parameters), then take the tensors, cast one by one, as parameters."""
    with init_empty_weights():
        model = cls(config) if not isinstance(config, dict) else cls(**config)
    expected = model.state_dict()
    state_dict = {}
    for key, tensor in tensors:
        target = expected[key].dtype if key in expected and not expected[key].is_floating_point() else dtype
        state_dict[key] = tensor.to(dtype=target).contiguous()
    missing, unexpected = sorted(expected.keys() - state_dict.keys()), sorted(state_dict.keys() - expected.keys())
    if missing or unexpected:
        raise UserError(f"{source}: the {what} tensors do not match an SD 1.x/2.x {what} "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]}); this architecture is not supported")
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model


def _vae_from_ldm(ldm_vae: dict[str, torch.Tensor], source: str, dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    cfg = infer_vae_config(ldm_vae, source=source)
    return _build(AutoencoderKL, cfg, lc.vae_to_diffusers(ldm_vae, cfg).items(), source, "VAE", dtype)


# ---------------------------------------------------------------- diffusers folders and hub ids

def _load_diffusers(source: str, tokenizer: str | None, *, local: bool) -> Components:
    root = Path(source)
    kwargs = {"local_files_only": local}
    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kwargs)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **kwargs)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kwargs)
    except (OSError, ValueError, EnvironmentError) as err:
        where = "folder" if local else "hub id"
        raise UserError(f"{source}: cannot load this diffusers {where} ({_first_line(err)}); "
                        "for offline use pass a local file or folder") from None
    te_cfg = text_encoder.config
    v2 = te_cfg.hidden_act == "gelu" or te_cfg.hidden_size == 1024 or unet.config.cross_attention_dim == 1024
    tok_source = tokenizer or (str(root) if local and (root / "tokenizer").is_dir() else None)
    return Components(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=load_tokenizer(v2, tok_source), v2=v2,
        v_parameterization=_prediction_type(root) == "v_prediction" if local else False,
        source=source, source_dtype=unet.dtype,
    )


def _prediction_type(root: Path) -> str | None:
    config = root / "scheduler" / "scheduler_config.json"
    try:
        return json.loads(config.read_text()).get("prediction_type") if config.is_file() else None
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{config}: unreadable scheduler config ({_first_line(err)})") from None


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ---------------------------------------------------------------- --vae

def load_vae(source: str) -> AutoencoderKL:
    """A VAE from a file (ldm or diffusers layout, or a full checkpoint's VAE) or a diffusers folder."""
    path = Path(source).expanduser()
    if path.is_dir():
        sub = "vae" if (path / "vae" / "config.json").is_file() else None
        if not sub and not (path / "config.json").is_file():
            raise UserError(f"{source}: folder holds no diffusers VAE (no config.json or vae/config.json)")
        try:
            return AutoencoderKL.from_pretrained(str(path), subfolder=sub, local_files_only=True)
        except (OSError, ValueError) as err:
            raise UserError(f"{source}: cannot load this VAE folder ({_first_line(err)})") from None
    sd, _ = read_state_dict(path)
    sd = {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if any(k.startswith(lc.VAE_PREFIX) for k in sd):
        sd = lc.strip_prefix(sd, lc.VAE_PREFIX)
    sd = {k: v for k, v in sd.items() if k.startswith(VAE_TOP_LEVEL)}
    if not sd:
        raise UserError(f"{source}: not a VAE (no encoder/decoder tensors); pass a VAE .safetensors/.ckpt or folder")
    if any(".down_blocks." in k for k in sd):
        sd = lc.vae_to_ldm(sd, _diffusers_vae_layout(sd))
    return _vae_from_ldm(sd, str(path))


def _diffusers_vae_layout(sd: dict[str, torch.Tensor]) -> dict:
    blocks = {int(k.split(".")[2]) for k in sd if k.startswith("encoder.down_blocks.")}
    resnets = {int(k.split(".")[4]) for k in sd if k.startswith("encoder.down_blocks.0.resnets.")}
    return {"block_out_channels": [0] * len(blocks), "layers_per_block": len(resnets)}
