#!/usr/bin/env python
"""Benchmark train_network.py: seconds per step, time to first step and peak memory, against a floor — the minimal
diffusers + peft LoRA loop on the same model and settings.

    python bench/train_step.py                       # the target: SD 1.5 shapes, 256 px, batch 1, rank 16
    python bench/train_step.py --model tiny --resolution 512 --batch 4
    python bench/train_step.py --matrix              # tiny and SD 1.5 shapes × 256/512 px × batch 1/4
    python bench/train_step.py --repeat 3            # medians of 3 alternating runs (this VM drifts by seconds)
    python bench/train_step.py --model sdxl          # SDXL shapes (sdxl_train_network.py), 512 px, 3 steps
    python bench/train_step.py --load-memory         # peak RSS of load_components(SDXL fp16 file) alone
    python bench/train_step.py --table               # the issue's table: rows 1-4, 11 steps (see bench/README.md)
    python bench/train_step.py --table --rows 2,4 --repeat 3 --model tiny

SDXL runs also cache the text encoder outputs (--cache_text_encoder_outputs), as the issue names them; its random
full-size fp16 file (~6.9 GB) is written once to bench/.cache/ with the project's saver. Figures: bench/sdxl.md.

Settings as the issue names them: fp32, cached latents, gradient checkpointing, UNet-only LoRA, 8 images.
The SD 1.5-shaped model is random (weights do not change speed); it is written once to bench/.cache/.
Every figure comes from a fresh child process, so peak RSS is that run's alone.

--table: per row (UNet+TE LoRA / UNet-only; GC; bf16; no GC) the floor's and our median s/step, their ratio against
the issue's target (≤ 0.86 with GC, ≤ 0.76 without), our share of this CPU's fp32/bf16 matmul peak (measured here,
on the children's thread count; FLOPs per step counted once with FlopCounterMode in a child), time to first step
and peak RSS; one JSON line per row, then the Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
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
                "p = _build(SD15_UNET, SD15_TEXT, v2=False, device='cuda' if torch.cuda.is_available() else 'cpu'); "
                "[m.to('cpu') for m in p.modules()]; "
                f"save_file(to_ldm_state_dict(p, torch.float16), {str(path)!r})")
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    return path


def _write_sdxl_checkpoint(path: Path) -> None:
    """SDXL base shapes (UNet 320/640/1280 with 1/2/10 transformer layers, CLIP-L + bigG, the SD VAE), random, built
    directly in fp16 one module after another (fp32 would need ~14 GB before the save), saved by save_model."""
    import torch
    from diffusers import AutoencoderKL

    from library.models.components import Components
    from library.models.ldm_configs import make_vae_config
    from library.models.saving import save_model
    from library.models.sdxl import SDXL
    from tests.models.test_sdxl import _full_size_sdxl

    torch.manual_seed(0)
    torch.set_default_dtype(torch.float16)
    # random init of 3.5 billion weights takes minutes on a CPU: on the GPU where there is one, then back to the CPU
    build = "cuda" if torch.cuda.is_available() else "cpu"
    unet, te1, te2 = _full_size_sdxl(build)
    with torch.device(build):
        vae = AutoencoderKL(**make_vae_config(in_channels=3, out_channels=3, block_out_channels=[128, 256, 512, 512],
                                              layers_per_block=2, latent_channels=4,
                                              scaling_factor=SDXL.latent_scale))
    torch.set_default_dtype(torch.float32)
    unet, vae, te1, te2 = (module.to("cpu") for module in (unet, vae, te1, te2))
    parts = Components(unet=unet, vae=vae, text_encoders=(te1, te2), tokenizers=(None, None), family=SDXL,
                       v_parameterization=False, source="bench", source_dtype=torch.float16)
    tmp = path.with_name(path.stem + ".partial.safetensors")
    save_model(parts, tmp, precision="fp16")
    tmp.replace(path)


def sdxl_checkpoint() -> Path:
    path = CACHE / "sdxl-random-fp16.safetensors"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, __file__, "--write-sdxl-checkpoint", str(path)], cwd=ROOT, check=True)
    return path


def dataset(resolution: int) -> Path:
    from library.data.demo import make_demo_dataset

    root = CACHE / f"data{resolution}"
    if not root.exists():
        make_demo_dataset(root, count=8, size=resolution, folder="1_sks shape")
    return root


def run_child(cmd: list[str], skip: int = 1, timeout: float | None = None) -> dict:
    """Run a command, timing it from launch to its 'training starts' line (imports, loading and latent caching
    done; sd-scripts' own split of its 45 s is 23 s loading + 21 s caching, so that is where it stops the clock);
    its own peak RSS via GNU time's %M (where there is no GNU time, as on the GPU machine: the rusage that wait4
    returns for this child); its peak VRAM where it prints one ("peak VRAM X GiB"). Past `timeout` seconds the
    child is killed (a short device lease must not hang on one run)."""
    start = time.perf_counter()
    gnu_time = Path("/usr/bin/time").exists()
    prefix = ["/usr/bin/time", "-f", "MAXRSS_KIB %M"] if gnu_time else []
    proc = subprocess.Popen([*prefix, *cmd], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    first, first_step, pace, rss_gib, threads, steps, lines = None, None, None, None, None, [], []
    vram_gib = None
    killer = threading.Timer(timeout, proc.kill) if timeout else None
    if killer:
        killer.start()
    echo = bool(os.environ.get("BENCH_PROFILE"))  # a profiled run: its op tables are the figures
    for line in proc.stdout:
        lines.append(line)
        if echo:
            print(line, end="", flush=True)
        # search, not match: a progress bar's last redraw (no newline of its own) may lead the line
        if (m := re.search(r"\bstep (\d+) took ([0-9.]+) s", line)):
            steps.append(float(m.group(2)))
        if (m := re.search(r"torch threads (\d+)", line)):
            threads = int(m.group(1))
        if first is None and re.search(r"training starts", line):
            first = time.perf_counter() - start
        if (m := re.search(r"first step took ([0-9.]+) s", line)):
            first_step = float(m.group(1))
        if (m := re.search(r"([0-9.]+) s/step", line)):
            pace = float(m.group(1))
        if (m := re.search(r"MAXRSS_KIB (\d+)", line)):
            rss_gib = int(m.group(1)) / 2**20
        if (m := re.search(r"peak VRAM ([0-9.]+) GiB", line)):
            vram_gib = float(m.group(1))
    if gnu_time:
        proc.wait()
    else:
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode, rss_gib = os.waitstatus_to_exitcode(status), usage.ru_maxrss / 2**20
    if killer:
        killer.cancel()
    if proc.returncode:
        raise SystemExit("".join(lines[-30:]))
    skip = max(1, skip)
    return {"s_per_step": pace, "s_per_step_median": statistics.median(steps[skip:]) if len(steps) > skip else None,
            "time_to_first_step_s": first, "first_step_s": first_step, "peak_rss_gib": rss_gib, "threads": threads,
            **({"peak_vram_gib": vram_gib} if vram_gib is not None else {})}


# Runs our trainer script as `python script args`, with one line per step ("step N took X s": from the step loop's
# start, then from the previous step's end, as the floor prints them) and the thread count, so the benchmark can take
# medians; the steps themselves run unchanged. On CUDA each step's time is taken after torch.cuda.synchronize() (as
# the floor's), and the peak of torch.cuda.max_memory_allocated is printed at exit ("peak VRAM X GiB").
# BENCH_PROFILE=N (ours and the floor): steps N+1 to N+3 run under torch.profiler, whose op table is printed.
OURS_CHILD = """
import atexit, os, runpy, sys, time
import torch
from library.training import reporting
sys.path.insert(0, "bench")
from profiling import StepProfiler, print_peak_vram
after_step = reporting.Reporter.after_step
profiler = StepProfiler()
atexit.register(print_peak_vram)
def timed(self, state, loss, lr_scheduler):
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    profiler.after(state.global_step)
    now = time.time()
    last = self.loop_started if self.first_step_at is None else self._bench_last
    print(f"step {state.global_step} took {now - last:.4f} s", flush=True)
    if self.first_step_at is None:
        print(f"torch threads {torch.get_num_threads()}", flush=True)
    after_step(self, state, loss, lr_scheduler)
    self._bench_last = now
