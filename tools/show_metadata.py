#!/usr/bin/env python
"""Print a .safetensors file's metadata (its `__metadata__` header): one `key: value` line per key, sorted."""

from __future__ import annotations

import argparse
import json
import sys
import zipfile
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/show_metadata.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.errors import UserError, exit_on_user_error  # noqa: E402
from library.models.checkpoint_io import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, open_checkpoint  # noqa: E402

MAX_CHARS = 200  # a thumbnail's base64 or a long comment is cut here
MAX_JSON_LINES = 60  # ss_tag_frequency of a big dataset runs to thousands of lines


@exit_on_user_error
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("file", nargs="?", help=".safetensors file (a .ckpt/.pt has no metadata header)")
    parser.add_argument("--model", help="the same file, as sd-scripts' show_metadata.py takes it")
    parser.add_argument("--json", action="store_true",
                        help="print the metadata as one JSON object, values holding JSON objects/arrays unpacked")
    args = parser.parse_args(argv)
    if bool(args.file) == bool(args.model):
        raise UserError("give the file once: show_metadata.py FILE (or --model FILE, as in sd-scripts)")
    path = Path(args.file or args.model)
    metadata = read_metadata(path)
    if metadata is None:
        note = f"{path}: a {path.suffix} torch pickle has no metadata header (only .safetensors files carry one)"
        # With --json stdout stays parseable: the note goes to stderr and the (empty) metadata to stdout.
        print(note, file=sys.stderr if args.json else sys.stdout)
        if args.json:
            print("{}")
    elif args.json:
        print(json.dumps({key: parsed(value) for key, value in sorted(metadata.items())}, indent=2, ensure_ascii=False))
    elif not metadata:
        print(f"{path}: no metadata (the safetensors header has no __metadata__ entries)")
    else:
        for key in sorted(metadata):
            print(f"{key}: {shown(metadata[key])}")


def read_metadata(path: Path) -> dict[str, str] | None:
    """The header's metadata (header read only, the tensors are not), or None for a torch pickle."""
    if path.suffix.lower() in SAFETENSORS_SUFFIXES or not path.is_file():
        with open_checkpoint(path) as file:  # checks the path and the header; missing or corrupt -> UserError
            return dict(file.metadata)
    if not _looks_like_torch_pickle(path):
        raise UserError(f"{path}: neither a .safetensors file nor a torch checkpoint; pass a .safetensors file")
    return None


def _looks_like_torch_pickle(path: Path) -> bool:
    # Zip (torch >= 1.6) or a bare pickle (protocol byte 0x80): enough to say "no header" without unpickling GBs.
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        return f.read(1) == b"\x80" and path.suffix.lower() in PICKLE_SUFFIXES


def parsed(value: str):
    """A value holding a JSON object or array, decoded; anything else (numbers too) stays the string it is."""
    if isinstance(value, str) and value.lstrip()[:1] in ("{", "["):
        try:
            decoded = json.loads(value)
        except ValueError:
            return value
        if isinstance(decoded, (dict, list)):
            return decoded
    return value


def shown(value: str) -> str:
    decoded = parsed(value)
    if not isinstance(decoded, str):
        lines = json.dumps(decoded, indent=2, ensure_ascii=False).splitlines()
        if len(lines) > MAX_JSON_LINES:
            lines = lines[:MAX_JSON_LINES] + [f"... ({len(lines) - MAX_JSON_LINES} more lines; --json shows all)"]
        return "\n  ".join(lines)
    one_line = value.replace("\n", "\\n")  # a multi-line comment must not break the one-key-a-line layout
    if len(one_line) > MAX_CHARS:
        return f"{one_line[:MAX_CHARS]}... ({len(value)} chars in all; --json shows all)"
    return one_line


if __name__ == "__main__":
    main()
