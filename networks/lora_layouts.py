"""LoRA/LoCon layouts: sd-scripts' kohya keys <-> the diffusers/peft keys of `load_lora_weights`/`save_lora_weights`,
for SD 1.x/2.x (`lora_te_`, diffusers UNet names) and SDXL (`lora_te1_`/`lora_te2_`, SGM UNet names)."""

from __future__ import annotations

import functools
import re

import torch

from library.errors import UserError
from networks.files import NetworkFileInfo, canonical_key, describe_network_file, refuse_unknown_tensors
from networks.injection import TEXT_ENCODER_PREFIX, UNET_PREFIX, adapter_targets, text_encoder_targets, unet_targets

PEFT_UNET = "unet"
PEFT_TEXT_ENCODER = "text_encoder"
PEFT_TEXT_ENCODER_2 = "text_encoder_2"  # SDXL's OpenCLIP bigG, kohya `lora_te2_`
PEFT_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
# Layer and block indices: whole numbers between separators ("attn1", "conv2" keep their digits).
_INDEX = re.compile(r"(?<=[._])\d+(?=[._]|$)")
# SDXL: SGM block names (input_blocks_4_1) are not diffusers' (down_blocks.1.attentions.0) with the same numbers, but
# SDXL's block layout is fixed; only the transformer depth and the text-encoder layer count vary between models.
_SDXL_INDEX = re.compile(r"(?:(?<=transformer_blocks_)|(?<=transformer_blocks\.)|(?<=encoder_layers_)|"
                         r"(?<=encoder\.layers\.))\d+(?=[._]|$)")
# kohya prefix -> peft component, per layout: SD 1.x/2.x (one text encoder), SDXL (two).
_COMPONENTS = {False: {UNET_PREFIX: PEFT_UNET, TEXT_ENCODER_PREFIX: PEFT_TEXT_ENCODER},
               True: {UNET_PREFIX: PEFT_UNET, "lora_te1": PEFT_TEXT_ENCODER, "lora_te2": PEFT_TEXT_ENCODER_2}}


def kohya_to_peft(sd: dict[str, torch.Tensor], *, source: str = "state dict"
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], NetworkFileInfo]:
    """(UNet, text-encoder) tensors keyed `unet.<path>.lora_A/B.weight`, `text_encoder.text_model.<path>…` (SDXL:
    also `text_encoder_2.…`; its SGM UNet names become diffusers module paths).

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
    sdxl = is_sdxl_kohya(info.dims)
    for name, rank in info.dims.items():
        component, path = peft_module_path(name, source=source, sdxl=sdxl)
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
                  scales: dict[str, float] | None = None, source: str = "state dict",
                  sdxl: bool | None = None) -> dict[str, torch.Tensor]:
    """kohya tensors with alpha = rank; `scales` (peft module key -> lora_alpha/r, default 1) is folded into up.
    `text_encoder_sd` holds `text_encoder.` (and SDXL's `text_encoder_2.`) keys; `sdxl` None: told from the keys."""
    scales = scales or {}
    sdxl = is_sdxl_peft([*unet_sd, *text_encoder_sd]) if sdxl is None else sdxl
    by_component: dict[str, dict[str, torch.Tensor]] = {PEFT_UNET: unet_sd}
    for key, value in text_encoder_sd.items():
        by_component.setdefault(key.partition(".")[0], {})[key] = value
    out = {}
    for component, sd in by_component.items():
        for module, (down, up) in _peft_pairs(sd, component, source).items():
            name = kohya_name(component, module, source=source, sdxl=sdxl)
            scale = scales.get(f"{component}.{module}", 1.0)
            out[f"{name}.lora_down.weight"] = down
            out[f"{name}.lora_up.weight"] = up if scale == 1.0 else (up.float() * scale).to(up.dtype)
            out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
    return out


def split_peft(sd: dict[str, torch.Tensor], *, source: str = "state dict"
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A diffusers LoRA file's tensors split into its `unet.` and text-encoder (`text_encoder.`, SDXL's
    `text_encoder_2.`) parts."""
    unet, text = {}, {}
    for key, value in sd.items():
        component = key.partition(".")[0]
        if component not in (PEFT_UNET, PEFT_TEXT_ENCODER, PEFT_TEXT_ENCODER_2):
            raise UserError(f"{source}: key {key} belongs to none of `unet.`, `text_encoder.`, `text_encoder_2.`; "
                            "is this a LoRA for a model other than SD 1.x/2.x or SDXL?")
        (unet if component == PEFT_UNET else text)[key] = value
    return unet, text


def detect_layout(keys) -> str | None:
    """"kohya", "peft" (diffusers' lora_A/lora_B) or None, from the tensor names."""
    keys = list(keys)
    if any(k.endswith(KOHYA_SUFFIXES[0]) or ".hada_" in k or ".lokr_" in k for k in keys):
        return "kohya"
    if keys and all(k.endswith(PEFT_SUFFIXES) for k in keys):
        return "peft"
    return None


def is_sdxl_kohya(module_names) -> bool:
    """Whether kohya module names are SDXL's (lora_te1_/lora_te2_, SGM UNet names input_blocks/...)."""
    from networks.files import LDM_UNET_PREFIXES, SDXL_TEXT_ENCODER_PREFIXES

    return any(name.startswith(SDXL_TEXT_ENCODER_PREFIXES + LDM_UNET_PREFIXES) for name in module_names)


# diffusers module paths only SDXL's UNet has (SD 1.x/2.x: depth 1, no attention in up_blocks.0) or only SD's has
# (attention in down_blocks.0, a fourth level); a UNet-only file with none of them is read as SD 1.x/2.x.
_SDXL_ONLY = re.compile(r"^unet\.(up_blocks\.0\.attentions|.*transformer_blocks\.[1-9])")
_SD_ONLY = re.compile(r"^unet\.(down_blocks\.0\.attentions|(down|up)_blocks\.3\.)")


def is_sdxl_peft(keys) -> bool:
    """Whether diffusers/peft LoRA keys are for SDXL: `text_encoder_2.`, or UNet paths only SDXL has."""
    keys = list(keys)
    if any(k.startswith(f"{PEFT_TEXT_ENCODER_2}.") for k in keys):
        return True
    return any(_SDXL_ONLY.match(k) for k in keys) and not any(_SD_ONLY.match(k) for k in keys)


def peft_module_path(kohya: str, *, source: str = "state dict", sdxl: bool | None = None) -> tuple[str, str]:
    """(component, module path as diffusers' files spell it) of a kohya module name."""
    sdxl = is_sdxl_kohya([kohya]) if sdxl is None else sdxl
    index = _SDXL_INDEX if sdxl else _INDEX
    for prefix, component in _COMPONENTS[sdxl].items():
        body = kohya.removeprefix(prefix + "_")
        template = _templates(sdxl)[0][component].get(index.sub("#", body)) if body != kohya else None
        if template is not None:
            return component, template.format(*index.findall(body))
    family = "an SDXL" if sdxl else "an SD 1.x/2.x"
    raise UserError(f"{source}: {kohya} is not a module {family} LoRA/LoCon targets "
                    "(attention, feed-forward, proj, ResNet/sampler convs, CLIP q/k/v/out_proj, fc1/fc2)")


def kohya_name(component: str, path: str, *, source: str = "state dict", sdxl: bool | None = None) -> str:
    """The kohya name of a module path (text-encoder paths with or without transformers 4's `text_model.`);
    `sdxl` None: SDXL only for `text_encoder_2` (other paths are read as SD 1.x/2.x's)."""
    sdxl = component == PEFT_TEXT_ENCODER_2 if sdxl is None else sdxl
    if component != PEFT_UNET and not path.startswith("text_model."):
        path = f"text_model.{path}"
    index = _SDXL_INDEX if sdxl else _INDEX
    template = _templates(sdxl)[1].get(component, {}).get(index.sub("#", path))
    if template is None:
        family = "an SDXL" if sdxl else "an SD 1.x/2.x"
        raise UserError(f"{source}: {component}.{path} is not a module {family} LoRA/LoCon targets; "
                        "is this LoRA for another model family?")
    return template.format(*index.findall(path))


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


@functools.lru_cache(maxsize=2)
def _templates(sdxl: bool) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, str]]]:
    """(component -> {kohya name without prefix, indices as '#': module path with indices as '{}'},
    component -> {module path, indices as '#': full kohya name with indices as '{}'}) of every target."""
    index = _SDXL_INDEX if sdxl else _INDEX
    to_path: dict[str, dict[str, str]] = {}
    to_kohya: dict[str, dict[str, str]] = {}
    for component, prefix, lora_name, path in (_sdxl_target_paths() if sdxl else _target_paths()):
        body = lora_name.removeprefix(prefix + "_")
        to_path.setdefault(component, {})[index.sub("#", body)] = index.sub("{}", path)
        to_kohya.setdefault(component, {})[index.sub("#", path)] = index.sub("{}", lora_name)
    return to_path, to_kohya


