#!/usr/bin/env python
"""Write the built-in demo dataset (coloured shapes + captions) to a folder, for a first training run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/make_demo_dataset.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.data.demo import make_demo_dataset  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder", help="where to write it (becomes --train_data_dir)")
    parser.add_argument("--count", type=int, default=12)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args(argv)
    out = make_demo_dataset(args.folder, count=args.count, size=args.size)
    print(f"wrote {args.count} images with captions to {out}")


if __name__ == "__main__":
    main()
