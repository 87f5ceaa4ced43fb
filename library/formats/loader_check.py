"""Export self-test (#21 item 1): would the loaders people use find every module of a network file?

"lora key not loaded" is the most common complaint across trainers: a loader that does not recognise a module name
skips it, and the network silently does less than it did in training. After each save (and in
`tools/check_lora_weights.py --loaders`), the file's module names are checked against the base model as each
loader names its layers:

- **diffusers** (`load_lora_weights`): its own conversion code runs on the file's keys (SGM block remap for SDXL,
  kohya → diffusers names, → PEFT names), and each resulting module path must exist in the model. diffusers reads
  LoRA/LoCon only, and drops DoRA's `dora_scale`.
- **ComfyUI** (comfy/lora.py `model_lora_keys_unet` / `model_lora_keys_clip`, re-derived): a U-Net module is found
  under `lora_unet_` + its diffusers path or its ldm/SGM path; a text-encoder module only if it is one of the six
  projections of a CLIP layer (q/k/v/out, fc1/fc2) under `lora_te_` (SD 1.x/2.x) or `lora_te1_`/`lora_te2_`
  (SDXL). sd-scripts' OFT names (`oft_unet_`) are not checked for it.
- **AUTOMATIC1111** (extensions-builtin/Lora/networks.py `convert_diffusers_name_to_compvis`, re-derived): diffusers
  names are converted by its regular expressions (which assume SD's block layout), SDXL names by prefix, `oft_unet_`
  by prefix, and looked up among the compvis module names; q/k/v of an OpenCLIP encoder go to its fused attention.

The re-derived rules were written from the loaders' public code, not run against them here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

LOADERS = ("diffusers", "ComfyUI", "A1111")
CLIP_PROJECTIONS = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1",
                    "mlp_fc2")  # ComfyUI's LORA_CLIP_MAP targets
READS = {"diffusers": ("lora",), "ComfyUI": ("lora", "loha", "lokr"), "A1111": ("lora", "loha", "lokr", "oft")}


@dataclass
class LoaderResult:
    loader: str
    total: int
    unmatched: list[str] = field(default_factory=list)
    note: str | None = None  # why the loader reads none of it, or what it leaves out
    checked: bool = True  # False: the file's kind is not checked for this loader (the note says so)

    @property
    def mapped(self) -> int:
        return self.total - len(self.unmatched)


def _u(path: str) -> str:
    return path.replace(".", "_")


def _linear_paths(module: nn.Module) -> list[str]:
    return [name for name, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def _ldm(parts):
    """diffusers U-Net module path -> its ldm (SGM) path."""
    from library.models.ldm_convert import unet_path_to_ldm

    config = dict(parts.unet.config)
    return lambda path: unet_path_to_ldm(path, config)


def _layers(text_encoder: nn.Module) -> int:
    return int(text_encoder.config.num_hidden_layers)


def _te_prefixes(parts) -> list[str]:
    return [side.prefix for side in parts.family.text_encoder_targets][:len(parts.text_encoders)]


# --------------------------------------------------------------------------------------------------------- ComfyUI
def comfyui_names(parts) -> set[str]:
    ldm = _ldm(parts)
    names = set()
    for path in _linear_paths(parts.unet):
        names.add(f"lora_unet_{_u(path)}")
        names.add(f"lora_unet_{_u(ldm(path))}")
    for prefix, encoder in zip(_te_prefixes(parts), parts.text_encoders):
        for block in range(min(_layers(encoder), 32)):
            names.update(f"{prefix}_text_model_encoder_layers_{block}_{c}" for c in CLIP_PROJECTIONS)
    return names


# ---------------------------------------------------------------------------------------------------- AUTOMATIC1111
_RESNET_SUFFIX = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
                  "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}
_OPENCLIP = (("mlp_fc1", "mlp_c_fc"), ("mlp_fc2", "mlp_c_proj"), ("self_attn", "attn"))


def _suffix(kind: str, rest: str) -> str:
    if kind == "resnets":
        for old, new in _RESNET_SUFFIX.items():
            if rest.startswith(old):
                return new + rest[len(old):]
    return rest


def _openclip(rest: str) -> str:
    for old, new in _OPENCLIP:
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


# AUTOMATIC1111's convert_diffusers_name_to_compvis, rule by rule: (pattern, compvis name from the match and family).
_A1111_RULES = (
    (r"lora_unet_conv_in(.*)", lambda m, f: f"diffusion_model_input_blocks_0_0{m[1]}"),
    (r"lora_unet_conv_out(.*)", lambda m, f: f"diffusion_model_out_2{m[1]}"),
    (r"lora_unet_time_embedding_linear_(\d+)(.*)",
     lambda m, f: f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}"),
    (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
     lambda m, f: f"diffusion_model_input_blocks_{1 + int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_"
                  f"{_suffix(m[2], m[4])}"),
    (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
     lambda m, f: f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_{_suffix(m[1], m[3])}"),
    (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
     lambda m, f: f"diffusion_model_output_blocks_{int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_"
                  f"{_suffix(m[2], m[4])}"),
    (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv",
     lambda m, f: f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"),
    (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",
     lambda m, f: f"diffusion_model_output_blocks_{2 + int(m[1]) * 3}_{2 if int(m[1]) > 0 else 1}_conv"),
    (r"lora_te_text_model_encoder_layers_(\d+)_(.+)",
     lambda m, f: f"model_transformer_resblocks_{m[1]}_{_openclip(m[2])}" if f == "sd2"
     else f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"),
    (r"lora_te2_text_model_encoder_layers_(\d+)_(.+)",
     lambda m, f: f"1_model_transformer_resblocks_{m[1]}_{_openclip(m[2])}"),
)
# Names the rules leave alone, by prefix: sd-scripts' OFT, and SDXL's (already SGM / compvis names).
_A1111_PREFIXES = (("oft_unet", "diffusion_model", None), ("lora_unet", "diffusion_model", "sdxl"),
                   ("lora_te1_text_model", "0_transformer_text_model", "sdxl"))


def a1111_target(name: str, family: str) -> str:
    """The compvis module name AUTOMATIC1111 looks a file's module name up under."""
    for pattern, target in _A1111_RULES:
        m = re.fullmatch(pattern, name)
        if m:
            return target(m, family)
    for prefix, replacement, only in _A1111_PREFIXES:
        if name.startswith(prefix) and only in (None, family):
            return name.replace(prefix, replacement, 1)
    return name


