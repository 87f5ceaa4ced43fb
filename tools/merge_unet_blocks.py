#!/usr/bin/env python
"""Merge two SD 1.x/2.x or SDXL checkpoints with a ratio per UNet block: each ratio is the share of the SECOND
model, (1-r)*A + r*B; layers no option names (text encoders, VAE, unnamed UNet parts) use --base_alpha.
Ratios are "INDEX:RATIO" lists, e.g. --input_blocks "0:0.5, 1:0.5, 11:0.3" (SD 1.x/2.x: input/output_blocks 0-11;
SDXL: 0-8, plus --label_emb), or --block_ratios with one ratio per block in sd-scripts' order (SD 1.x/2.x: 25 =
input_blocks.0-11, middle_block, output_blocks.0-11; SDXL: --block_lr's 23 = time_embed+label_emb,
input_blocks.0-8, middle_block.0-2, output_blocks.0-8, out). Inputs: files or diffusers folders; output by
extension (.safetensors/.ckpt), else a diffusers folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/merge_unet_blocks.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.errors import UserError, exit_on_user_error  # noqa: E402
from tools.merge_models import (check_model_output, input_family, make_parser, read_model,  # noqa: E402
                                warn_missing, write_merged)

BLOCK_HELP = {
    "input_blocks": "ratios for model.diffusion_model.input_blocks.<i> (0 is conv_in; SD 1.x/2.x 0-11, SDXL 0-8)",
    "middle_blocks": "ratios for model.diffusion_model.middle_block.<0-2>",
    "output_blocks": "ratios for model.diffusion_model.output_blocks.<i> (SD 1.x/2.x 0-11, SDXL 0-8)",
    "out": "ratios for model.diffusion_model.out.<0|2> (0: final GroupNorm, 2: conv_out)",
    "time_embed": "ratios for model.diffusion_model.time_embed.<0|2> (the two Linear layers)",
    "label_emb": "SDXL only: ratios for model.diffusion_model.label_emb.0.<0|2> (the size/pooled-text embedding's "
                 "two Linear layers)",
}


def _parse(argv) -> argparse.Namespace:
    parser = make_parser(__doc__)
    parser.add_argument("model_a", help="first model (ratio 0 keeps it)")
    parser.add_argument("model_b", help="second model (ratio 1 takes it)")
    for option, help_text in BLOCK_HELP.items():
        parser.add_argument(f"--{option}", default="", metavar='"I:R, ..."', help=help_text)
    parser.add_argument("--block_ratios", default="", metavar='"R0,R1,..."',
                        help="one ratio per sd-scripts block (25 for SD 1.x/2.x, 23 for SDXL in --block_lr order); "
                             "instead of the per-block options")
    parser.add_argument("--base_alpha", type=float, default=0.5,
                        help="share of the second model for every layer no ratio names (default 0.5)")
    parser.add_argument("--dump_path", required=True, help="merged model path (.safetensors or .ckpt; else a "
                        "diffusers folder)")
    return parser.parse_args(argv)


def _ratios(args, layout) -> dict:
    from library.models.merging import parse_block_list, parse_block_ratios

    given = [option for option in BLOCK_HELP if getattr(args, option)]
    if args.block_ratios:
        if given:
            raise UserError(f"--block_ratios sets every block; drop --{given[0]} (or give per-block options only)")
        return parse_block_list(args.block_ratios, option="--block_ratios", layout=layout)
    return {option: parse_block_ratios(getattr(args, option), option=f"--{option}", layout=layout)
            for option in BLOCK_HELP if getattr(args, option) or option in layout.blocks}


@exit_on_user_error
def main(argv=None) -> None:
    args = _parse(argv)
    from library.models.merging import layout_of, parse_block_ratios

    # Bad ratio strings are found before the models are read: a typo should not cost a minute of loading.
    for option in BLOCK_HELP:  # the syntax now; the indices once model A's family is known
        parse_block_ratios(getattr(args, option), option=f"--{option}", check_indices=False)
    inputs, dst = [Path(args.model_a), Path(args.model_b)], Path(args.dump_path)
    from library.console import quiet_libraries

    quiet_libraries()  # the savers' imports pull in diffusers/transformers, whose info logs are noise here
    check_model_output(dst, inputs)
    # The block layout is model A's family's (read from its header): SD 1.x/2.x or SDXL.
    layout = layout_of(input_family(inputs))
    ratios = _ratios(args, layout)
    from library.models.merging import merge_by_blocks
    from library.models.saving import save_dtype

    dtype = save_dtype(args.save_precision, None)  # None: keep model A's dtype
    a, b = (read_model(path) for path in inputs)
    merged = merge_by_blocks(a, b, **ratios, base_alpha=args.base_alpha, dtype=dtype, layout=layout)
    warn_missing(merged)
    write_merged(merged.state_dict, dst)
    named = sum(len(r) for r in ratios.values())
    print(f"merged {inputs[0].name} and {inputs[1].name} by {layout.label} UNet block ({named} block ratios, "
          f"base_alpha {args.base_alpha:g}, {len(merged.state_dict)} tensors) -> wrote {dst}")


if __name__ == "__main__":
    main()
