"""Importing bitsandbytes (diffusers does, with its first model class; so do the 8-bit optimizers) never reaches the
Hugging Face Hub: `library` hides the `kernels` package while bitsandbytes executes (library/offline_imports.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from tests.conftest import ROOT, python_path
from tests.netguard import sitecustomize as netguard

# Imports as a trainer does, then prints `result` as JSON; the suite's network guard (tests/netguard) refuses and logs
# every name lookup and connection the child makes.
PROBE = """
import json, sys
{before}
import library
from library.models import loading  # imports diffusers' models, which import bitsandbytes
import bitsandbytes, bitsandbytes.optim
{after}
print("PROBE " + json.dumps({{"result": result}}))
"""


def probe(before: str = "", after: str = "result = None", path: Path | None = None) -> tuple[dict, str]:
    """The child's result, with "network": what the guard refused it, and its stderr."""
    env_path = [path] if path else []
    code = PROBE.format(before=before, after=after)
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "network.txt"
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, PYTHONPATH=python_path(*env_path, ROOT),
                                       **{netguard.LOG_ENV: str(log)}))
        network = log.read_text().splitlines() if log.exists() else []
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("PROBE "))
    return dict(json.loads(line[len("PROBE "):]), network=network), proc.stderr


def test_a_bitsandbytes_that_asks_the_hub_for_kernels_cannot_while_it_is_imported(tmp_path):
    # A stand-in for bitsandbytes' CPU backend, on every CPU: at import it calls kernels.get_kernel (the real `kernels`
    # module, its get_kernel recording the call) and logs a warning when that fails, as bitsandbytes >= 0.48 does on
    # AVX512-BF16 CPUs.
    fake = tmp_path / "site"
    (fake / "bitsandbytes" / "optim").mkdir(parents=True)
    (fake / "bitsandbytes" / "__init__.py").write_text(textwrap.dedent("""
        import logging
        from . import optim
        logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
        try:
            from kernels import get_kernel
            get_kernel("kernels-community/quantization-bitsandbytes", version=1)
        except Exception as exc:
            logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s", exc)
        """))
    (fake / "bitsandbytes" / "optim" / "__init__.py").write_text("AdamW8bit = object\n")
    record = textwrap.dedent("""
        import types
        try:
            import kernels
        except ImportError:  # not installed: a module of that name, imported first
            kernels = sys.modules["kernels"] = types.ModuleType("kernels")
        calls = []
        kernels.get_kernel = lambda *args, **kwargs: calls.append(args)
        """)
    seen, stderr = probe(path=fake, before=record,
                         after="result = {'calls': calls, 'file': bitsandbytes.__file__, "
                               "'kernels': sys.modules['kernels'] is kernels}")
    assert seen["result"]["file"].startswith(str(fake))  # the stand-in was the one imported
    assert seen["result"]["calls"] == []
    assert seen["result"]["kernels"]  # the module imported before is back in place
    assert "gemm_4bit_forward" not in stderr


def test_the_real_bitsandbytes_imports_without_a_network_lookup_or_the_kernel_warning():
    seen, stderr = probe(after="result = bitsandbytes.optim.AdamW8bit.__name__")
    assert seen["result"] == "AdamW8bit"
    assert seen["network"] == []
    assert "kernels-community" not in stderr


def test_the_guard_is_gone_once_bitsandbytes_is_imported_and_kernels_is_the_same_module_again():
    code = textwrap.dedent("""
        import sys
        try:
            import kernels  # transformers' dependency; imported before bitsandbytes when transformers comes first
        except ImportError:
            pass
        before = sys.modules.get("kernels")
        import library, library.offline_imports as offline
        assert offline._finder in sys.meta_path
        import bitsandbytes
        assert offline._finder not in sys.meta_path
        assert sys.modules.get("kernels") is before
        print("ok")
        """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip() == "ok", proc.stderr[-3000:]