reporting.Reporter.after_step = timed
begin = reporting.Reporter.begin
def begun(self, step):
    begin(self, step)
    profiler.after(0)
reporting.Reporter.begin = begun
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def ours(model: str, resolution: int, batch: int, steps: int, rank: int, sdxl: bool = False, *, te: bool = False,
         gc: bool = True, bf16: bool = False, warm: int = 0, timeout: float | None = None) -> dict:
    """`warm` more steps run first and are left out of the median (the table: until every latent is encoded)."""
    out = CACHE / "out"
    script = "sdxl_train_network.py" if sdxl else "train_network.py"
    cmd = [sys.executable, "-c", OURS_CHILD, script, "--pretrained_model_name_or_path", model,
           "--train_data_dir", str(dataset(resolution)), "--caption_extension", ".txt",
           "--resolution", str(resolution), "--train_batch_size", str(batch), "--max_train_steps", str(steps + warm),
           "--network_module", "networks.lora", "--network_dim", str(rank), "--network_alpha", str(rank),
           "--cache_latents", "--learning_rate", "1e-4",
           "--output_dir", str(out), "--output_name", "bench", "--seed", "0", "--max_data_loader_n_workers", "0"]
    cmd += [] if te else ["--network_train_unet_only"]
    cmd += ["--gradient_checkpointing"] if gc else []
    cmd += ["--mixed_precision", "bf16"] if bf16 else []
    if sdxl:
        cmd.append("--cache_text_encoder_outputs")
    return run_child(cmd, skip=warm or 1, timeout=timeout)


