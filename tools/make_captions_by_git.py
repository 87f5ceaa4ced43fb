#!/usr/bin/env python
"""Caption images with GIT, as sd-scripts' finetune/make_captions_by_git.py does (transformers' GIT model).

--model_id is a transformers GIT folder (loaded offline) or a hub id (default microsoft/git-large-textcaps, which
transformers downloads or takes from its cache). Each image gets `<stem><caption_extension>` beside it; images that
already have one are skipped unless --overwrite, so an interrupted run resumes. Unreadable images are reported and
skipped. --remove_words cuts the text GIT claims to read in a picture ("a sign that says stop" -> "a sign").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/make_captions_by_git.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.data.captioning import GIT, add_common_arguments, git_captioner, remove_words, run_captioning, tidy  # noqa: E402
from library.errors import UserError, exit_on_user_error  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--model_id", default=GIT.example,
                        help="transformers GIT folder, or a hub id (downloaded unless cached)")
    parser.add_argument("--max_length", type=int, default=50, help="most tokens in a caption")
    parser.add_argument("--remove_words", action="store_true",
                        help='remove phrases like `with the words "xxx"` and `that says xxx` from the captions')
    return parser


@exit_on_user_error
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.max_length < 2:
        raise UserError(f"--max_length {args.max_length}: give 2 or more (the first token is GIT's start token)")

    def captioner(model, processor, device):
        return git_captioner(model, processor, device, max_length=args.max_length)

    run_captioning(args, GIT, args.model_id, captioner, clean=remove_words if args.remove_words else tidy)


if __name__ == "__main__":
    main()
