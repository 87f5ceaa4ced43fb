#!/usr/bin/env python
"""Caption images with BLIP, as sd-scripts' finetune/make_captions.py does, on transformers' BLIP model.

The model is a transformers BLIP captioning folder (e.g. `huggingface-cli download
Salesforce/blip-image-captioning-large --local-dir models/blip-large`), loaded offline; a hub id downloads only
because the user named it. Each image gets `<stem><caption_extension>` beside it; images that already have one are
skipped unless --overwrite, so an interrupted run resumes. Unreadable images are reported and skipped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/make_captions.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.data.captioning import BLIP, add_common_arguments, blip_captioner, run_captioning  # noqa: E402
from library.errors import UserError, exit_on_user_error  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--caption_weights", default=None,
                        help="transformers BLIP captioning folder, or a hub id such as "
                             "Salesforce/blip-image-captioning-large (downloaded); sd-scripts' .pth is not read")
    parser.add_argument("--beam_search", action="store_true", help="beam search (default: nucleus sampling)")
    parser.add_argument("--num_beams", type=int, default=1, help="beams in beam search")
    parser.add_argument("--top_p", type=float, default=0.9, help="top_p of nucleus sampling")
    parser.add_argument("--max_length", type=int, default=75,
                        help="most tokens in a caption, counting BLIP's 'a picture of' prompt as sd-scripts does")
    parser.add_argument("--min_length", type=int, default=5, help="fewest tokens in a caption, prompt included")
    parser.add_argument("--seed", type=int, default=42, help="seed of the sampling, for reproducible captions")
    return parser


@exit_on_user_error
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.num_beams < 1:
        raise UserError(f"--num_beams {args.num_beams}: give 1 or more")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top_p {args.top_p}: give a number above 0 and at most 1")
    if args.min_length > args.max_length:
        raise UserError(f"--min_length {args.min_length} is above --max_length {args.max_length}; lower it")

    def captioner(model, processor, device):
        return blip_captioner(model, processor, device, beam_search=args.beam_search, num_beams=args.num_beams,
                              top_p=args.top_p, max_length=args.max_length, min_length=args.min_length)

    run_captioning(args, BLIP, args.caption_weights, captioner, seed=args.seed)


if __name__ == "__main__":
    main()
