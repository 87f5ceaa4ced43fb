#!/usr/bin/env python
"""Extract a LoRA (LoCon with --conv_dim) approximating tuned − base by truncated SVD of every LoRA-targeted weight.

The layers are the ones our LoRA network adapts (UNet attention/feed-forward/proj_in/out, text-encoder q/k/v/out,
fc1/fc2, and with --conv_dim the ResNet and sampler convolutions). alpha = rank, so the scale is 1 and up·down is ΔW.
SDXL models (detected; sd-scripts' --sdxl insists on it) give SGM UNet names and lora_te1_/lora_te2_, and SDXL's
ss_base_model_version and modelspec.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/extract_lora_from_models.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from library.config.declarations import OPTIONS  # noqa: E402
from library.config.options import Option  # noqa: E402
from library.config.resolve import parse_tool_args  # noqa: E402
from library.console import quiet_libraries  # noqa: E402
from library.errors import UserError, exit_on_user_error  # noqa: E402

SHARED_FLAGS = ("v2", "v_parameterization", "save_precision")
TOOL_OPTIONS = (
    Option("model_org", str, None, "base model: .safetensors/.ckpt file, diffusers folder or hub id", "extract"),
    Option("model_tuned", str, None, "fine-tuned model; the LoRA is the difference base -> tuned", "extract"),
    Option("save_to", str, None, "where to write the LoRA (.safetensors, .ckpt, .pt)", "extract"),
    Option("dim", int, 4, "rank of the LoRA", "extract"),
    Option("conv_dim", int, None, "rank for 3×3 convolutions (LoCon); without it they are left out", "extract"),
    Option("clamp_quantile", float, 0.99, "clip both factors to ± this quantile of |values| (1 = no clipping)",
           "extract"),
    Option("min_diff", float, 0.01, "a text encoder differing by at most this (max |Δ|) is left out", "extract"),
    Option("device", str, "cpu", "device for the SVDs (cuda to use a GPU)", "extract"),
    Option("load_precision", str, None, "dtype both models are loaded in (default: float32); the differences are "
           "still taken in float32", "extract", choices=("float", "fp16", "bf16")),
    Option("sdxl", bool, False, "insist that both models are SDXL, as sd-scripts' flag says (the family is "
           "detected from the files either way)", "extract"),
    Option("no_metadata", bool, False, "do not write the modelspec metadata (the minimal ss_* LoRA metadata is "
           "still written), as sd-scripts does", "extract"),
)
LOAD_DTYPES = {None: torch.float32, "float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def weight_differences(base, tuned, *, conv_dim: int | None, min_diff: float) -> dict[str, torch.Tensor]:
    """lora_name -> tuned − base (float32) for every layer a LoRA over `base` targets, sd-scripts' skipping rules."""
    from networks import lora

    kwargs = {} if conv_dim is None else {"conv_dim": str(conv_dim), "conv_alpha": str(conv_dim)}
    nets = [lora.create_network(1.0, 1, 1, None, p.network_text_encoder, p.unet, **kwargs) for p in (base, tuned)]
    text = _pairs(nets[0].text_encoder_loras, nets[1].text_encoder_loras)
    unet = _pairs(nets[0].unet_loras, nets[1].unet_loras)
    diffs = {name: t.weight.float() - b.weight.float() for name, (b, t) in text.items()}
    largest = max((float(d.abs().max()) for d in diffs.values()), default=0.0)
    if largest <= min_diff:  # sd-scripts: text encoders this close to the base are left out entirely
        print(f"text encoder{'s are' if len(base.text_encoders) > 1 else ' is'} the same (max |Δ| {largest:.2g} <= --min_diff {min_diff}): extracting the UNet only")
        diffs = {}
    for name, (b, t) in unet.items():
        diff = t.weight.float() - b.weight.float()
        if diff.any():  # an unchanged layer would only add a zero adapter
            diffs[name] = diff
    return diffs


def _pairs(base_loras, tuned_loras) -> dict:
    """lora_name -> (base layer, tuned layer), refusing models whose layers differ (SD 1.x vs 2.x, other sizes)."""
    tuned = {m.lora_name: m.org_module for m in tuned_loras}
    pairs = {}
    for module in base_loras:
        other = tuned.get(module.lora_name)
        if other is None or other.weight.shape != module.org_module.weight.shape:
            raise UserError(f"--model_tuned: its layer {module.lora_name} is missing or shaped differently from "
                            "--model_org's; both models must be the same family and size (SD 1.x vs 2.x vs SDXL?)")
        pairs[module.lora_name] = (module.org_module, other)
    return pairs


def extract(diffs: dict[str, torch.Tensor], dim: int, conv_dim: int | None = None, *,
            clamp_quantile: float | None = 0.99, device: str = "cpu"):
    """(kohya state dict, report): each difference as up·down of rank ≤ dim (conv_dim for 3×3), alpha = rank."""
    from networks.svd import lora_from_deltas

    return lora_from_deltas(diffs, dim, conv_dim, clamp_quantile=clamp_quantile, device=device)


