#!/usr/bin/env python
"""Merge two SD 1.x/2.x single-file checkpoints with a ratio per UNet block: each ratio is the share of the SECOND
model, (1-r)*A + r*B; layers no option names (text encoder, VAE, unnamed UNet parts) use --base_alpha.
Ratios are "INDEX:RATIO" lists, e.g. --input_blocks "0:0.5, 1:0.5, 11:0.3"; in/out format by extension."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/merge_unet_blocks.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.errors import exit_on_user_error  # noqa: E402
from tools.merge_models import check_output, make_parser, read_model, warn_missing, write_model  # noqa: E402

BLOCK_HELP = {
    "input_blocks": "ratios for model.diffusion_model.input_blocks.<0-11> (0 is conv_in)",
    "middle_blocks": "ratios for model.diffusion_model.middle_block.<0-2>",
    "output_blocks": "ratios for model.diffusion_model.output_blocks.<0-11>",
    "out": "ratios for model.diffusion_model.out.<0|2> (0: final GroupNorm, 2: conv_out)",
    "time_embed": "ratios for model.diffusion_model.time_embed.<0|2> (the two Linear layers)",
}


def _parse(argv) -> argparse.Namespace:
    parser = make_parser(__doc__)
    parser.add_argument("model_a", help="first model (ratio 0 keeps it)")
    parser.add_argument("model_b", help="second model (ratio 1 takes it)")
    for option, help_text in BLOCK_HELP.items():
        parser.add_argument(f"--{option}", default="", metavar='"I:R, ..."', help=help_text)
    parser.add_argument("--base_alpha", type=float, default=0.5,
                        help="share of the second model for every layer no ratio names (default 0.5)")
    parser.add_argument("--dump_path", required=True, help="merged model path (.safetensors or .ckpt)")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv=None) -> None:
    args = _parse(argv)
    from library.models.merging import merge_by_blocks, parse_block_ratios

    # Bad ratio strings are found before the models are read: a typo should not cost a minute of loading.
    ratios = {option: parse_block_ratios(getattr(args, option), option=f"--{option}") for option in BLOCK_HELP}
    inputs, dst = [Path(args.model_a), Path(args.model_b)], Path(args.dump_path)
    from library.console import quiet_libraries

    quiet_libraries()  # the savers' imports pull in diffusers/transformers, whose info logs are noise here
    check_output(dst, inputs)
    from library.models.saving import save_dtype

    dtype = save_dtype(args.save_precision, None)  # None: keep model A's dtype
    a, b = (read_model(path) for path in inputs)
    merged = merge_by_blocks(a, b, **ratios, base_alpha=args.base_alpha, dtype=dtype)
    warn_missing(merged)
    write_model(merged.state_dict, dst)
    named = sum(len(r) for r in ratios.values())
    print(f"merged {inputs[0].name} and {inputs[1].name} by UNet block ({named} block ratios, base_alpha "
          f"{args.base_alpha:g}, {len(merged.state_dict)} tensors) -> wrote {dst}")


if __name__ == "__main__":
    main()
