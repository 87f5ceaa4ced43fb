"""What the floor (bench/diffusers_floor.py) and ours (bench/train_step.py's OURS_CHILD) both print for the bench: the
step profiler and the peak-VRAM line that run_child reads. It imports nothing heavy, so loading it costs our child's
time to first step nothing."""

from __future__ import annotations

import os
import time

import torch


def print_peak_vram() -> None:
    """"peak VRAM X GiB" (torch.cuda.max_memory_allocated), where CUDA was used; run_child parses the line."""
    if torch.cuda.is_initialized():
        print(f"peak VRAM {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", flush=True)


class StepProfiler:
    """BENCH_PROFILE=N: steps N+1 to N+3 under torch.profiler (CPU and, where there is one, CUDA), then the op table
    and the host's and device's totals are printed: by device time, or with N = 0 (the first steps, whose set-up
    costs are the host's: cuDNN and cuBLAS plans, lazily encoded latents) by host time. Shared with ours
    (train_step.OURS_CHILD, which calls after(0) when the loop begins)."""

    def __init__(self) -> None:
        self.start = int(os.environ.get("BENCH_PROFILE", "-1"))
        self.profile = None

    def after(self, step: int) -> None:
        """Called after step `step` (1-based) has finished (and, on CUDA, synchronized)."""
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        if step == self.start:
            cuda = torch.cuda.is_initialized()
            self.profile = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
            self.profile.__enter__()
            self.began = time.time()
        elif self.profile is not None and step == self.start + 3:
            wall = time.time() - self.began
            self.profile.__exit__(None, None, None)
            events = self.profile.key_averages()
            key = "device_time_total" if torch.cuda.is_initialized() and self.start else "cpu_time_total"
            print(events.table(sort_by=key, row_limit=30, max_name_column_width=70), flush=True)
            # the kernels' own time, as the table's "Self CUDA time total" counts it (the host ops' self device
            # time is their kernels' again: summing every row counted it twice)
            device_us = sum(e.self_device_time_total for e in events if e.device_type != DeviceType.CPU)
            print(f"profiled 3 steps: wall {wall:.3f} s, kernels {device_us / 1e6:.3f} s, "
                  f"{sum(e.count for e in events if e.key.startswith('cuda') and 'Launch' in e.key)} kernel launches",
                  flush=True)
            self.profile = None
