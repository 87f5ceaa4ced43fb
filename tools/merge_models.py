#!/usr/bin/env python
"""Merge SD 1.x/2.x or SDXL checkpoints: weighted_sum (1-alpha)*A + alpha*B, add_difference A + alpha*(B - C), or
sd-scripts' tools/merge_models.py command line (--models A B C --ratios 0.5 0.3 0.2 --output merged.safetensors
[--unet_only] [--saving_precision fp16]: the sum of ratio x model). Inputs are .safetensors/.ckpt files or diffusers
folders; the output is a .safetensors/.ckpt file, or a diffusers folder when --out names no such file."""

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
    """The tensors of a full model in its family's single-file layout (other top-level entries dropped): a
    .safetensors/.ckpt file as stored, a diffusers folder (or built-in tiny model) converted as it would be saved."""
    import torch

    from library.models.checkpoint_io import read_state_dict
    from library.models.detect import foreign_kind
    from library.models.family import family_of_tiny

    if Path(path).is_dir() or family_of_tiny(str(path)) is not None:
        from library.models.loading import load_components
        from library.models.saving import to_ldm_state_dict

        parts = load_components(str(path))
        # The stored precision: the loader upcasts to float32, which is exact to undo.
        return to_ldm_state_dict(parts, parts.source_dtype)  # a folder: the precision its UNet is stored in
    sd, _ = read_state_dict(path)
    kind = foreign_kind(list(sd), sd)
    if kind:
        raise UserError(f"{path}: is {kind.split(' (')[0]}; merge only full SD 1.x/2.x single-file checkpoints")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def model_family(path: Path):
    """The family of a model file or folder from its header / model_index.json (None if no family claims it)."""
    import json

    from library.models.checkpoint_io import open_checkpoint
    from library.models.family import family_of_file, family_of_folder, family_of_tiny

    path = Path(path)
    if family_of_tiny(str(path)) is not None:
        return family_of_tiny(str(path))
    if path.is_dir():
        try:
            return family_of_folder(json.loads((path / "model_index.json").read_text()))
        except (OSError, ValueError, AttributeError):
            return None
    with open_checkpoint(path) as file:
        return family_of_file(file.meta)


def input_family(inputs: list[Path]):
    """Model A's family (None if no family claims it: read_model then says what the file is); models of different
    families cannot be merged, which is refused here, from the headers."""
    families = [model_family(path) if path.exists() or not path.suffix else None for path in inputs]
    known = [(path, family) for path, family in zip(inputs, families) if family is not None]
    for path, family in known[1:]:
        if family.name != known[0][1].name and {family.name, known[0][1].name} != {"sd1", "sd2"}:
            raise UserError(f"{path}: is an {family.label} model but {known[0][0]} is an {known[0][1].label} model; "
                            "only models of one family can be merged")
    return families[0]


def check_model_output(dst: Path, inputs: list[Path]) -> None:
    """Like check_output, but a path that is not a .safetensors/.ckpt file is a diffusers folder to write."""
    if dst.suffix.lower() in OUTPUT_SUFFIXES:
        return check_output(dst, inputs)
    if dst.exists() and (not dst.is_dir() or (any(dst.iterdir()) and not (dst / "model_index.json").is_file())):
        raise UserError(f"{dst}: exists and is not a diffusers model folder; refusing to overwrite it, choose "
                        "another output path (or end it in .safetensors / .ckpt for a single file)")
    for src in inputs:
        if src.exists() and dst.exists() and dst.resolve() == src.resolve():
            raise UserError(f"{dst}: is also an input model; refusing to overwrite it, choose another output path")


def write_merged(sd: dict, dst: Path) -> Path:
    """A single file by extension (write_model), else a diffusers folder of the merged model's family."""
    if dst.suffix.lower() in OUTPUT_SUFFIXES:
        return write_model(sd, dst)
    from library.models.checkpoint_io import TensorFile
    from library.models.family import family_of_file
    from library.models.loading import main_dtype
    from library.models.saving import save_diffusers

    family = family_of_file(sd)
    if family is None:
        raise UserError(f"{dst}: the merged tensors are no model family's; write a .safetensors file instead")

    class StateDictFile(TensorFile):  # the merged tensors, read as the loader reads a file
        def load(self, key, dtype=None):
            tensor = sd[key]
            return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor

    dtype = main_dtype(sd)
    file = StateDictFile(dst, {k: v.to("meta") for k, v in sd.items()}, {})
    parts = family.load_single_file(file, str(dst), None, dtype)
    return save_diffusers(parts, dst, precision=None)


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


PRECISION_CHOICES = ("float", "fp16", "bf16")


