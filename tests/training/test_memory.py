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
