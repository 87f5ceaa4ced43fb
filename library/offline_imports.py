"""Imports that would reach the Hugging Face Hub on their own, made offline (ground rule 2: nothing is fetched from a
hub unless the user names a hub id).

bitsandbytes (0.48 and later), on any CPU with AVX512-BF16, asks the Hub for a 4-bit CPU matmul kernel while it is
imported (`kernels.get_kernel("kernels-community/quantization-bitsandbytes")`): a lookup of huggingface.co, and with
older `kernels` releases a download, at every start, then the line "Failed to load CPU gemm_4bit_forward from
kernels-community ..." when that fails. Every run imports bitsandbytes: diffusers' quantizers import it with the
first model class, and the 8-bit optimizers use it. The kernel serves 4-bit inference only, which no trainer here runs.

`install()` (called when `library` is imported, before anything imports diffusers) puts a finder first on
`sys.meta_path` that wraps the one import of bitsandbytes: while its modules execute, `kernels` cannot be imported
(`sys.modules["kernels"] = None`, restored after), so the request is never made, and bitsandbytes' warning about
the kernel it could not load is not shown."""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys

GUARDED = "bitsandbytes"
HIDDEN = "kernels"  # the Hub-kernel loader bitsandbytes calls
QUIET_LOGGER = "bitsandbytes.backends.cpu.ops"  # logs the kernel it could not load
_MISSING = object()


class _WithoutHubKernels(importlib.abc.Loader):
    """Executes the guarded package with `kernels` hidden and its warning about the missing kernel silenced."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def __getattr__(self, name):  # resource readers, get_filename...: the real loader's
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        uninstall()  # the one import to wrap
        saved = sys.modules.get(HIDDEN, _MISSING)
        sys.modules[HIDDEN] = None  # `from kernels import get_kernel` raises ImportError, which bitsandbytes catches
        logger = logging.getLogger(QUIET_LOGGER)
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            self.loader.exec_module(module)
        finally:
            logger.setLevel(level)
            if saved is _MISSING:
                sys.modules.pop(HIDDEN, None)
            else:
                sys.modules[HIDDEN] = saved


class _Finder(importlib.abc.MetaPathFinder):
    """Finds bitsandbytes as the other finders do, with the loader wrapped. It stays installed until the package is
    executed: availability checks (diffusers' `importlib.util.find_spec("bitsandbytes")`) find without importing."""

    searching = False

    def find_spec(self, fullname, path, target=None):
        if fullname != GUARDED or self.searching:
            return None
        self.searching = True  # the real spec, from the finders after this one
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self.searching = False
        if spec is not None and spec.loader is not None:
            spec.loader = _WithoutHubKernels(spec.loader)
        return spec


_finder = _Finder()


def install() -> None:
    """Guard the first import of bitsandbytes (nothing to do when it is imported already)."""
    if GUARDED not in sys.modules and _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


def uninstall() -> None:
    if _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
