#!/usr/bin/env python
"""Benchmark train_network.py: seconds per step, time to first step and peak memory, against a floor — the minimal
diffusers + peft LoRA loop on the same model and settings.

    python bench/train_step.py                       # the target: SD 1.5 shapes, 256 px, batch 1, rank 16
    python bench/train_step.py --model tiny --resolution 512 --batch 4
    python bench/train_step.py --matrix              # tiny and SD 1.5 shapes × 256/512 px × batch 1/4
    python bench/train_step.py --repeat 3            # medians of 3 alternating runs (this VM drifts by seconds)

Settings as the issue names them: fp32, cached latents, gradient checkpointing, UNet-only LoRA, 8 images.
The SD 1.5-shaped model is random (weights do not change speed); it is written once to bench/.cache/.
Every figure comes from a fresh child process, so peak RSS is that run's alone.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "bench" / ".cache"
sys.path.insert(0, str(ROOT))


def full_size_checkpoint() -> Path:
    path = CACHE / "sd15-random-fp16.safetensors"
    if not path.exists():
        code = ("import torch; from safetensors.torch import save_file; "
                "from tests.models.test_full_size_layout import _build, SD15_UNET, SD15_TEXT; "
                "from library.models.saving import to_ldm_state_dict; torch.manual_seed(0); "
                "p = _build(SD15_UNET, SD15_TEXT, v2=False, device='cpu'); "
                f"save_file(to_ldm_state_dict(p, torch.float16), {str(path)!r})")
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    return path


def dataset(resolution: int) -> Path:
    from library.data.demo import make_demo_dataset

    root = CACHE / f"data{resolution}"
    if not root.exists():
        make_demo_dataset(root, count=8, size=resolution, folder="1_sks shape")
    return root


def run_child(cmd: list[str]) -> dict:
    """Run a command, timing it from launch to its 'training starts' line (imports, loading and latent caching
    done; sd-scripts' own split of its 45 s is 23 s loading + 21 s caching, so that is where it stops the clock);
    its own peak RSS via GNU time's %M."""
    start = time.perf_counter()
    proc = subprocess.Popen(["/usr/bin/time", "-f", "MAXRSS_KIB %M", *cmd], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    first, pace, rss_gib, lines = None, None, None, []
    for line in proc.stdout:
        lines.append(line)
        if first is None and re.search(r"training starts", line):
            first = time.perf_counter() - start
        if (m := re.search(r"([0-9.]+) s/step", line)):
            pace = float(m.group(1))
        if (m := re.search(r"MAXRSS_KIB (\d+)", line)):
            rss_gib = int(m.group(1)) / 2**20
    proc.wait()
    if proc.returncode:
        raise SystemExit("".join(lines[-30:]))
    return {"s_per_step": pace, "time_to_first_step_s": first, "peak_rss_gib": rss_gib}


def ours(model: str, resolution: int, batch: int, steps: int, rank: int) -> dict:
    out = CACHE / "out"
    cmd = [sys.executable, "train_network.py", "--pretrained_model_name_or_path", model,
           "--train_data_dir", str(dataset(resolution)), "--caption_extension", ".txt",
           "--resolution", str(resolution), "--train_batch_size", str(batch), "--max_train_steps", str(steps),
           "--network_module", "networks.lora", "--network_dim", str(rank), "--network_alpha", str(rank),
           "--network_train_unet_only", "--gradient_checkpointing", "--cache_latents", "--learning_rate", "1e-4",
           "--output_dir", str(out), "--output_name", "bench", "--seed", "0", "--max_data_loader_n_workers", "0"]
    return run_child(cmd)


def floor(model: str, resolution: int, batch: int, steps: int, rank: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).with_name("diffusers_floor.py")), model, str(dataset(resolution)),
           str(resolution), str(batch), str(steps), str(rank)]
    return run_child(cmd)


def median_of(runs: list[dict]) -> dict:
    """Each figure's median over the runs (a shared 2-core VM drifts by seconds between runs), with its range."""
    out = {}
    for key in runs[0]:
        values = sorted(r[key] for r in runs if r[key] is not None)
        if values:
            out[key] = values[len(values) // 2]
            if len(values) > 1:
                out[key + "_range"] = [values[0], values[-1]]
    return out


def measure(model_name: str, resolution: int, batch: int, steps: int, rank: int, repeat: int = 1) -> dict:
    model = "tiny-sd1" if model_name == "tiny" else str(full_size_checkpoint())
    ours_runs, floor_runs = [], []
    for _ in range(repeat):  # alternate, so drift on the machine hits both alike
        ours_runs.append(ours(model, resolution, batch, steps, rank))
        floor_runs.append(floor(model, resolution, batch, steps, rank))
    result = {"model": model_name, "resolution": resolution, "batch": batch, "rank": rank, "steps": steps,
              "runs": repeat, "ours": median_of(ours_runs), "floor": median_of(floor_runs)}
    if result["ours"]["s_per_step"] and result["floor"]["s_per_step"]:
        result["ratio_to_floor"] = result["ours"]["s_per_step"] / result["floor"]["s_per_step"]
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "sd15"), default="sd15")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--matrix", action="store_true")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each; figures are medians, with ranges")
    args = parser.parse_args()
    if args.matrix:
        for model in ("tiny", "sd15"):
            for resolution in (256, 512):
                for batch in (1, 4):
                    measure(model, resolution, batch, args.steps, args.rank, args.repeat)
    else:
        measure(args.model, args.resolution, args.batch, args.steps, args.rank, args.repeat)


if __name__ == "__main__":
    main()