def _target_paths():
    """(component, kohya prefix, kohya name, module path) of every target injection.py finds in skeleton SD 1.x
    and 2.x models (every block kind once; built on the meta device, so nothing is allocated)."""
    unet_side, (te_side,) = adapter_targets(1)
    for unet, text_encoder in (_skeleton(False), _skeleton(True)):
        yield from _named_targets(unet, [text_encoder], unet_side, (te_side,))


def _sdxl_target_paths():
    """The same for a skeleton SDXL model: SGM kohya names, diffusers module paths."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from library.models.family import family_named
    from library.models.sdxl import tiny_configs

    family = family_named("sdxl")
    unet_cfg, _, te1_cfg, te2_cfg = tiny_configs(1.0)  # the VAE is not built
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_cfg)
        encoders = [CLIPTextModel(CLIPTextConfig(**te1_cfg)), CLIPTextModelWithProjection(CLIPTextConfig(**te2_cfg))]
    yield from _named_targets(unet, encoders, family.unet_targets, family.text_encoder_targets)


def _named_targets(unet, text_encoders, unet_side, te_sides):
    components = _COMPONENTS[len(text_encoders) > 1]
    paths = {id(m): n for n, m in unet.named_modules()}
    for target in unet_targets(unet, unet_side, include_conv=True):
        yield PEFT_UNET, unet_side.prefix, target.lora_name, paths[id(target.module)]
    for text_encoder, side in zip(text_encoders, te_sides):
        paths = {id(m): n if n.startswith("text_model.") else f"text_model.{n}"
                 for n, m in text_encoder.named_modules()}
        for target in text_encoder_targets(text_encoder, side):
            yield components[side.prefix], side.prefix, target.lora_name, paths[id(target.module)]


def _skeleton(v2: bool):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from library.models.tiny import tiny_configs

    unet_cfg, _, text_cfg = tiny_configs(v2, latent_scale=1.0)  # the VAE is not built
    with torch.device("meta"):
        return UNet2DConditionModel(**unet_cfg), CLIPTextModel(CLIPTextConfig(**text_cfg))