def a1111_names(parts) -> set[str]:
    """AUTOMATIC1111's module names (network_layer_mapping) for this model: the ldm U-Net, and its text encoders
    as its own CLIP (transformer_…) or OpenCLIP (model_transformer_resblocks_…, fused attention) modules."""
    ldm = _ldm(parts)
    names = {f"diffusion_model_{_u(ldm(path))}" for path in _linear_paths(parts.unet)}
    family = parts.family.name
    for index, encoder in enumerate(parts.text_encoders):
        openclip = family == "sd2" or (family == "sdxl" and index == 1)
        head = {"sdxl": f"{index}_"}.get(family, "")
        for block in range(_layers(encoder)):
            if openclip:
                names.update(f"{head}model_transformer_resblocks_{block}_{x}"
                             for x in ("attn", "attn_out_proj", "mlp_c_fc", "mlp_c_proj"))
            else:
                names.update(f"{head}transformer_text_model_encoder_layers_{block}_{c}" for c in CLIP_PROJECTIONS)
    return names


def a1111_finds(name: str, family: str, names: set[str]) -> bool:
    target = a1111_target(name, family)
    if target in names:
        return True
    m = re.fullmatch(r"(.*)_([qkv]_proj)", target)  # OpenCLIP q/k/v: parts of the fused in_proj
    return bool(m) and m[1] in names


