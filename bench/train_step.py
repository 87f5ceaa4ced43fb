#!/usr/bin/env python
"""Benchmark train_network.py: seconds per step, time to first step and peak memory, against a floor — the minimal
diffusers + peft LoRA loop on the same model and settings.

    python bench/train_step.py                       # the target: SD 1.5 shapes, 256 px, batch 1, rank 16
    python bench/train_step.py --model tiny --resolution 512 --batch 4
    python bench/train_step.py --matrix              # tiny and SD 1.5 shapes × 256/512 px × batch 1/4
    python bench/train_step.py --repeat 3            # medians of 3 alternating runs (this VM drifts by seconds)
    python bench/train_step.py --model sdxl          # SDXL shapes (sdxl_train_network.py), 512 px, 3 steps
    python bench/train_step.py --load-memory         # peak RSS of load_components(SDXL fp16 file) alone

SDXL runs also cache the text encoder outputs (--cache_text_encoder_outputs), as the issue names them; its random
full-size fp16 file (~6.9 GB) is written once to bench/.cache/ with the project's saver. Figures: bench/sdxl.md.

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


def _write_sdxl_checkpoint(path: Path) -> None:
    """SDXL base shapes (UNet 320/640/1280 with 1/2/10 transformer layers, CLIP-L + bigG, the SD VAE), random, built
    directly in fp16 one module after another (fp32 would need ~14 GB before the save), saved by save_model."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from library.models.components import Components
    from library.models.ldm_configs import make_vae_config
    from library.models.saving import save_model
    from library.models.sdxl import SDXL, _clip_config, unet_config

    torch.manual_seed(0)
    torch.set_default_dtype(torch.float16)
    unet = UNet2DConditionModel(**unet_config(block_out_channels=[320, 640, 1280], transformer_layers=[1, 2, 10],
                                              cross_attention_dim=2048, pooled_dim=1280))
    te1 = CLIPTextModel(CLIPTextConfig(**_clip_config(vocab=49408, width=768, layers=12, mlp=3072, act="quick_gelu",
                                                      projection=768)))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**_clip_config(vocab=49408, width=1280, layers=32, mlp=5120,
                                                                    act="gelu", projection=1280)))
    vae = AutoencoderKL(**make_vae_config(in_channels=3, out_channels=3, block_out_channels=[128, 256, 512, 512],
                                          layers_per_block=2, latent_channels=4, scaling_factor=SDXL.latent_scale))
    torch.set_default_dtype(torch.float32)
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


def run_child(cmd: list[str]) -> dict:
    """Run a command, timing it from launch to its 'training starts' line (imports, loading and latent caching
    done; sd-scripts' own split of its 45 s is 23 s loading + 21 s caching, so that is where it stops the clock);
    its own peak RSS via GNU time's %M."""
    start = time.perf_counter()
    proc = subprocess.Popen(["/usr/bin/time", "-f", "MAXRSS_KIB %M", *cmd], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    first, first_step, pace, rss_gib, lines = None, None, None, None, []
    for line in proc.stdout:
        lines.append(line)
        if first is None and re.search(r"training starts", line):
            first = time.perf_counter() - start
        if (m := re.search(r"first step took ([0-9.]+) s", line)):
            first_step = float(m.group(1))
        if (m := re.search(r"([0-9.]+) s/step", line)):
            pace = float(m.group(1))
        if (m := re.search(r"MAXRSS_KIB (\d+)", line)):
            rss_gib = int(m.group(1)) / 2**20
    proc.wait()
    if proc.returncode:
        raise SystemExit("".join(lines[-30:]))
    return {"s_per_step": pace, "time_to_first_step_s": first, "first_step_s": first_step, "peak_rss_gib": rss_gib}


def ours(model: str, resolution: int, batch: int, steps: int, rank: int, sdxl: bool = False) -> dict:
    out = CACHE / "out"
    script = "sdxl_train_network.py" if sdxl else "train_network.py"
    cmd = [sys.executable, script, "--pretrained_model_name_or_path", model,
           "--train_data_dir", str(dataset(resolution)), "--caption_extension", ".txt",
           "--resolution", str(resolution), "--train_batch_size", str(batch), "--max_train_steps", str(steps),
           "--network_module", "networks.lora", "--network_dim", str(rank), "--network_alpha", str(rank),
           "--network_train_unet_only", "--gradient_checkpointing", "--cache_latents", "--learning_rate", "1e-4",
           "--output_dir", str(out), "--output_name", "bench", "--seed", "0", "--max_data_loader_n_workers", "0"]
    if sdxl:
        cmd.append("--cache_text_encoder_outputs")
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
    parser.add_argument("--steps", type=int, help="default 6; SDXL 3 (the first + 2: a CPU step takes minutes)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--matrix", action="store_true")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each; figures are medians, with ranges")
    parser.add_argument("--load-memory", action="store_true", help="only the SDXL loading-memory figures")
    parser.add_argument("--write-sdxl-checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_sdxl_checkpoint:
        return _write_sdxl_checkpoint(Path(args.write_sdxl_checkpoint))
    if args.load_memory:
        return load_memory()
    sdxl = args.model == "sdxl"
    args.resolution = args.resolution or (512 if sdxl else 256)
    args.steps = args.steps or (3 if sdxl else 6)
    if args.matrix:
        for model in ("tiny", "sd15"):
            for resolution in (256, 512):
                for batch in (1, 4):
                    measure(model, resolution, batch, args.steps, args.rank, args.repeat)
    else:
        measure(args.model, args.resolution, args.batch, args.steps, args.rank, args.repeat)


if __name__ == "__main__":
    main()
