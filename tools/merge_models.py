#!/usr/bin/env python
"""Merge SD 1.x/2.x single-file checkpoints like sd-scripts: weighted_sum (1-alpha)*A + alpha*B, or
add_difference A + alpha*(B - C). Inputs and --out are .safetensors or .ckpt, chosen by extension."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/merge_models.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.config.declarations import OPTIONS  # noqa: E402
from library.config.resolve import build_parser  # noqa: E402
from library.errors import UserError, exit_on_user_error  # noqa: E402

OUTPUT_SUFFIXES = (".safetensors", ".ckpt")


def make_parser(description: str) -> argparse.ArgumentParser:
    """The project's parser (usage mistakes are one-line UserErrors) with the trainers' --save_precision."""
    parser = build_parser(description, {o.name: o for o in OPTIONS if o.name == "save_precision"})
    parser.allow_abbrev = False  # --out must never quietly match --output_blocks, nor --dump a longer flag
    parser.set_defaults(save_precision=None)  # build_parser leaves unset flags absent
    return parser


def check_output(dst: Path, inputs: list[Path]) -> None:
    """Fail before the (slow) reading when the output path is unusable."""
    if dst.suffix.lower() not in OUTPUT_SUFFIXES:
        raise UserError(f"{dst}: the merged model must be written as .safetensors or .ckpt; change the extension")
    for src in inputs:
        if src.exists() and dst.exists() and dst.resolve() == src.resolve():
            raise UserError(f"{dst}: is also an input model; refusing to overwrite it, choose another output path")
    from library.models.saving import refuse_foreign_overwrite

    refuse_foreign_overwrite(dst)


def read_model(path: Path) -> dict:
    """The tensors of a full SD 1.x/2.x single-file checkpoint (other top-level entries dropped)."""
    import torch

    from library.models.checkpoint_io import read_state_dict
    from library.models.detect import foreign_kind

    sd, _ = read_state_dict(path)
    kind = foreign_kind(list(sd), sd)
    if kind:
        raise UserError(f"{path}: is {kind.split(' (')[0]}; merge only full SD 1.x/2.x single-file checkpoints")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def write_model(sd: dict, dst: Path) -> Path:
    """Write atomically, as .safetensors or a Lightning-style .ckpt according to the extension."""
    from safetensors.torch import save_file

    from library.formats.a1111_pickle import save_pickle
    from library.safe_write import write_atomically

    # safetensors refuses views and shared storage; a contiguous copy of those is cheap insurance.
    sd = {k: v.contiguous().clone() if not v.is_contiguous() or v.storage_offset() else v for k, v in sd.items()}
    if dst.suffix.lower() == ".safetensors":
        return write_atomically(dst, lambda tmp: save_file(sd, str(tmp), metadata={"format": "pt"}))
    # A1111's safe unpickler refuses torch.save's extra zip entries; write only the ones it allows.
    return save_pickle({"state_dict": sd}, dst)


def warn_missing(merged) -> None:
    if merged.missing:
        print(f"warning: {len(merged.missing)} tensors of model A are missing from the other model(s) and were "
              f"copied from A (first: {merged.missing[0]})", file=sys.stderr)


def _parse(argv) -> argparse.Namespace:
    parser = make_parser(__doc__)
    parser.add_argument("models", nargs="+", metavar="MODEL", help="A B, or A B C for add_difference")
    parser.add_argument("--mode", choices=("weighted_sum", "add_difference"), default="weighted_sum")
    parser.add_argument("--alpha", type=float, default=0.5, help="share of B (weighted_sum) or multiplier of B-C "
                        "(add_difference); default 0.5")
    parser.add_argument("--out", required=True, help="merged model path (.safetensors or .ckpt)")
    args = parser.parse_args(argv)
    wanted = 3 if args.mode == "add_difference" else 2
    if len(args.models) != wanted:
        need = "A B C (C is subtracted from B)" if wanted == 3 else "A B"
        raise UserError(f"--mode {args.mode}: got {len(args.models)} models, expected {wanted}; pass {need}")
    return args


@exit_on_user_error
def main(argv=None) -> None:
    args = _parse(argv)
    inputs, dst = [Path(m) for m in args.models], Path(args.out)
    from library.console import quiet_libraries

    quiet_libraries()  # the savers' imports pull in diffusers/transformers, whose info logs are noise here
    check_output(dst, inputs)
    from library.models.merging import add_difference, weighted_sum
    from library.models.saving import save_dtype

    dtype = save_dtype(args.save_precision, None)  # None: keep model A's dtype
    models = [read_model(path) for path in inputs]
    if args.mode == "add_difference":
        merged = add_difference(*models, args.alpha, dtype=dtype)
        what = f"{inputs[0].name} + {args.alpha:g} x ({inputs[1].name} - {inputs[2].name})"
    else:
        merged = weighted_sum(*models, args.alpha, dtype=dtype)
        what = f"{1 - args.alpha:g} x {inputs[0].name} + {args.alpha:g} x {inputs[1].name}"
    warn_missing(merged)
    write_model(merged.state_dict, dst)
    print(f"merged {what} ({args.mode}, {len(merged.state_dict)} tensors) -> wrote {dst}")


if __name__ == "__main__":
    main()
