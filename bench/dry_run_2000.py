#!/usr/bin/env python
"""Benchmark: --dry_run over 2,000 small generated images (plus one corrupt PNG) — target: under 10 s, no model loaded.

Run from the project root: `python bench/dry_run_2000.py [--images 2000]`. Prints the wall time of the whole
command (interpreter start included) and whether the corrupt image was reported by name.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.helpers import make_image_folder  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        train = Path(tmp) / "train"
        per_folder = args.images // 4
        for i, tokens in enumerate(["sks dog", "ohwx cat", "zkz bird", "qwe fox"]):
            make_image_folder(train, repeats=5 + i, class_tokens=tokens, count=per_folder, seed=i,
                              caption_extension=".txt", sizes=((64, 64), (96, 64), (64, 96), (128, 80)))
        corrupt = train / "5_sks dog" / "corrupt.png"
        corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
        cmd = [sys.executable, "train_network.py", "--dry_run", "--train_data_dir", str(train),
               "--caption_extension", ".txt", "--resolution", "512", "--enable_bucket", "--train_batch_size", "4"]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        elapsed = time.perf_counter() - start
    print(proc.stdout[-1500:])
    print(f"dry run over {args.images} images: {elapsed:.2f} s (exit {proc.returncode}); "
          f"corrupt PNG reported by name: {'corrupt.png' in proc.stdout}")


if __name__ == "__main__":
    main()
