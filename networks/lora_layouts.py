"""LoRA/LoCon layouts: sd-scripts' kohya keys <-> the diffusers/peft keys of `load_lora_weights`/`save_lora_weights`."""

from __future__ import annotations

import functools
import re

import torch

from library.errors import UserError
from networks.files import NetworkFileInfo, canonical_key, describe_network_file, refuse_unknown_tensors
from networks.injection import TEXT_ENCODER_PREFIX, UNET_PREFIX, adapter_targets, text_encoder_targets, unet_targets

PEFT_UNET = "unet"
PEFT_TEXT_ENCODER = "text_encoder"
PEFT_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
# Layer and block indices: whole numbers between separators ("attn1", "conv2" keep their digits).
_INDEX = re.compile(r"(?<=[._])\d+(?=[._]|$)")


def kohya_to_peft(sd: dict[str, torch.Tensor], *, source: str = "state dict"
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], NetworkFileInfo]:
    """(UNet, text-encoder) tensors keyed `unet.<path>.lora_A/B.weight`, `text_encoder.text_model.<path>…`.

    peft keeps one lora_alpha per adapter and diffusers' SD loader reads no alphas from a peft file, so each
    module's kohya scale alpha/rank is folded into lora_B: the result is meant for peft alpha = rank (scale 1).
    """
    sd = {canonical_key(k): v for k, v in sd.items()}
    info = describe_network_file(sd, source=source)
    if info.algorithm != "lora":
        raise UserError(f"{source}: a {info.algorithm} network; only LoRA/LoCon (lora_up/lora_down) files have a "
                        "diffusers/peft form")
    _refuse_extras(sd, info, source)
    refuse_unknown_tensors(sd, info, source=source)  # stray keys of no module (bundle_emb.*, …)
    unet_sd, te_sd = {}, {}
    for name, rank in info.dims.items():
        component, path = peft_module_path(name, source=source)
        up = sd.get(f"{name}.lora_up.weight")
        if up is None:
            raise UserError(f"{source}: {name} has lora_down but no lora_up tensor; the file is damaged")
        scale = (info.alphas[name] or rank) / rank  # sd-scripts reads alpha 0 as alpha = rank
        target = unet_sd if component == PEFT_UNET else te_sd
        target[f"{component}.{path}.lora_A.weight"] = sd[f"{name}.lora_down.weight"]
        target[f"{component}.{path}.lora_B.weight"] = (up.float() * scale).to(up.dtype)  # fold in float32
    return unet_sd, te_sd, info


def _refuse_extras(sd, info, source) -> None:
    """Tensors beyond up/down/alpha (DoRA's dora_scale, …) change ΔW; dropping them silently would be wrong."""
    for key in sd:
        name, _, rest = key.partition(".")
        if name in info.dims and f".{rest}" not in KOHYA_SUFFIXES:
            raise UserError(f"{source}: {key} is not a plain LoRA tensor (lora_up/lora_down/alpha); "
                            "only plain LoRA/LoCon converts to the diffusers layout")


def peft_to_kohya(unet_sd: dict[str, torch.Tensor], text_encoder_sd: dict[str, torch.Tensor], *,
                  scales: dict[str, float] | None = None, source: str = "state dict") -> dict[str, torch.Tensor]:
    """kohya tensors with alpha = rank; `scales` (peft module key -> lora_alpha/r, default 1) is folded into up."""
    scales = scales or {}
    out = {}
    for component, sd in ((PEFT_UNET, unet_sd), (PEFT_TEXT_ENCODER, text_encoder_sd)):
        for module, (down, up) in _peft_pairs(sd, component, source).items():
            name = kohya_name(component, module, source=source)
            scale = scales.get(f"{component}.{module}", 1.0)
            out[f"{name}.lora_down.weight"] = down
            out[f"{name}.lora_up.weight"] = up if scale == 1.0 else (up.float() * scale).to(up.dtype)
            out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
    return out


