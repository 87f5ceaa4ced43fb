"""release_freed_memory hands malloc's free pages back to the OS: the freed SDXL text encoders and the VAE's
activations then really lower the run's peak (bench/sdxl.md has the figures on the full-size model)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from tests.conftest import ROOT

CHILD = """
import gc, json, re, sys, torch
from library.training.memory import release_freed_memory
def rss():
    return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
keep = [torch.ones(16 * 1024) for _ in range(4000)]  # 64 KiB each: malloc's heap, below its mmap threshold
del keep[::2]  # 125 MiB of holes between live tensors: free() cannot return them on its own
before = rss()
ran = release_freed_memory() if sys.argv[1] == "trim" else (gc.collect(), False)[1]
print(json.dumps({"ran": ran, "returned": before - rss()}))
"""


def _run(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc_trim")
def test_freed_heap_memory_goes_back_to_the_os():
    untrimmed, trimmed = _run("plain"), _run("trim")
    assert trimmed["ran"] is True
    assert untrimmed["returned"] < 20 * 2**20  # gc alone: malloc keeps the holes
    assert trimmed["returned"] > 60 * 2**20  # trimmed: most of the 125 MiB is returned


def test_a_run_freezes_the_libraries_objects_before_its_explicit_collections(tmp_path, monkeypatch):
    """~530,000 objects of torch, diffusers, transformers and accelerate are frozen before the models are built, so
    release_freed_memory's full collections skip them (0.3 s each before; a third of an in-process test's time)."""
    import gc

    import train_network
    from library.data.demo import make_demo_dataset
    from library.methods import diffusion_method
    from library.training import memory

    gc.unfreeze()  # as in a fresh process (the test session froze its own objects at collection)
    monkeypatch.setattr(memory, "_frozen", False)
    seen = []
    real = diffusion_method.release_freed_memory
    monkeypatch.setattr(diffusion_method, "release_freed_memory",
                        lambda: (seen.append(gc.get_freeze_count()), real())[1])
    make_demo_dataset(tmp_path / "data", count=2, size=32)
    train_network.main(["--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", str(tmp_path / "data"),
                        "--caption_extension", ".txt", "--resolution", "32", "--output_dir", str(tmp_path / "out"),
                        "--max_train_steps", "1", "--network_dim", "4", "--cache_latents"])
    assert seen and min(seen) > 100_000