def lora_metadata(parts, args) -> dict[str, str]:
    """sd-scripts' minimum LoRA metadata plus modelspec (none with --no_metadata), as its extract script writes."""
    import time

    from library.formats.kohya_metadata import network_modelspec

    v_param = parts.v_parameterization
    net_args = {}
    if args.conv_dim is not None:
        net_args = {"conv_dim": str(args.conv_dim), "conv_alpha": str(float(args.conv_dim))}
    # A LoRA's modelspec, as train_network writes it (implementation "diffusers" for SD 1.x/2.x LoRA).
    metadata = {} if args.no_metadata else network_modelspec(parts.family, v_parameterization=v_param,
                                                            timestamp=time.time(), title=Path(args.save_to).stem)
    metadata.update({key: str(value) for key, value in parts.family.ss_keys(v_param).items()})
    metadata.update({"ss_network_module": "networks.lora", "ss_network_dim": str(args.dim),
                     "ss_network_alpha": str(float(args.dim)), "ss_network_args": json.dumps(net_args)})
    return metadata


def _check_args(args) -> None:
    for flag in ("model_org", "model_tuned", "save_to"):
        if not getattr(args, flag):
            raise UserError(f"--{flag} is required; e.g. --model_org base.safetensors --model_tuned tuned.safetensors "
                            "--save_to lora.safetensors --dim 4")
    if not args.save_to.lower().endswith((".safetensors", ".ckpt", ".pt", ".pth")):
        raise UserError(f"--save_to {args.save_to}: must end in .safetensors, .ckpt or .pt")
    for flag in ("dim", "conv_dim"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag} {value}: a rank must be at least 1")
    if not 0.0 < args.clamp_quantile <= 1.0:
        raise UserError(f"--clamp_quantile {args.clamp_quantile}: must be in (0, 1]; 1 turns clipping off")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: no CUDA device here; use --device cpu")
    if args.sdxl:  # the SDXL family's own rule: --v2 insists on SD 2.x (sd-scripts refuses the pair too)
        from library.models.family import family_named

        problems = family_named("sdxl").option_problems(vars(args), [])
        if problems:
            raise UserError(f"--sdxl: {problems[0]}")


def check_families(base, tuned, args) -> None:
    """Both models of one family (and SDXL with --sdxl), before any difference is taken."""
    from library.models.family import family_named

    if args.sdxl:
        sdxl = family_named("sdxl")
        for flag, parts in (("--model_org", base), ("--model_tuned", tuned)):
            if parts.family is not sdxl:
                raise UserError(f"{flag} {parts.source}: an {parts.family.label} model, but --sdxl says both are "
                                f"{sdxl.label}; drop --sdxl or give {sdxl.label} models")
    if base.family is not tuned.family:
        raise UserError(f"--model_tuned {tuned.source}: an {tuned.family.label} model, but --model_org is "
                        f"{base.family.label}; both models must be of the same family")


def save_extracted(weights: dict[str, torch.Tensor], parts, args) -> Path:
    """Fill a LoRA network built over the base model (proving the names and shapes fit it) and save that."""
    from library.models.saving import save_dtype
    from networks import lora

    network = lora.create_network_from_weights(1.0, args.save_to, None, parts.network_text_encoder, parts.unet,
                                               weights_sd=weights)
    result = network.load_state_dict_flexible(weights)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"extracted tensors do not fit the LoRA network: {result}")
    network.save_weights(args.save_to, save_dtype(args.save_precision), lora_metadata(parts, args))
    return Path(args.save_to)


@exit_on_user_error
def main(argv=None) -> list:
    declared = TOOL_OPTIONS + tuple(o for o in OPTIONS if o.name in SHARED_FLAGS)
    args = parse_tool_args(argv, __doc__, declared, [o.name for o in declared])
    _check_args(args)
    quiet_libraries()
    from library.models.loading import load_components

    dtype = LOAD_DTYPES[args.load_precision]
    base = load_components(args.model_org, options=args, v_parameterization=args.v_parameterization, dtype=dtype)
    tuned = load_components(args.model_tuned, options=args, v_parameterization=args.v_parameterization, dtype=dtype)
    check_families(base, tuned, args)
    diffs = weight_differences(base, tuned, conv_dim=args.conv_dim, min_diff=args.min_diff)
    if not diffs:
        raise UserError(f"--model_tuned {args.model_tuned}: no LoRA-targeted layer differs from --model_org; "
                        "nothing to extract (same model twice?)")
    weights, report = extract(diffs, args.dim, args.conv_dim, clamp_quantile=args.clamp_quantile, device=args.device)
    save_extracted(weights, base, args)
    mean = sum(m.retained for m in report) / len(report)
    print(f"extracted {len(report)} modules at rank {args.dim}"
          f"{'' if args.conv_dim is None else f' (conv {args.conv_dim})'}: average retained Frobenius norm {mean:.2%}")
    print(f"wrote {args.save_to}")
    return report


if __name__ == "__main__":
    main()