def split_peft(sd: dict[str, torch.Tensor], *, source: str = "state dict"
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A diffusers LoRA file's tensors split into its `unet.` and `text_encoder.` parts."""
    parts: dict[str, dict[str, torch.Tensor]] = {PEFT_UNET: {}, PEFT_TEXT_ENCODER: {}}
    for key, value in sd.items():
        component = key.partition(".")[0]
        if component not in parts:
            raise UserError(f"{source}: key {key} belongs to neither `unet.` nor `text_encoder.`; "
                            "is this an SDXL or other non-SD 1.x/2.x LoRA?")
        parts[component][key] = value
    return parts[PEFT_UNET], parts[PEFT_TEXT_ENCODER]


def detect_layout(keys) -> str | None:
    """"kohya", "peft" (diffusers' lora_A/lora_B) or None, from the tensor names."""
    keys = list(keys)
    if any(k.endswith(KOHYA_SUFFIXES[0]) or ".hada_" in k or ".lokr_" in k for k in keys):
        return "kohya"
    if keys and all(k.endswith(PEFT_SUFFIXES) for k in keys):
        return "peft"
    return None


def peft_module_path(kohya: str, *, source: str = "state dict") -> tuple[str, str]:
    """(component, module path as diffusers' files spell it) of a kohya module name."""
    for prefix, component in ((UNET_PREFIX, PEFT_UNET), (TEXT_ENCODER_PREFIX, PEFT_TEXT_ENCODER)):
        body = kohya.removeprefix(prefix + "_")
        template = _kohya_templates()[component].get(_INDEX.sub("#", body)) if body != kohya else None
        if template is not None:
            return component, template.format(*_INDEX.findall(body))
    raise UserError(f"{source}: {kohya} is not a module an SD 1.x/2.x LoRA/LoCon targets "
                    "(attention, feed-forward, proj, ResNet/sampler convs, CLIP q/k/v/out_proj, fc1/fc2)")


def kohya_name(component: str, path: str, *, source: str = "state dict") -> str:
    """The kohya name of a module path (text-encoder paths with or without transformers 4's `text_model.`)."""
    if component == PEFT_TEXT_ENCODER and not path.startswith("text_model."):
        path = f"text_model.{path}"
    if _INDEX.sub("#", path) not in _path_templates()[component]:
        raise UserError(f"{source}: {component}.{path} is not a module an SD 1.x/2.x LoRA/LoCon targets; "
                        "is this LoRA for another model family?")
    prefix = UNET_PREFIX if component == PEFT_UNET else TEXT_ENCODER_PREFIX
    return f"{prefix}.{path}".replace(".", "_")


def peft_scales(module_keys, config: dict, component: str) -> dict[str, float]:
    """lora_alpha/r per module from a peft LoraConfig dict (r, lora_alpha, rank_pattern, alpha_pattern)."""
    r, alpha = config.get("r", 8), config.get("lora_alpha", config.get("r", 8))
    scales = {}
    for key in module_keys:
        path = key.removeprefix(f"{component}.")
        rank = _pattern_value(path, config.get("rank_pattern") or {}, r)
        scales[key] = _pattern_value(path, config.get("alpha_pattern") or {}, alpha) / rank
    return scales


def _pattern_value(path: str, patterns: dict, default):
    """peft's rank/alpha pattern lookup: a key names a module by its trailing path, or as a regex."""
    for pattern, value in patterns.items():
        if path == pattern or path.endswith(f".{pattern}") or re.fullmatch(pattern, path):
            return value
    return default


def _peft_pairs(sd, component, source) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    pairs = {}
    for key in sd:
        body = key.removeprefix(f"{component}.")
        if not body.endswith(PEFT_SUFFIXES[0]):
            if not body.endswith(PEFT_SUFFIXES[1]):
                raise UserError(f"{source}: {key} is not a lora_A/lora_B weight; only plain LoRA converts to kohya")
            continue
        module = body.removesuffix(PEFT_SUFFIXES[0])
        up = sd.get(key.removesuffix(PEFT_SUFFIXES[0]) + PEFT_SUFFIXES[1])
        if up is None:
            raise UserError(f"{source}: {key} has no matching lora_B weight; the file is damaged")
        pairs[module] = (sd[key], up)
    return pairs


@functools.lru_cache(maxsize=1)
def _kohya_templates() -> dict[str, dict[str, str]]:
    """component -> {kohya name without prefix, indices as '#': module path with indices as '{}'}."""
    out: dict[str, dict[str, str]] = {PEFT_UNET: {}, PEFT_TEXT_ENCODER: {}}
    for component, prefix, path in _target_paths():
        body = f"{prefix}.{path}".replace(".", "_").removeprefix(prefix + "_")
        out[component][_INDEX.sub("#", body)] = _INDEX.sub("{}", path)
    return out


@functools.lru_cache(maxsize=1)
def _path_templates() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {PEFT_UNET: set(), PEFT_TEXT_ENCODER: set()}
    for component, _, path in _target_paths():
        out[component].add(_INDEX.sub("#", path))
    return out


def _target_paths():
    """(component, kohya prefix, module path) of every target injection.py finds in skeleton SD 1.x and 2.x
    models (every block kind once; built on the meta device, so nothing is allocated)."""
    unet_side, (te_side,) = adapter_targets(1)
    for unet, text_encoder in (_skeleton(False), _skeleton(True)):
        paths = {id(m): n for n, m in unet.named_modules()}
        for target in unet_targets(unet, unet_side, include_conv=True):
            yield PEFT_UNET, UNET_PREFIX, paths[id(target.module)]
        paths = {id(m): n if n.startswith("text_model.") else f"text_model.{n}"
                 for n, m in text_encoder.named_modules()}
        for target in text_encoder_targets(text_encoder, te_side):
            yield PEFT_TEXT_ENCODER, TEXT_ENCODER_PREFIX, paths[id(target.module)]


def _skeleton(v2: bool):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from library.models.tiny import tiny_configs

    unet_cfg, _, text_cfg = tiny_configs(v2, latent_scale=1.0)  # the VAE is not built
    with torch.device("meta"):
        return UNet2DConditionModel(**unet_cfg), CLIPTextModel(CLIPTextConfig(**text_cfg))
