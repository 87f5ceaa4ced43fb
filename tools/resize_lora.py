#!/usr/bin/env python
"""Resize a LoRA/LoCon file to a lower rank (fixed, or per module with sd-scripts' dynamic methods) by truncated SVD.

Each module's ΔW = up·down·alpha/rank is re-factorised to its best rank-r approximation. The new alpha is
old_scale · new_rank (as sd-scripts sets it), so the scale alpha/rank is unchanged and the written ΔW is exactly
that approximation. Module names are kept as they are, so SD 1.x/2.x and SDXL files resize alike.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/resize_lora.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from library.config.declarations import OPTIONS  # noqa: E402
from library.config.options import Option  # noqa: E402
from library.config.resolve import parse_tool_args  # noqa: E402
from library.errors import UserError, exit_on_user_error  # noqa: E402

NETWORK_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
TOOL_OPTIONS = (
    Option("model", str, None, "LoRA/LoCon file to resize (.safetensors, .ckpt, .pt)", "resize"),
    Option("save_to", str, None, "where to write the resized file (.safetensors, .ckpt, .pt)", "resize"),
    Option("new_rank", int, 4, "rank of the output (the upper limit with --dynamic_method)", "resize"),
    Option("new_conv_rank", int, None, "rank for 3×3 convolutions (LoCon; default: --new_rank)", "resize"),
    Option("dynamic_method", str, None, "pick each module's rank: sv_ratio, sv_fro or sv_cumulative", "resize"),
    Option("dynamic_param", float, None, "target of --dynamic_method (ratio, or fraction 0-1)", "resize"),
    Option("device", str, "cpu", "device for the SVDs (cuda to use a GPU)", "resize"),
    Option("verbose", bool, False, "print every module's rank and retained norm", "resize"),
    Option("svd_lowrank_niter", int, 2, "sd-scripts' power iterations for torch.svd_lowrank: accepted; the exact "
           "SVD is used, so it has no effect", "resize"),
)


@dataclass
class ResizedModule:
    name: str
    old_rank: int
    new_rank: int
    alpha: float
    retained: float  # Frobenius norm of the kept part over that of the old ΔW
    is_conv_kernel: bool


def resize_weights(weights: dict[str, torch.Tensor], new_rank: int, new_conv_rank: int | None = None, *,
                   dynamic_method: str | None = None, dynamic_param: float | None = None,
                   device: str = "cpu") -> tuple[dict[str, torch.Tensor], list[ResizedModule]]:
    """New tensors (other keys kept as they are) and a report per LoRA module."""
    new_conv_rank = new_rank if new_conv_rank is None else new_conv_rank
    out = dict(weights)
    report = []
    with torch.no_grad():
        for name in sorted(k.removesuffix(".lora_down.weight") for k in weights if k.endswith(".lora_down.weight")):
            module, tensors = _resize_module(weights, name, new_rank, new_conv_rank, dynamic_method, dynamic_param,
                                             device)
            out.update(tensors)
            report.append(module)
    return out, report


def _resize_module(weights, name, new_rank, new_conv_rank, method, param, device):
    from networks.svd import MIN_SV, dynamic_rank, svd_of_product, truncate

    down, up = weights[f"{name}.lora_down.weight"], weights.get(f"{name}.lora_up.weight")
    if up is None:
        raise UserError(f"{name}: has lora_down but no lora_up tensor; the file is damaged")
    old_rank = down.shape[0]
    alpha = float(weights[f"{name}.alpha"]) if f"{name}.alpha" in weights else float(old_rank)
    scale = alpha / old_rank
    is_kernel = down.dim() == 4 and down.shape[2:] != (1, 1)
    # Ranks above the old one would only add zero singular values.
    limit = max(1, min(new_conv_rank if is_kernel else new_rank, old_rank))
    U, S, Vh = svd_of_product(up.to(device), down.to(device))
    rank = min(dynamic_rank(S, method, param), limit) if method else limit
    if float(S[0]) <= MIN_SV:
        rank = 1  # a zero ΔW: sd-scripts keeps one (zero) rank
    shape = (up.shape[0], *down.shape[1:])
    new_up, new_down, retained = truncate(U, S, Vh, rank, shape)
    new_up = new_up.reshape(up.shape[0], rank, *up.shape[2:])  # keep the up weight's own 2-D or 1×1 form
    new_alpha = scale * rank
    tensors = {f"{name}.lora_down.weight": new_down.cpu(), f"{name}.lora_up.weight": new_up.cpu(),
               f"{name}.alpha": torch.tensor(new_alpha)}
    return ResizedModule(name, old_rank, rank, new_alpha, retained, is_kernel), tensors


def updated_metadata(metadata: dict[str, str], report: list[ResizedModule], args) -> dict[str, str]:
    """sd-scripts' metadata changes: dim, alpha ("Dynamic" when per module) and a note in ss_training_comment."""
    metadata = dict(metadata)
    for key in ("sshs_model_hash", "sshs_legacy_hash"):  # recomputed for the new tensors on saving
        metadata.pop(key, None)
    old_dim = max(m.old_rank for m in report)
    comment = metadata.get("ss_training_comment", "")
    if args.dynamic_method:
        note = f"Dynamic resize with {args.dynamic_method}: {args.dynamic_param} from {old_dim}"
    else:
        conv_rank = args.new_conv_rank if args.new_conv_rank is not None else args.new_rank
        conv_desc = "" if conv_rank == args.new_rank else f" (conv: {conv_rank})"
        note = f"dimension is resized from {old_dim} to {args.new_rank}{conv_desc}"
    metadata["ss_training_comment"] = f"{note}; {comment}"
    linear = [m for m in report if not m.is_conv_kernel] or report
    conv = [m for m in report if m.is_conv_kernel]
    dynamic = bool(args.dynamic_method)  # sd-scripts writes "Dynamic" for every dynamic resize
    metadata["ss_network_dim"] = _common((m.new_rank for m in linear), dynamic)
    metadata["ss_network_alpha"] = _common((m.alpha for m in linear), dynamic)
    net_args = _json_dict(metadata.get("ss_network_args"))
    if conv and "conv_dim" in net_args:
        net_args["conv_dim"] = _common((m.new_rank for m in conv), dynamic)
        net_args["conv_alpha"] = _common((m.alpha for m in conv), dynamic)
        metadata["ss_network_args"] = json.dumps(net_args)
    return metadata


