#!/usr/bin/env python
"""Benchmark train_db.py: a full fine-tune of SD 1.5 shapes — seconds per step, time to first step, peak RSS.

    python bench/train_db_step.py          # 256 px, batch 1, fp32, text encoder frozen: AdamW, AdamW8bit, AdamW8bit fused
    python bench/train_db_step.py --optimizer AdamW8bit --fused --repeat 3

Settings as issue 6 names them: gradient checkpointing, cached latents, --stop_text_encoder_training -1. The
random SD 1.5-shaped model and the 8 images are bench/train_step.py's (written once to bench/.cache/).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_step import CACHE, dataset, full_size_checkpoint, median_of, run_child  # noqa: E402


def run_db(optimizer: str, fused: bool, resolution: int, batch: int, steps: int) -> dict:
    cmd = [sys.executable, "train_db.py", "--pretrained_model_name_or_path", str(full_size_checkpoint()),
           "--train_data_dir", str(dataset(resolution)), "--caption_extension", ".txt", "--resolution", str(resolution),
           "--train_batch_size", str(batch), "--max_train_steps", str(steps), "--optimizer_type", optimizer,
           "--stop_text_encoder_training", "-1", "--gradient_checkpointing", "--cache_latents",
           "--learning_rate", "1e-6", "--output_dir", str(CACHE / "out-db"), "--output_name", "bench-db",
           "--save_model_as", "safetensors", "--seed", "0", "--max_data_loader_n_workers", "0"]
    return run_child(cmd + (["--fused_backward_pass"] if fused else []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizer", action="append", help="AdamW, AdamW8bit, ... (default: the three below)")
    parser.add_argument("--fused", action="store_true", help="with --fused_backward_pass")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each; figures are medians, with ranges")
    args = parser.parse_args()
    configs = [(name, args.fused) for name in args.optimizer] if args.optimizer else \
        [("AdamW", False), ("AdamW8bit", False), ("AdamW8bit", True)]
    for optimizer, fused in configs:
        runs = [run_db(optimizer, fused, args.resolution, args.batch, args.steps) for _ in range(args.repeat)]
        print(json.dumps({"method": "train_db", "model": "sd15", "optimizer": optimizer,
                          "fused_backward_pass": fused, "resolution": args.resolution,
                          "batch": args.batch, "steps": args.steps, "runs": args.repeat, **median_of(runs)}), flush=True)


if __name__ == "__main__":
    main()