def _parse(argv) -> argparse.Namespace:
    parser = make_parser(__doc__)
    parser.add_argument("positional_models", nargs="*", default=[], metavar="MODEL",
                        help="A B, or A B C for add_difference")
    parser.add_argument("--mode", choices=("weighted_sum", "add_difference"), default="weighted_sum")
    parser.add_argument("--alpha", type=float, default=0.5, help="share of B (weighted_sum) or multiplier of B-C "
                        "(add_difference); default 0.5")
    parser.add_argument("--out", default=None, help="merged model path (.safetensors or .ckpt; else a diffusers "
                        "folder)")
    # sd-scripts' tools/merge_models.py flags: its command lines run unchanged.
    parser.add_argument("--models", nargs="+", default=None, help="sd-scripts: models to sum (ratio x model)")
    parser.add_argument("--ratios", nargs="+", type=float, default=None,
                        help="sd-scripts: one ratio per model (default: equal, 1/N each); not normalised")
    parser.add_argument("--output", default=None, help="sd-scripts: output model (.safetensors is appended when "
                        "missing)")
    parser.add_argument("--unet_only", action="store_true", default=False,
                        help="sd-scripts: merge the UNet only; VAE and text encoders come from the first model")
    parser.add_argument("--device", default="cpu", help="sd-scripts: device for the arithmetic (default cpu)")
    parser.add_argument("--precision", choices=PRECISION_CHOICES, default="float",
                        help="sd-scripts: precision of the arithmetic (default float)")
    parser.add_argument("--saving_precision", choices=PRECISION_CHOICES, default=None,
                        help="sd-scripts: precision of the saved model (default float with --models, else model A's)")
    parser.add_argument("--show_skipped", action="store_true", default=False,
                        help="sd-scripts: list the keys of later models that the first model lacks")
    args = parser.parse_args(argv)
    if args.models and args.positional_models:
        raise UserError("give the models either as positional arguments or after --models, not both")
    if args.out and args.output:
        raise UserError("give the output path once: --out (this tool) or --output (sd-scripts)")
    args.sd_scripts_form = bool(args.models)
    args.models = args.models or args.positional_models
    if not args.models:
        raise UserError("no models given: pass A B (or --models A B ...) and --out merged.safetensors")
    if args.output:
        # sd-scripts always writes safetensors and appends the extension when it is missing.
        args.out = args.output if args.output.endswith(".safetensors") else args.output + ".safetensors"
    if not args.out:
        raise UserError("the following arguments are required: --out (or sd-scripts' --output)")
    if args.save_precision and args.saving_precision and args.save_precision != args.saving_precision:
        raise UserError(f"--save_precision {args.save_precision} and --saving_precision {args.saving_precision} "
                        "disagree; give one of them")
    args.save_precision = args.save_precision or args.saving_precision
    if args.sd_scripts_form or args.ratios is not None:
        if args.mode != "weighted_sum":
            raise UserError(f"--mode {args.mode} takes A B C and --alpha; --models/--ratios sum ratio x model")
        if args.ratios is not None and len(args.ratios) != len(args.models):
            raise UserError(f"--ratios: got {len(args.ratios)} values for {len(args.models)} models; give one ratio "
                            "per model")
        if args.sd_scripts_form and args.save_precision is None:
            args.save_precision = "float"  # sd-scripts' --saving_precision default
        return args
    if args.unet_only:
        raise UserError("--unet_only applies to the sd-scripts form: --models A B --ratios ...")
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
    check_model_output(dst, inputs)
    input_family(inputs)
    from library.models.merging import add_difference, sum_of_models, weighted_sum
    from library.models.saving import PRECISIONS, save_dtype

    dtype = save_dtype(args.save_precision, None)  # None: keep model A's dtype
    models = [read_model(path) for path in inputs]
    if args.sd_scripts_form or args.ratios is not None:
        ratios = args.ratios or [1.0 / len(models)] * len(models)
        merged = sum_of_models(models, ratios, dtype=dtype, compute_dtype=PRECISIONS[args.precision],
                               unet_only=args.unet_only, device=args.device)
        what = " + ".join(f"{r:g} x {p.name}" for r, p in zip(ratios, inputs))
        mode = "sum" + (", UNet only" if args.unet_only else "")
    elif args.mode == "add_difference":
        merged = add_difference(*models, args.alpha, dtype=dtype)
        what, mode = f"{inputs[0].name} + {args.alpha:g} x ({inputs[1].name} - {inputs[2].name})", args.mode
    else:
        merged = weighted_sum(*models, args.alpha, dtype=dtype)
        what, mode = f"{1 - args.alpha:g} x {inputs[0].name} + {args.alpha:g} x {inputs[1].name}", args.mode
    warn_missing(merged)
    if args.show_skipped:
        for key in merged.ignored:
            print(f"skipped (not in {inputs[0].name}): {key}")
    write_merged(merged.state_dict, dst)
    print(f"merged {what} ({mode}, {len(merged.state_dict)} tensors) -> wrote {dst}")


if __name__ == "__main__":
    main()
