#!/usr/bin/env python
"""Convert an SD 1.x/2.x or SDXL model: the form of DST decides the output — a folder is diffusers, a
.safetensors/.ckpt path a single file — so single-file <-> diffusers, .ckpt <-> .safetensors and precision changes
are one command. Without --save_precision the weights keep the precision they are stored in."""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/convert_model.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.config.declarations import OPTIONS  # noqa: E402
from library.config.resolve import parse_tool_args  # noqa: E402
from library.console import quiet_libraries  # noqa: E402
from library.errors import exit_on_user_error  # noqa: E402

FLAGS = ("v2", "v_parameterization", "vae", "tokenizer", "save_precision")
POSITIONALS = (("src", "model to read: .safetensors/.ckpt file, diffusers folder or hub id"),
               ("dst", "where to write: a folder (diffusers) or a .safetensors/.ckpt path"))


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_tool_args(argv, __doc__, OPTIONS, FLAGS, POSITIONALS)
    quiet_libraries()
    from library.models.loading import load_components
    from library.models.saving import save_model

    parts = load_components(args.src, options=args, v_parameterization=args.v_parameterization,
                            vae=args.vae, tokenizer=args.tokenizer)
    print(parts.describe())
    precision = args.save_precision
    dst = save_model(parts, args.dst, precision=precision)
    print(f"wrote {dst}")


if __name__ == "__main__":
    main()
