#!/usr/bin/env python
"""Clean the captions and tags of a fine-tuning metadata JSON (sd-scripts' finetune/clean_captions_and_tags.py).

    python tools/clean_captions_and_tags.py IN_JSON OUT_JSON [--debug]

Tags: underscores become spaces (`^_^` kept), DeepDanbooru's rating tags are dropped, with several girls/boys the
per-person tags that conflict (two hair colours, eye colours, hair lengths, cuts, sleeves, hairstyles) are dropped,
and a tag is dropped when a longer tag ends with it ("shirt" beside "white shirt"). Captions: BLIP's wording for anime
pictures is rewritten ("anime woman" -> "girl", "a cartoon drawing" -> "a drawing", ...). IN_JSON and OUT_JSON may
be the same file. sd-scripts' old form `TRAIN_DATA_DIR IN_JSON OUT_JSON` still works (the folder is not used).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/clean_captions_and_tags.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.data import finetune_metadata as fm  # noqa: E402
from library.data.prep import frequency_lines, tag_counts, write_json  # noqa: E402
from library.errors import UserError, exit_on_user_error  # noqa: E402


@exit_on_user_error
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("in_json", help="metadata file to read")
    parser.add_argument("out_json", help="metadata file to write (may be IN_JSON)")
    parser.add_argument("--debug", action="store_true", help="print each changed caption and tag list, before/after")
    args, unknown = parser.parse_known_args(argv)
    if len(unknown) == 1 and not unknown[0].startswith("-"):
        # sd-scripts' old three-argument form: train_data_dir in_json out_json.
        print(f"note: the first argument ({args.in_json}) is no longer used; give only IN_JSON OUT_JSON",
              file=sys.stderr)
        args.in_json, args.out_json = args.out_json, unknown[0]
    elif unknown:
        raise UserError(f"unrecognised arguments: {' '.join(unknown)} (usage: clean_captions_and_tags.py IN_JSON "
                        "OUT_JSON [--debug])")
    metadata = fm.read_metadata(args.in_json, flag="in_json")
    result = fm.clean_metadata(metadata)
    if args.debug:
        for key, before, after in result.tags_changed + result.captions_changed:
            print(f"{key}\n  FROM: {before}\n  TO:   {after}")
    write_json(Path(args.out_json), metadata)
    _print_summary(args.out_json, metadata, result)
    return metadata


def _print_summary(out_json, metadata: dict, result: fm.CleanResult) -> None:
    print(f"clean_captions_and_tags: {len(metadata)} entries written to {out_json}: tags changed in "
          f"{len(result.tags_changed)}, captions changed in {len(result.captions_changed)}")
    for keys, what in ((result.without_tags, "no tags"), (result.without_caption, "no caption"),
                       (result.several_ratings, "several rating tags (all dropped)")):
        if keys:
            shown = ", ".join(keys[:5]) + (f" … and {len(keys) - 5} more" if len(keys) > 5 else "")
            print(f"  {len(keys)} entries with {what}: {shown}")
    for line in frequency_lines(tag_counts(entry.get("tags") for entry in metadata.values())):
        print(line)


if __name__ == "__main__":
    main()