# -------------------------------------------------------------------------------------------------------- diffusers
def diffusers_unmatched(weights: dict[str, torch.Tensor], modules: list[str], parts) -> tuple[list[str], str | None]:
    """diffusers' own conversion of the file's keys, then each module's path looked up in the model."""
    from diffusers.loaders.lora_conversion_utils import (_convert_non_diffusers_lora_to_diffusers,
                                                         _maybe_map_sgm_blocks_to_diffusers)
    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    note = None
    state = {k: v for k, v in weights.items() if not k.endswith(".dora_scale")}
    if len(state) != len(weights):
        note = "diffusers drops dora_scale (it applies the LoRA part only)"
    owner = {id(v): k.partition(".")[0] for k, v in state.items() if k.endswith(".lora_down.weight")}
    try:
        if parts.family.name == "sdxl":
            state = _maybe_map_sgm_blocks_to_diffusers(state, parts.unet.config)
        converted, _ = _convert_non_diffusers_lora_to_diffusers(dict(state))
    except (ValueError, KeyError) as err:
        return list(modules), f"diffusers refuses the file ({str(err).splitlines()[0][:120]})"
    found: set[str] = set()
    unet = {k.removeprefix("unet."): v for k, v in converted.items() if k.startswith("unet.")}
    unet_paths = set(_linear_paths(parts.unet))
    for key, value in (convert_unet_state_dict_to_peft(unet) if unet else {}).items():
        if key.endswith(".lora_A.weight") and key.removesuffix(".lora_A.weight") in unet_paths:
            found.add(owner.get(id(value), ""))
    for head, index in (("text_encoder", 0), ("text_encoder_2", 1)):
        if index >= len(parts.text_encoders):
            continue
        te = {k.removeprefix(f"{head}."): v for k, v in converted.items() if k.startswith(f"{head}.")}
        te_paths = set(_linear_paths(parts.text_encoders[index]))
        for key, value in (convert_state_dict_to_peft(te) if te else {}).items():
            path = key.removesuffix(".lora_A.weight")
            if path != key and (path in te_paths or path.removeprefix("text_model.") in te_paths):
                found.add(owner.get(id(value), ""))
    return [m for m in modules if m not in found], note


# ---------------------------------------------------------------------------------------------------------- all three
def check_network(weights: dict[str, torch.Tensor], parts, algorithm: str) -> list[LoaderResult]:
    """What each loader would make of the file's modules on this base model (`parts`)."""
    from networks.files import canonical_key, without_bundle

    # Bundled embeddings (bundle_emb.*) are not modules: A1111 reads them as embeddings, the others skip them.
    weights = {canonical_key(k): v for k, v in without_bundle(weights).items()}
    modules = sorted({k.partition(".")[0] for k in weights})
    family = parts.family.name
    results = []
    for loader in LOADERS:
        if algorithm not in READS[loader]:
            note = {"diffusers": f"diffusers does not read {algorithm} files"}.get(
                loader, f"{loader} is not checked for {algorithm} files")
            results.append(LoaderResult(loader, len(modules), list(modules), note,
                                        checked=loader == "diffusers"))
            continue
        if loader == "diffusers":
            unmatched, note = diffusers_unmatched(weights, modules, parts)
            results.append(LoaderResult(loader, len(modules), unmatched, note))
        elif loader == "ComfyUI":
            names = comfyui_names(parts)
            results.append(LoaderResult(loader, len(modules), [m for m in modules if m not in names]))
        else:
            names = a1111_names(parts)
            unmatched = [m for m in modules if not a1111_finds(m, family, names)]
            results.append(LoaderResult(loader, len(modules), unmatched))
    return results


def report_lines(label: str, results: list[LoaderResult]) -> list[str]:
    """`saved x.safetensors: 264/264 modules map in diffusers, ComfyUI, A1111`, then a line per shortfall."""
    total = results[0].total if results else 0
    full = [r.loader for r in results if r.checked and not r.unmatched]
    partial = [r for r in results if r.checked and r.unmatched]
    parts = [f"{total}/{total} modules map in {', '.join(full)}"] if full else []
    parts += [f"{r.loader} {r.mapped}/{r.total}" for r in partial]
    lines = [f"{label}: {'; '.join(parts) or f'{total} modules, no loader checked'}"]
    for r in results:
        if r.unmatched and (not r.checked or r.mapped == 0) and r.note:
            lines.append(f"note: {r.note}")
        elif r.unmatched:
            shown = ", ".join(r.unmatched[:3]) + (f" and {len(r.unmatched) - 3} more" if len(r.unmatched) > 3 else "")
            lines.append(f"warning: {r.loader} would not load {len(r.unmatched)} module"
                         f"{'s' if len(r.unmatched) != 1 else ''}: {shown}" + (f" ({r.note})" if r.note else ""))
        elif r.note:
            lines.append(f"note: {r.note}")
    return lines
