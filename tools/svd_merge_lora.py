#!/usr/bin/env python
"""Merge networks into one LoRA like sd-scripts' svd_merge_lora.py: Σ ratio_i·ΔW_i per module, then truncated SVD.

Inputs may be LoRA/LoCon of any ranks, or LoHa/LoKr (their ΔW is rebuilt by our module classes). Each module's sum
is re-factorised to its best rank --new_rank approximation (--new_conv_rank for 3×3 convolutions), alpha = rank.
SD 1.x/2.x and SDXL networks alike (module names are kept); --lbws weights modules by block, as in merge_lora.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/svd_merge_lora.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from library.errors import UserError, exit_on_user_error  # noqa: E402
from tools.merge_lora import (add_common_arguments, block_weights, check_common,  # noqa: E402
                              check_network_output, merge_dtypes, network_metadata)
from tools.merge_models import make_parser  # noqa: E402


def _stand_in(shape: tuple[int, ...]) -> nn.Module:
    """A weightless (meta) layer of `shape`: the adapter classes read only its kind and sizes."""
    if len(shape) == 2:
        return nn.Linear(shape[1], shape[0], bias=False, device="meta")
    return nn.Conv2d(shape[1], shape[0], tuple(shape[2:]), bias=False, device="meta")


def module_delta(info, name: str, weights: dict[str, torch.Tensor], source: Path) -> torch.Tensor:
    """ΔW (alpha/rank scale included) of one module, rebuilt by the file's own adapter class."""
    for shape in info.module_class.layer_shapes(name, weights):  # likeliest first; the factors load into one
        module = info.module_class(name, _stand_in(shape), 1.0, info.dims[name], info.alphas[name],
                                   **info.module_args)
        # The module was built with the file's alpha (or alpha = rank where the file has none).
        tensors = {**{k: v for k, v in weights.items() if k != "alpha"}, "alpha": module.alpha}
        try:
            module.load_state_dict(tensors, strict=True)
        except RuntimeError:
            continue  # factors shaped or named for another layer shape: try the next candidate
        with torch.no_grad():
            return module.delta_weight().float()
    raise UserError(f"{source}: cannot rebuild ΔW of {name} from its {info.algorithm} tensors "
                    f"({', '.join(sorted(weights))}); the file is damaged or uses a layout we do not read")


def summed_deltas(inputs: list[Path], ratios: list[float], dtype: torch.dtype, lbws=None):
    """(name -> Σ ratio·ΔW in float32, first file's metadata). Inputs are rounded to `dtype` first (sd-scripts'
    --precision); the sums run in float32, which the SVD needs anyway."""
    from networks.files import describe_network_file, read_network_file

    deltas: dict[str, torch.Tensor] = {}
    first_metadata = None
    for path, ratio, weights_of in zip(inputs, ratios, lbws or [None] * len(inputs)):
        weights, metadata = read_network_file(path)
        first_metadata = metadata if first_metadata is None else first_metadata
        info = describe_network_file(weights, source=str(path))
        info.refuse_without_model(path, "svd_merge_lora", "merge it into a checkpoint with merge_lora.py --sd_model")
        if weights_of is not None:  # --lbws: each module's ΔW times its block's weight, as sd-scripts
            weights_of.check(path, info.dims)
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in weights.items():
            module, _, rest = key.partition(".")
            grouped.setdefault(module, {})[rest] = value.to(dtype) if value.is_floating_point() else value
        for name in info.dims:
            delta = module_delta(info, name, grouped[name], path) * ratio
            if weights_of is not None:
                delta = delta * weights_of(name)
            if name in deltas:
                delta = _fit(delta, deltas[name], f"{path}: {name}")
                deltas[name] = deltas[name] + delta
            else:
                deltas[name] = delta
    return deltas, dict(first_metadata or {})


def _fit(delta: torch.Tensor, ref: torch.Tensor, where: str) -> torch.Tensor:
    """delta in ref's form: a Linear and a 1×1 conv delta of the same size are the same layer (SD 2.x proj)."""
    if delta.shape == ref.shape:
        return delta
    if delta.numel() != ref.numel():
        raise UserError(f"{where}: ΔW shape {tuple(delta.shape)} differs from {tuple(ref.shape)} of an earlier file; "
                        "the networks are for different base models (SD 1.x vs 2.x?)")
    return delta.reshape(ref.shape)


def refactor(deltas: dict[str, torch.Tensor], new_rank: int, new_conv_rank: int, *, clamp_quantile: float | None,
             device: str):
    """LoRA tensors of each ΔW's best low-rank approximation (alpha = rank, so up·down is the approximation)."""
    from networks.svd import lora_from_deltas

    return lora_from_deltas(deltas, new_rank, new_conv_rank, clamp_quantile=clamp_quantile, device=device)


def _parse(argv) -> argparse.Namespace:
    parser = make_parser(__doc__)
    add_common_arguments(parser)
    parser.add_argument("--new_rank", type=int, default=4, help="rank of the merged LoRA (default 4)")
    parser.add_argument("--new_conv_rank", type=int, default=None,
                        help="rank for 3×3 convolutions (LoCon; default: --new_rank)")
    parser.add_argument("--clamp_quantile", type=float, default=1.0,
                        help="clip both factors to ± this quantile of |values| (default 1: no clipping; "
                             "sd-scripts always clips at 0.99)")
    return parser.parse_args(argv)


def _check_args(args) -> None:
    for flag in ("new_rank", "new_conv_rank"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag} {value}: a rank must be at least 1")
    if not 0.0 < args.clamp_quantile <= 1.0:
        raise UserError(f"--clamp_quantile {args.clamp_quantile}: must be in (0, 1]; 1 turns clipping off")


@exit_on_user_error
def main(argv=None) -> list:
    args = _parse(argv)
    inputs, ratios = check_common(args)
    _check_args(args)
    dst = Path(args.save_to)
    check_network_output(dst, inputs)
    from networks.files import carried_bundles, save_network_file

    merge_dtype, dtype = merge_dtypes(args)
    deltas, first_metadata = summed_deltas(inputs, ratios, merge_dtype, block_weights(args, len(inputs)))
    conv_rank = args.new_conv_rank if args.new_conv_rank is not None else args.new_rank
    clamp = args.clamp_quantile if args.clamp_quantile < 1.0 else None
    weights, report = refactor(deltas, args.new_rank, conv_rank, clamp_quantile=clamp, device=args.device)
    metadata = network_metadata(weights, first_metadata, inputs, ratios,
                                note=f"svd-merged to rank {args.new_rank} (conv {conv_rank})",
                                minimal=args.no_metadata, title=dst.stem)
    save_network_file({**weights, **carried_bundles(inputs)}, dst, dtype=dtype, metadata=metadata)
    mean = sum(m.retained for m in report) / len(report)
    print(f"merged {len(inputs)} networks into {len(report)} LoRA modules at rank {args.new_rank} "
          f"(conv {conv_rank}): average retained Frobenius norm {mean:.2%}")
    print(f"wrote {dst}")
    return report


if __name__ == "__main__":
    main()
