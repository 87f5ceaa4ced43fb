#!/usr/bin/env python
"""Merge each image's tag file (WD14/DeepDanbooru tagger output) into a fine-tuning metadata JSON (sd-scripts'
finetune/merge_dd_tags_to_metadata.py).

    python tools/merge_dd_tags_to_metadata.py TRAIN_DATA_DIR OUT_JSON [--in_json IN_JSON] [--caption_extension .txt]

Each image's `<stem><caption_extension>` text (stripped) becomes `"tags"` of its entry, keyed by stem (or by path with
--full_path); other fields of existing entries (caption, train_resolution) are kept. Without --in_json an existing
OUT_JSON is read and updated. Images without a tag file are reported and skipped.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/merge_dd_tags_to_metadata.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.errors import exit_on_user_error  # noqa: E402
from tools.merge_captions_to_metadata import build_parser, run_merge  # noqa: E402


@exit_on_user_error
def main(argv=None) -> dict:
    args = build_parser(__doc__, ".txt", "tag").parse_args(argv)
    return run_merge(args, field_name="tags", what="tag", tool="merge_dd_tags_to_metadata")


if __name__ == "__main__":
    main()
