"""Giving memory back to the operating system once a large model part is released.

glibc's malloc keeps freed memory for reuse instead of returning it: after the SDXL text encoders (3 GB in float32)
are released, the process's resident size falls by only ~0.4 GB, and the VAE's activations while caching latents
then come from fresh pages on top (measured on the 6.9 GB SDXL file: 13.07 GiB resident after the release, 14.56 at
the VAE's peak; with `malloc_trim` after the release, 10.4 before the VAE). `malloc_trim(0)` returns every free page,
so the memory freed really lowers the run's peak. Other C libraries (macOS, Windows, musl) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from functools import lru_cache


@lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc.malloc_trim if libc is not None else None
    except (OSError, AttributeError):  # not glibc: no malloc_trim
        return None


_frozen = False


def freeze_long_lived_objects() -> None:
    """Once per process, after the libraries are imported and before any model is built: collect, then move every
    object alive now (~530,000 from torch, diffusers, transformers and accelerate) into the permanent generation
    (`gc.freeze`). Each later full collection (release_freed_memory's, and Python's own) then scans only what the
    run created: 0.3 s -> milliseconds, three or more times per run. What is frozen is never garbage (modules,
    functions, classes); the collection first makes sure of that."""
    global _frozen
    if _frozen:
        return
    gc.collect()
    gc.freeze()
    _frozen = True


def release_freed_memory() -> bool:
    """Collect garbage, then hand glibc's free pages back to the OS; True when malloc_trim ran."""
    gc.collect()
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
