#!/usr/bin/env python
"""GPU figures (issue 19 item 7): ours against the diffusers floor on a CUDA device, every run a fresh child.

    python bench/gpu.py                          # every section below
    python bench/gpu.py --sections lora,db --steps 20 --budget 400
    python bench/gpu.py --sections db --steps 8 --profile   # torch.profiler op tables of ours and the floor
    python bench/gpu.py --sections lora --steps 4 --profile-first   # the first 3 steps, by host time

Sections (bf16 mixed precision, cached latents, AdamW, 8 images, sd-scripts' defaults otherwise):

| section | ours | floor (bench/diffusers_floor.py --device cuda --bf16 --max-grad-norm 1.0) |
|---|---|---|
| lora | train_network.py, SD 1.5 shapes, 512 px, batch 4, LoRA rank 16, UNet-only, no GC | LoRA, --no-gc |
| lora_gc | as lora, --gradient_checkpointing | LoRA |
| db | train_db.py, SD 1.5 shapes, 512 px, batch 4, text encoder frozen, no GC | --full --no-gc |
| sdxl | sdxl_train_network.py, SDXL shapes, 1024 px, batch 4, rank 16, UNet-only, GC, cached text-encoder outputs | LoRA |

Per section: s/step (the median of `--steps` step times after the warm-up steps: ours encodes latents as batches
first need them), it/s and images/s, ours / floor, MFU (FLOPs per step, counted once on the device with
FlopCounterMode as bench/train_step.py counts them, over s/step over the bf16 matmul peak measured here: the median of
ten 8192³ torch.mm in bf16, timed with CUDA events), peak VRAM (torch.cuda.max_memory_allocated of each child), time
to first step and peak RSS. Each child synchronizes before taking a step's time. One JSON line per section, then a
Markdown table. `--budget` seconds: a section that would start later is skipped (the device's lease is short).
The random checkpoints are written once to bench/.cache/ (SD 1.5 ~2.1 GB, SDXL ~6.9 GB, built on the GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_step import (CACHE, OURS_CHILD, ROOT, _fmt, dataset, floor, full_size_checkpoint, ours,  # noqa: E402
                        matmul_peak, run_child, sdxl_checkpoint)

# section -> (what, model, resolution, batch, gradient checkpointing, Dreambooth, FLOPs mode)
SECTIONS = {
    "lora": ("SD 1.5 LoRA, 512 px, batch 4, no GC", "sd15", 512, 4, False, False, "no_gc"),
    "lora_gc": ("SD 1.5 LoRA, 512 px, batch 4, GC", "sd15", 512, 4, True, False, "gc"),
    "db": ("SD 1.5 Dreambooth, 512 px, batch 4, no GC", "sd15", 512, 4, False, True, "full_no_gc"),
    "sdxl": ("SDXL LoRA, 1024 px, batch 4, GC", "sdxl", 1024, 4, True, False, "gc"),
}
RANK = 16
WARM = 4  # 8 images at batch 4: two steps encode latents, plus the loader's batch ahead
TIMEOUT = 240  # seconds for one child: a run that hangs must not take the lease's other sections with it


def bf16_peak(size: int = 8192) -> float:
    """TFLOP/s of torch.mm in bf16 on this GPU: 3 warm-ups, the median of 10 timed with CUDA events."""
    import torch

    a, b = (torch.randn(size, size, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        torch.mm(a, b)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.mm(a, b)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * size**3 / sorted(times)[len(times) // 2] / 1e12


def db_ours(model: str, resolution: int, batch: int, steps: int, gc: bool) -> dict:
    """train_db.py under the same per-step timer as ours(): text encoder frozen, as the floor's --full."""
    cmd = [sys.executable, "-c", OURS_CHILD, "train_db.py", "--pretrained_model_name_or_path", model,
           "--train_data_dir", str(dataset(resolution)), "--caption_extension", ".txt", "--resolution", str(resolution),
           "--train_batch_size", str(batch), "--max_train_steps", str(steps + WARM), "--optimizer_type", "AdamW",
           "--stop_text_encoder_training", "-1", "--cache_latents", "--learning_rate", "1e-6",
           "--mixed_precision", "bf16", "--output_dir", str(CACHE / "out-db"), "--output_name", "bench-db",
           "--save_model_as", "safetensors", "--seed", "0", "--max_data_loader_n_workers", "0"]
    return run_child(cmd + (["--gradient_checkpointing"] if gc else []), skip=WARM, timeout=TIMEOUT)


def count(model: str, resolution: int, batch: int, mode: str, device: str) -> dict:
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("train_step.py")), "--count-flops", model,
                          str(resolution), str(batch), str(RANK), "--count-device", device, "--count-modes", mode],
                         cwd=ROOT, capture_output=True, text=True, check=False, timeout=TIMEOUT)
    if out.returncode:
        raise SystemExit(out.stdout[-3000:] + out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])[mode]


