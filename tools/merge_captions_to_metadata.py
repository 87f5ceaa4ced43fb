#!/usr/bin/env python
"""Merge each image's caption file into a fine-tuning metadata JSON (sd-scripts' finetune/merge_captions_to_metadata.py).

    python tools/merge_captions_to_metadata.py TRAIN_DATA_DIR OUT_JSON [--in_json IN_JSON] [--caption_extension .caption]

Each image's `<stem><caption_extension>` text (stripped) becomes `"caption"` of its entry, keyed by stem (or by path with
--full_path); other fields of existing entries (tags, train_resolution) are kept. Without --in_json an existing
OUT_JSON is read and updated. Images without a caption file are reported and skipped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/merge_captions_to_metadata.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.errors import exit_on_user_error  # noqa: E402


def build_parser(description: str, default_extension: str, what: str) -> argparse.ArgumentParser:
    """The command line both merge tools share (sd-scripts' flags, positional order and defaults)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("train_data_dir", help="folder of the training images")
    parser.add_argument("out_json", help="metadata file to write")
    parser.add_argument("--in_json", help="metadata file to read and extend (default: OUT_JSON when it exists)")
    parser.add_argument("--caption_extension", default=default_extension,
                        help=f"extension of the {what} files (default {default_extension})")
    parser.add_argument("--full_path", action="store_true",
                        help="key the images by their paths (extension included) instead of their stems, so one "
                             "metadata file can hold several folders")
    parser.add_argument("--recursive", action="store_true", help="look in the subfolders too (needs --full_path)")
    parser.add_argument("--debug", action="store_true", help=f"print each image key and its {what}")
    return parser


def run_merge(args: argparse.Namespace, *, field_name: str, what: str, tool: str) -> dict:
    """List the images, merge their `field_name` files into the metadata, write it, print the summary."""
    from library.data import finetune_metadata as fm
    from library.data.prep import frequency_lines, list_images, tag_counts, write_json
    from library.errors import UserError

    if args.recursive and not args.full_path:
        raise UserError("--recursive needs --full_path: images of different folders may share a stem, and keys by "
                        "stem would overwrite each other (sd-scripts refuses it too)")
    images = list_images(args.train_data_dir, recursive=args.recursive)
    fm.check_unique_keys(images, full_path=args.full_path)
    in_json = args.in_json
    if in_json is None and Path(args.out_json).is_file():
        in_json = args.out_json  # sd-scripts: an existing OUT_JSON is read and updated
    metadata = fm.read_metadata(in_json) if in_json is not None else {}
    print(f"found {len(images)} images; " + (f"updating {in_json}" if in_json else "new metadata"))
    echo = (lambda key, text: print(key, text)) if args.debug else None
    result = fm.merge_text_files(metadata, images, field_name=field_name, extension=args.caption_extension,
                                 full_path=args.full_path, on_text=echo)
    write_json(Path(args.out_json), metadata)
    print(f"{tool}: {len(result.merged)} {what} files merged into {args.out_json} ({len(result.added)} new entries, "
          f"{len(result.merged) - len(result.added)} updated), {len(result.missing)} images without a "
          f"{args.caption_extension} file (skipped), {len(metadata)} entries in all")
    if result.missing:
        print(f"  without {args.caption_extension}: " + ", ".join(str(p) for p in result.missing[:5])
              + (f" … and {len(result.missing) - 5} more" if len(result.missing) > 5 else ""))
    if field_name == "tags":
        for line in frequency_lines(tag_counts(metadata[key]["tags"] for key in result.merged)):
            print(line)
    return metadata


@exit_on_user_error
def main(argv=None) -> dict:
    parser = build_parser(__doc__, ".caption", "caption")
    # sd-scripts' old misspelling, kept for command lines written against it.
    parser.add_argument("--caption_extention", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.caption_extention is not None:
        args.caption_extension = args.caption_extention
    return run_merge(args, field_name="caption", what="caption", tool="merge_captions_to_metadata")


if __name__ == "__main__":
    main()