def floor(model: str, resolution: int, batch: int, steps: int, rank: int, *, te: bool = False, gc: bool = True,
          bf16: bool = False, warm: int = 0, full: bool = False, device: str = "cpu", max_grad_norm: float = 0.0,
          timeout: float | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).with_name("diffusers_floor.py")), model, str(dataset(resolution)),
           str(resolution), str(batch), str(steps + warm), str(rank)]
    cmd += ["--te-lora"] if te else []
    cmd += [] if gc else ["--no-gc"]
    cmd += ["--bf16"] if bf16 else []
    cmd += ["--full"] if full else []
    cmd += [] if device == "cpu" else ["--device", device]
    cmd += ["--max-grad-norm", str(max_grad_norm)] if max_grad_norm else []
    return run_child(cmd, skip=warm or 1, timeout=timeout)


def median_of(runs: list[dict]) -> dict:
    """Each figure's median over the runs (a shared 2-core VM drifts by seconds between runs), with its range."""
    out = {}
    for key in runs[0]:
        values = sorted(r[key] for r in runs if r[key] is not None)
        if key == "threads":  # the same in every run; a count, not a figure
            if values:
                out[key] = values[0] if len(set(values)) == 1 else values
            continue
        if values:
            out[key] = values[len(values) // 2]
            if len(values) > 1:
                out[key + "_range"] = [values[0], values[-1]]
    return out


def measure(model_name: str, resolution: int, batch: int, steps: int, rank: int, repeat: int = 1) -> dict:
    sdxl = model_name == "sdxl"
    model = "tiny-sd1" if model_name == "tiny" else str(sdxl_checkpoint() if sdxl else full_size_checkpoint())
    ours_runs, floor_runs = [], []
    for _ in range(repeat):  # alternate, so drift on the machine hits both alike
        ours_runs.append(ours(model, resolution, batch, steps, rank, sdxl))
        floor_runs.append(floor(model, resolution, batch, steps, rank))
    result = {"model": model_name, "resolution": resolution, "batch": batch, "rank": rank, "steps": steps,
              "runs": repeat, "ours": median_of(ours_runs), "floor": median_of(floor_runs)}
    if result["ours"]["s_per_step"] and result["floor"]["s_per_step"]:
        result["ratio_to_floor"] = result["ours"]["s_per_step"] / result["floor"]["s_per_step"]
    print(json.dumps(result), flush=True)
    return result


# The issue's table: row -> (setting, LoRA on the text encoder too, gradient checkpointing, bf16, target ratio).
ROWS = {
    1: ("UNet+TE LoRA, GC, fp32", True, True, False, 0.86),
    2: ("UNet-only, GC, fp32", False, True, False, 0.86),
    3: ("UNet-only, GC, bf16", False, True, True, 0.86),
    4: ("UNet-only, no GC, fp32", False, False, False, 0.76),
}


def matmul_peak(threads: int, size: int = 2048, best_of: int = 10, budget_s: float = 10.0) -> dict:
    """This CPU's matmul peak in GFLOP/s, fp32 and bf16: torch.mm of size × size, 3 warm-ups, the best of `best_of`
    (fewer, at least 3, past `budget_s` seconds), on `threads` threads, as many as the children use."""
    import torch

    torch.set_num_threads(threads)
    peak = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
        for _ in range(3):
            torch.mm(a, b)
        best, spent, runs = float("inf"), 0.0, 0
        while runs < best_of and (runs < 3 or spent < budget_s):
            start = time.perf_counter()
            torch.mm(a, b)
            took = time.perf_counter() - start
            best, spent, runs = min(best, took), spent + took, runs + 1
        peak[name] = 2 * size**3 / best / 1e9
    return peak


def count_flops(model: str, resolution: int, batch: int, rank: int, device: str = "cpu",
                modes: tuple[str, ...] = ("no_gc", "gc", "gc_te")) -> dict:
    """FLOPs of one training step (forward + loss, then backward) of the UNet as train_network.py runs it: the same
    loader, networks.lora on the same layers, only the adapters trainable, diffusers'/transformers' checkpointing as
    ours enables it. FlopCounterMode counts what executes, so with checkpointing the backward includes the forward it
    recomputes. Counted: no GC, GC, and GC with the text encoder's LoRA (its forward with grad, checkpointed too).
    CPU attention runs as aten._scaled_dot_product_flash_attention_for_cpu, which the counter does not know: it is
    counted with the counter's own SDPA formulas.

    `device` cuda counts there (the same count, in seconds instead of minutes); `modes` choose what to count: no_gc,
    gc, gc_te (SD 1.x/2.x), full_no_gc and full_gc (every UNet weight trained: the Dreambooth step, no adapters).
    SDXL (two text encoders): the context and the pooled embedding are random tensors of the cached outputs' shapes,
    with the six size values, as sdxl_train_network.py feeds them with --cache_text_encoder_outputs."""
    import torch
    from torch.utils import flop_counter

    from library.models.loading import load_components
    from networks.plugin import create_network

    aten = torch.ops.aten

    def cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    def cpu_sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa,
               aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_sdpa_backward}
    parts = load_components(model)
    sdxl = len(parts.text_encoders) != 1
    if sdxl and "gc_te" in modes:
        raise SystemExit("--count-flops: gc_te is SD 1.x/2.x only")
    full = {mode.startswith("full") for mode in modes}
    if len(full) != 1:
        raise SystemExit("--count-flops: count the full modes (no adapters) apart from the adapter modes")
    full = full.pop()
    device = torch.device(device)
    unet, text_encoder = parts.unet.to(device), parts.text_encoders[0].to(device)
    for module in parts.modules():
        module.requires_grad_(False)
    network = torch.nn.Module()  # nothing to train (the full modes train the UNet itself)
    if not full:
        network = create_network("networks.lora", 1.0, rank, rank, parts.vae, parts.network_text_encoder, unet)
        network.apply_to(parts.network_text_encoder, unet, not sdxl, True)
        network.to(device)
        network.requires_grad_(True)
    else:
        unet.requires_grad_(True)
    unet.train()
    text_encoder.train()
    torch.manual_seed(0)
    added = None
    if sdxl:
        config = unet.config  # the pooled width: what the added embedding takes besides the six size values
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        fixed = torch.randn(batch, 77, config.cross_attention_dim, device=device)
        added = {"text_embeds": torch.randn(batch, pooled, device=device),
                 "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch,
                                          dtype=torch.float32, device=device)}
    else:
        ids = parts.tokenizer(["sks shape"] * batch, padding="max_length", max_length=77,
                              return_tensors="pt").input_ids.to(device)
        with torch.no_grad():
            fixed = text_encoder(ids)[0]
    latents = torch.randn(batch, 4, resolution // 8, resolution // 8, device=device)
    timesteps = torch.randint(0, 1000, (batch,), device=device)

    def step(with_text_encoder: bool) -> dict:
        with flop_counter.FlopCounterMode(display=False, custom_mapping=mapping) as forward:
            context = text_encoder(ids)[0] if with_text_encoder else fixed
            pred = unet(latents, timesteps, context, added_cond_kwargs=added).sample
            loss = torch.nn.functional.mse_loss(pred, latents)
        with flop_counter.FlopCounterMode(display=False, custom_mapping=mapping) as backward:
            loss.backward()
        network.zero_grad(set_to_none=True)
        unet.zero_grad(set_to_none=True)
        return {"forward": forward.get_total_flops(), "backward": backward.get_total_flops(),
                "step": forward.get_total_flops() + backward.get_total_flops()}

    counts = {}
    for mode in ("no_gc", "full_no_gc", "gc", "full_gc", "gc_te"):  # checkpointing, once on, stays on
        if mode not in modes:
            continue
        if "no_gc" not in mode:
            unet.enable_gradient_checkpointing()
        if mode == "gc_te":
            text_encoder.gradient_checkpointing_enable()
        counts[mode] = step(mode == "gc_te")
    return counts


def _fmt(value, spec: str, unit: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{unit}"


# Steps before the table's step times count: ours encodes each latent the first time a batch needs it (8 images at
# batch 1, plus the loader's one batch ahead), so from here on both loops run the same steady-state step.
WARM_STEPS = 8


def table(model_name: str, resolution: int, batch: int, steps: int, rank: int, rows: list[int], repeat: int) -> list:
    """The issue's table: each row's floor and ours (alternating, `repeat` times, fresh children), ratio against the
    target, our share of this CPU's matmul peak, time to first step and peak RSS; one JSON line per row, then
    Markdown (a progress line per row on stderr as it finishes)."""
    import torch

    if model_name not in ("tiny", "sd15"):
        raise SystemExit("--table: --model tiny or sd15")
    model = "tiny-sd1" if model_name == "tiny" else str(full_size_checkpoint())
    threads = torch.get_num_threads()  # a fresh child's default too: same machine, same environment
    peak = matmul_peak(threads)
    counted = subprocess.run([sys.executable, __file__, "--count-flops", model, str(resolution), str(batch),
                              str(rank)], cwd=ROOT, capture_output=True, text=True, check=False)
    if counted.returncode:
        raise SystemExit(counted.stdout[-3000:] + counted.stderr[-3000:])
    flops = json.loads(counted.stdout.strip().splitlines()[-1])
    results = []
    for number in rows:
        setting, te, gc, bf16, target = ROWS[number]
        ours_runs, floor_runs = [], []
        for _ in range(repeat):  # alternate, so drift on the machine hits both alike
            ours_runs.append(ours(model, resolution, batch, steps, rank, te=te, gc=gc, bf16=bf16, warm=WARM_STEPS))
            floor_runs.append(floor(model, resolution, batch, steps, rank, te=te, gc=gc, bf16=bf16, warm=WARM_STEPS))
        mine, base = median_of(ours_runs), median_of(floor_runs)
        pace = {k: r.get("s_per_step_median", r.get("s_per_step")) for k, r in (("ours", mine), ("floor", base))}
        ratio = pace["ours"] / pace["floor"] if pace["ours"] and pace["floor"] else None
        result = {"row": number, "setting": setting, "model": model_name, "resolution": resolution, "batch": batch,
                  "rank": rank, "steps": steps, "runs": repeat, "floor_s_per_step": pace["floor"],
                  "ours_s_per_step": pace["ours"], "ratio_to_floor": ratio, "target": target,
                  "pass": ratio is not None and ratio <= target,
                  "flops_per_step": flops["gc_te" if te else "gc" if gc else "no_gc"]["step"],
                  "peak_dtype": "bf16" if bf16 else "fp32", "threads": threads, "floor": base, "ours": mine}
        print(f"row {number} ({setting}): floor {_fmt(pace['floor'], '.3f')}, ours {_fmt(pace['ours'], '.3f')} s/step",
              file=sys.stderr, flush=True)
        results.append(result)
    # The peak again, after the rows: on a shared machine one measurement can land on a busy moment, which would
    # inflate every share; the best of the two is the nearer to this CPU's peak.
    peak = {k: max(v, peak[k]) for k, v in matmul_peak(threads).items()}
    for r in results:
        r["peak_gflops"] = peak[r["peak_dtype"]]
        r["share_of_peak"] = r["flops_per_step"] / r["ours_s_per_step"] / (r["peak_gflops"] * 1e9) \
            if r["ours_s_per_step"] else None
        print(json.dumps(r), flush=True)

    print(f"\n{model_name}, {resolution} px, batch {batch}, LoRA rank {rank}, cached latents, AdamW, 8 images; "
          f"medians of {steps} step times after {WARM_STEPS} warm-up steps per run (ours encodes each image's "
          f"latents the first time a batch needs it: 8 images at batch 1), {repeat} run(s) each\n")
    print("| setting | floor s/step | ours s/step | ratio | target | share of fp32/bf16 matmul peak (ours) "
          "| time to first step floor / ours | peak RSS floor / ours |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        verdict = "—" if r["ratio_to_floor"] is None else "PASS" if r["pass"] else "MISS"
        base, mine = r["floor"], r["ours"]
        share = None if r["share_of_peak"] is None else 100 * r["share_of_peak"]
        cells = [f"{r['row']}. {r['setting']}", _fmt(r["floor_s_per_step"], ".3f"), _fmt(r["ours_s_per_step"], ".3f"),
                 _fmt(r["ratio_to_floor"], ".2f"), f"≤ {r['target']:.2f} {verdict}",
                 f"{_fmt(share, '.1f', '%')} of {r['peak_dtype']}",
                 " / ".join(_fmt(x.get("time_to_first_step_s"), ".1f", " s") for x in (base, mine)),
                 " / ".join(_fmt(x.get("peak_rss_gib"), ".2f", " GiB") for x in (base, mine))]
        print("| " + " | ".join(cells) + " |")
    child_threads = set()
    for r in results:
        for who in ("floor", "ours"):
            value = r[who].get("threads")
            child_threads |= set(value if isinstance(value, list) else [] if value is None else [value])
    gflop = {k: v["step"] / 1e9 for k, v in flops.items()}
    recompute = (flops["gc"]["backward"] - flops["no_gc"]["backward"]) / 1e9
    mismatch = "" if child_threads == {threads} else " — NOT the same: the shares are off by that ratio"
    print(f"\nPeak: best torch.mm 2048×2048, before and after the rows, on {threads} threads (the children's: "
          f"{', '.join(map(str, sorted(child_threads))) or '?'}{mismatch}): fp32 {peak['fp32']:.0f}, "
          f"bf16 {peak['bf16']:.0f} GFLOP/s. Share = FLOPs per step / our s/step / the peak of the row's dtype "
          f"(bf16 for row 3).")
    print(f"FLOPs per step (FlopCounterMode, one forward + backward of the UNet with networks.lora, as ours runs it; "
          f"the AdamW update not counted): the count of what executes, so the GC rows include the checkpointed blocks' "
          f"forward, recomputed in the backward ({recompute:.1f} GFLOP): GC {gflop['gc']:.1f} GFLOP (rows 2, 3), "
          f"GC + text encoder LoRA {gflop['gc_te']:.1f} (row 1), no GC {gflop['no_gc']:.1f} (row 4; its forward "
          f"{flops['no_gc']['forward'] / 1e9:.1f}).")
    print("Time to first step: launch to the 'training starts' line (imports, loading, latent caching); "
          "the first step itself is first_step_s in the JSON. Peak RSS: GNU time's %M of each child.")
    return results


LOAD_CHILD = """
import re, sys, time
def status(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 2**20  # kB -> GiB
import torch, diffusers, transformers
import library.models.loading as loading
print(f"imported: rss {status('VmRSS'):.2f} GiB, peak {status('VmHWM'):.2f} GiB", flush=True)
build = loading.build_module
def traced(cls, config, tensors, source, what, dtype):
    open("/proc/self/clear_refs", "w").write("5")  # the peak of this module's build alone
    before, t = status("VmRSS"), time.time()
    module = build(cls, config, tensors, source, what, dtype)
    params = sum(p.numel() for p in module.parameters())
    print(f"{what}: {params} params ({params * 4 / 2**30:.2f} GiB fp32), rss {before:.2f} -> {status('VmRSS'):.2f} "
          f"GiB, peak during build {status('VmHWM'):.2f} GiB, {time.time() - t:.1f} s", flush=True)
    return module
loading.build_module = traced
parts = loading.load_components(sys.argv[1])
print(f"loaded: rss {status('VmRSS'):.2f} GiB", flush=True)
"""


def load_memory() -> dict:
    """Peak RSS (GNU time's %M) of a fresh process that only imports torch/diffusers/transformers, of one that only
    runs load_components on the SDXL fp16 file, and the fp32 size of the file's tensors; then a traced load that
    prints RSS around each module's build (its peaks are reset per module, so that run's %M is not the figure)."""
    from safetensors import safe_open

    path = sdxl_checkpoint()
    numel = 0
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            sl = f.get_slice(key)
            if sl.get_dtype() in ("F16", "BF16", "F32"):
                n = 1
                for d in sl.get_shape():
                    n *= d
                numel += n

    def peak(code: str, *args: str) -> tuple[float, float, str]:
        start = time.perf_counter()
        out = subprocess.run(["/usr/bin/time", "-f", "MAXRSS_KIB %M", sys.executable, "-c", code, *args], cwd=ROOT,
                             capture_output=True, text=True, check=False)
        text = out.stdout + out.stderr
        if out.returncode:
            raise SystemExit(text[-3000:])
        return int(re.search(r"MAXRSS_KIB (\d+)", text).group(1)) / 2**20, time.perf_counter() - start, text

    baseline, _, _ = peak("import torch, diffusers, transformers")
    library_baseline, _, _ = peak("from library.models.loading import load_components")
    loaded, seconds, _ = peak("import sys; from library.models.loading import load_components; "
                              "load_components(sys.argv[1])", str(path))
    _, _, traced = peak(LOAD_CHILD, str(path))
    fp32 = numel * 4 / 2**30
    result = {"file_gib": path.stat().st_size / 2**30, "float_params": numel, "fp32_gib": fp32,
              "import_baseline_peak_gib": baseline, "library_import_peak_gib": library_baseline,
              "load_peak_gib": loaded, "load_seconds": seconds, "load_peak_minus_baseline_gib": loaded - baseline,
              "over_fp32_plus_baseline_gib": loaded - baseline - fp32,
              "over_fp32_plus_library_import_gib": loaded - library_baseline - fp32}
    traced = [line for line in traced.splitlines() if "MAXRSS" not in line and "kernels" not in line]
    print("\n".join(traced), flush=True)
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "sd15", "sdxl"), default="sd15")
    parser.add_argument("--resolution", type=int, help="default 256, SDXL 512")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int,
                        help="default 6, --table 11; SDXL 3 (the first + 2: a CPU step takes minutes)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--matrix", action="store_true")
    parser.add_argument("--table", action="store_true", help="the issue's table: rows 1-4 (UNet+TE / UNet-only, GC, "
                        "bf16, no GC) against the floor, with targets and the share of the matmul peak")
    parser.add_argument("--rows", default="1,2,3,4", help="--table rows to run, e.g. 2,4")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each; figures are medians, with ranges")
    parser.add_argument("--load-memory", action="store_true", help="only the SDXL loading-memory figures")
    parser.add_argument("--write-sdxl-checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--count-flops", nargs=4, metavar=("MODEL", "RESOLUTION", "BATCH", "RANK"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--count-device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--count-modes", default="no_gc,gc,gc_te", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_sdxl_checkpoint:
        return _write_sdxl_checkpoint(Path(args.write_sdxl_checkpoint))
    if args.count_flops:
        model, resolution, batch, rank = args.count_flops
        return print(json.dumps(count_flops(model, int(resolution), int(batch), int(rank), args.count_device,
                                            tuple(args.count_modes.split(",")))), flush=True)
    if args.load_memory:
        return load_memory()
    sdxl = args.model == "sdxl"
    args.resolution = args.resolution or (512 if sdxl else 256)
    args.steps = args.steps or (3 if sdxl else 11 if args.table else 6)
    if args.table:
        rows = [int(row) for row in args.rows.split(",")]
        if set(rows) - set(ROWS):
            parser.error(f"--rows: choose from {sorted(ROWS)}")
        table(args.model, args.resolution, args.batch, args.steps, args.rank, rows, args.repeat)
    elif args.matrix:
        for model in ("tiny", "sd15"):
            for resolution in (256, 512):
                for batch in (1, 4):
                    measure(model, resolution, batch, args.steps, args.rank, args.repeat)
    else:
        measure(args.model, args.resolution, args.batch, args.steps, args.rank, args.repeat)


if __name__ == "__main__":
    main()