def _json_dict(text: str | None) -> dict:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}  # foreign metadata we do not understand is kept as it is
    return value if isinstance(value, dict) else {}


def _common(values, dynamic: bool) -> str:
    """The one value all modules share, or "Dynamic" when they differ (say, capped at a smaller old rank)."""
    distinct = set(values)
    return str(distinct.pop()) if len(distinct) == 1 and not dynamic else "Dynamic"


def summary(report: list[ResizedModule], source) -> str:
    retained = torch.tensor([m.retained for m in report], dtype=torch.float64)
    ranks = sorted({m.new_rank for m in report})
    std = float(retained.std(unbiased=False))
    return (f"resized {len(report)} modules of {source} (rank {max(m.old_rank for m in report)} -> "
            f"{ranks[0] if len(ranks) == 1 else f'{ranks[0]}..{ranks[-1]}'}): "
            f"average retained Frobenius norm {float(retained.mean()):.2%} "
            f"(std {std:.3f}, min {float(retained.min()):.2%})")


def _check_args(args) -> None:
    from networks.svd import DYNAMIC_METHODS

    for flag in ("model", "save_to"):
        if not getattr(args, flag):
            raise UserError(f"--{flag} is required; e.g. --model in.safetensors --save_to out.safetensors --new_rank 4")
    if not args.save_to.lower().endswith(NETWORK_SUFFIXES):
        raise UserError(f"--save_to {args.save_to}: must end in {', '.join(NETWORK_SUFFIXES)}")
    from library.safe_write import refuse_input_as_output

    refuse_input_as_output(args.save_to, [args.model], "--save_to")
    for flag in ("new_rank", "new_conv_rank"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag} {value}: a rank must be at least 1")
    if args.dynamic_method is not None and args.dynamic_method not in DYNAMIC_METHODS:
        raise UserError(f"--dynamic_method {args.dynamic_method}: unknown; use one of {', '.join(DYNAMIC_METHODS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: no CUDA device here; use --device cpu")
    if args.dynamic_method and not args.dynamic_param:
        raise UserError(f"--dynamic_method {args.dynamic_method} needs --dynamic_param (e.g. 0.9, or 4 for sv_ratio)")


def read_lora(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The file's tensors under their own names (kept on saving), refusing LoHa/LoKr and non-network files."""
    from library.models.checkpoint_io import read_state_dict
    from networks.files import describe_network_file, refuse_unknown_tensors

    weights, metadata = read_state_dict(path)
    weights = {k: v for k, v in weights.items() if isinstance(v, torch.Tensor)}
    info = describe_network_file(weights, source=str(path))
    if info.algorithm != "lora":
        raise UserError(f"{path}: a {info.algorithm} network; resize supports LoRA/LoCon (lora_up/lora_down) files "
                        "only")
    info.refuse_without_model(path, "resize", "train it at the rank you want instead")
    # Kept as they are, tensors we do not read (another tool's) would no longer fit the resized factors.
    refuse_unknown_tensors(weights, info, source=str(path))
    return {k: v.float() for k, v in weights.items()}, dict(metadata)


@exit_on_user_error
def main(argv=None) -> list[ResizedModule]:
    args = parse_tool_args(argv, __doc__, TOOL_OPTIONS + tuple(o for o in OPTIONS if o.name == "save_precision"),
                           [o.name for o in TOOL_OPTIONS] + ["save_precision"])
    _check_args(args)
    from library.models.saving import save_dtype
    from networks.files import carried_bundles, save_network_file, without_bundle

    dtype = save_dtype(args.save_precision)  # sd-scripts saves float32 unless told otherwise
    weights, metadata = read_lora(args.model)
    weights = without_bundle(weights)
    if args.dynamic_method:
        print(f"choosing ranks with {args.dynamic_method} {args.dynamic_param}, at most {args.new_rank}")
    resized, report = resize_weights(weights, args.new_rank, args.new_conv_rank, dynamic_method=args.dynamic_method,
                                     dynamic_param=args.dynamic_param, device=args.device)
    if args.verbose:
        for m in report:
            print(f"{m.name:75} | fro retained {m.retained:.1%}, rank {m.old_rank} -> {m.new_rank}, alpha {m.alpha:g}")
    resized.update(carried_bundles([args.model]))  # pivotal tuning's embeddings, unchanged
    save_network_file(resized, args.save_to, dtype=dtype, metadata=updated_metadata(metadata, report, args))
    print(summary(report, args.model))
    print(f"wrote {args.save_to}")
    return report


if __name__ == "__main__":
    main()