def section(name: str, steps: int, peak: float, smoke: bool) -> dict:
    """One section's runs; `smoke`: the tiny models at 64 px, batch 2, on the CPU (a check of this script)."""
    what, model_name, resolution, batch, gc, db, mode = SECTIONS[name]
    device = "cpu" if smoke else "cuda"
    if smoke:
        model, resolution, batch = ("tiny-sdxl" if model_name == "sdxl" else "tiny-sd1"), 64, 2
    else:
        model = str(sdxl_checkpoint() if model_name == "sdxl" else full_size_checkpoint())
    flops = count(model, resolution, batch, mode, device)["step"]
    if db:
        mine = db_ours(model, resolution, batch, steps, gc)
    else:
        mine = ours(model, resolution, batch, steps, RANK, model_name == "sdxl", gc=gc, bf16=True, warm=WARM,
                    timeout=TIMEOUT)
    # the floor clips as sd-scripts (and ours) do by default: --max_grad_norm 1.0
    base = floor(model, resolution, batch, steps, RANK, gc=gc, bf16=True, warm=WARM, full=db, device=device,
                 max_grad_norm=1.0, timeout=TIMEOUT)
    result = {"section": name, "setting": what, "steps": steps, "warm_steps": WARM, "flops_per_step": flops,
              "bf16_peak_tflops": peak, "ours": mine, "floor": base}
    for who, run in (("ours", mine), ("floor", base)):
        pace = run.get("s_per_step_median") or run.get("s_per_step")
        result[f"{who}_s_per_step"] = pace
        result[f"{who}_mfu"] = flops / pace / (peak * 1e12) if pace else None
    if result["ours_s_per_step"] and result["floor_s_per_step"]:
        result["ratio_to_floor"] = result["ours_s_per_step"] / result["floor_s_per_step"]
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="lora,db,sdxl,lora_gc", help=f"from {', '.join(SECTIONS)}")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run, after the warm-up steps")
    parser.add_argument("--budget", type=float, default=float("inf"), help="seconds; later sections are skipped")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU: a check of this script")
    parser.add_argument("--profile", action="store_true", help="the sections' runs print a torch.profiler op table "
                        "of 3 steps after the warm-up (their step times then include the profiler's cost)")
    parser.add_argument("--profile-first", action="store_true", help="as --profile, of the first 3 steps, by host time")
    args = parser.parse_args()
    if args.profile or args.profile_first:
        os.environ["BENCH_PROFILE"] = "0" if args.profile_first else str(WARM + 2)
    names = args.sections.split(",")
    if set(names) - set(SECTIONS):
        parser.error(f"--sections: choose from {', '.join(SECTIONS)}")
    import torch

    if not torch.cuda.is_available() and not args.smoke:
        raise SystemExit("bench/gpu.py needs a CUDA device (--smoke runs the tiny models on the CPU)")
    started = time.perf_counter()
    if args.smoke:
        peak, label = matmul_peak(torch.get_num_threads())["bf16"] / 1e3, "CPU (--smoke)"
    else:
        peak, label = bf16_peak(), torch.cuda.get_device_name(0)
        label += f", {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB"
    print(f"{label}, torch {torch.__version__}, CUDA {torch.version.cuda}; bf16 matmul peak {peak:.1f} TFLOP/s",
          flush=True)
    results = []
    for name in names:
        if time.perf_counter() - started > args.budget:
            print(f"{name}: skipped (past --budget {args.budget:.0f} s)", flush=True)
            continue
        try:
            results.append(section(name, args.steps, peak, args.smoke))
        except (Exception, SystemExit) as error:  # one section's failure must not cost the others their figures
            print(f"{name}: FAILED after {time.perf_counter() - started:.0f} s: {str(error)[-2000:]}", flush=True)
    print(f"\n{label}: bf16 mixed precision, cached latents, AdamW, 8 images; medians of "
          f"{args.steps} step times after {WARM} warm-up steps; MFU against the measured bf16 peak ({peak:.1f} TFLOP/s)\n")
    print("| setting | floor s/step | ours s/step | ours it/s (images/s) | ours / floor | MFU floor / ours "
          "| peak VRAM floor / ours | time to first step floor / ours | peak RSS floor / ours |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        batch = SECTIONS[r["section"]][3]
        pace = r["ours_s_per_step"]
        rate = f"{1 / pace:.2f} ({batch / pace:.1f})" if pace else "—"
        base, mine = r["floor"], r["ours"]
        cells = [r["setting"], _fmt(r["floor_s_per_step"], ".3f"), _fmt(pace, ".3f"), rate,
                 _fmt(r.get("ratio_to_floor"), ".2f"),
                 " / ".join(_fmt(None if x is None else 100 * x, ".1f", "%") for x in (r["floor_mfu"], r["ours_mfu"])),
                 " / ".join(_fmt(x.get("peak_vram_gib"), ".2f", " GiB") for x in (base, mine)),
                 " / ".join(_fmt(x.get("time_to_first_step_s"), ".1f", " s") for x in (base, mine)),
                 " / ".join(_fmt(x.get("peak_rss_gib"), ".2f", " GiB") for x in (base, mine))]
        print("| " + " | ".join(cells) + " |")
    print("\nFLOPs per step (FlopCounterMode on the device): "
          + ", ".join(f"{r['section']} {r['flops_per_step'] / 1e12:.2f} TFLOP" for r in results)
          + f". Total {time.perf_counter() - started:.0f} s.")


if __name__ == "__main__":
    main()
