"""Read checkpoint files (.safetensors, .ckpt/.pt/.bin) into flat state dicts, with one-line errors for bad files."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import SafetensorError, safe_open

from library.errors import UserError

SAFETENSORS_SUFFIXES = {".safetensors"}
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
CHECKPOINT_SUFFIXES = SAFETENSORS_SUFFIXES | PICKLE_SUFFIXES


def read_state_dict(path: str | Path) -> tuple[dict[str, object], dict[str, str]]:
    """Return (tensors and other top-level entries, safetensors metadata) of a checkpoint file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file; check the path (and quote it if it has spaces)")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, expected a .safetensors or .ckpt file")
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        return _read_safetensors(path)
    return _read_pickle(path), {}


def read_safetensors_keys(path: str | Path) -> list[str]:
    """Tensor names of a .safetensors file, read from its header only."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as err:
        raise _corrupt(Path(path), err) from None


def _read_safetensors(path: Path) -> tuple[dict[str, object], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, metadata
    except (SafetensorError, OSError, RuntimeError) as err:
        raise _corrupt(path, err) from None


def _corrupt(path: Path, err: Exception) -> UserError:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UserError(f"{path}: not a readable .safetensors file ({reason}); the file is truncated or corrupt, download it again")


def _read_pickle(path: Path) -> dict[str, object]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError:
        # Old Lightning checkpoints pickle trainer callbacks; read them with a loader that stubs those out
        # instead of executing arbitrary code (the approach AUTOMATIC1111's restricted unpickler takes).
        obj = _load_with_stubs(path)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: not a readable checkpoint ({reason}); the file is truncated or corrupt, download it again") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: holds a {type(obj).__name__}, not a state dict; this is not a model checkpoint")
    return _unwrap(obj)


def _unwrap(obj: dict) -> dict[str, object]:
    """Lightning and several trainers nest the weights under "state_dict" (sometimes twice)."""
    while isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    return obj


class _StubUnpickler(pickle.Unpickler):
    ALLOWED_PREFIXES = ("torch.", "collections.", "numpy.", "_codecs.", "builtins.")

    def find_class(self, module, name):
        if module.startswith(("pytorch_lightning", "lightning")):
            return SimpleNamespace
        if f"{module}.".startswith(self.ALLOWED_PREFIXES) and name not in {"eval", "exec", "getattr", "__import__"}:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _load_with_stubs(path: Path) -> dict[str, object]:
    stub_pickle = SimpleNamespace(Unpickler=_StubUnpickler, load=lambda f, **kw: _StubUnpickler(f, **kw).load(), __name__="stub_pickle")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=stub_pickle)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, AttributeError) as err:
        raise UserError(f"{path}: cannot be read safely ({err}); convert it to .safetensors with a trusted tool first") from None
