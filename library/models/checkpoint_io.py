"""Read checkpoint files (.safetensors, .ckpt/.pt/.bin) into flat state dicts, with one-line errors for bad files."""

from __future__ import annotations

import json
import pickle
import struct
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
    _check_is_file(path)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        return _read_safetensors(path)
    return _read_pickle(path), {}


class TensorFile:
    """A checkpoint's tensors read one at a time: names, shapes and dtypes first (as `meta` tensors), data on
    demand. Loading a model this way holds one source tensor at a time, not the whole file."""

    non_tensor_keys: list = []  # a pickle's other top-level entries (an A1111 hypernetwork's int keys, "epoch"...)

    def __init__(self, path: Path, meta: dict[str, torch.Tensor], metadata: dict[str, str]):
        self.path, self.meta, self.metadata = path, meta, metadata

    def keys(self) -> list[str]:
        return list(self.meta)

    def load(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor, as its own copy; floating-point tensors cast to `dtype` when one is given."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "TensorFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_checkpoint(path: str | Path) -> TensorFile:
    """Open a checkpoint for reading tensor by tensor (a .safetensors file is read with plain reads, not mapped,
    so pages already copied out do not stay in memory; a pickle is unpickled first, memory-mapped when zipped)."""
    path = Path(path)
    _check_is_file(path)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        return _SafetensorsFile(path)
    entries = _read_pickle(path)
    tensors = {k: v for k, v in entries.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    return _DictFile(path, tensors, [k for k in entries if k not in tensors])


class _DictFile(TensorFile):
    def __init__(self, path: Path, tensors: dict[str, torch.Tensor], non_tensor_keys: list):
        super().__init__(path, {k: v.to("meta") for k, v in tensors.items()}, {})
        self._tensors = tensors
        self.non_tensor_keys = list(non_tensor_keys)

    def load(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        tensor = self._tensors[key]
        return tensor.to(dtype) if dtype and tensor.is_floating_point() else tensor


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class _SafetensorsFile(TensorFile):
    """The safetensors layout: u64 little-endian header length, a JSON header {name: {dtype, shape,
    data_offsets}, "__metadata__": {...}}, then the tensor bytes (offsets relative to the end of the header)."""

    def __init__(self, path: Path):
        self._file = open(path, "rb")  # noqa: SIM115 - closed by close()
        try:
            size = path.stat().st_size
            head = self._file.read(8)
            if len(head) < 8:
                raise ValueError("file is shorter than a safetensors header")
            (length,) = struct.unpack("<Q", head)
            if length > size - 8:
                raise ValueError("header length runs past the end of the file")
            header = json.loads(self._file.read(length))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
            metadata = header.pop("__metadata__", None) or {}
            self._start, self._spans, meta = 8 + length, {}, {}
            for name, entry in header.items():
                dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype"))
                begin, end = entry["data_offsets"]
                shape = [int(n) for n in entry["shape"]]
                if dtype is None:
                    raise ValueError(f"{name}: unknown dtype {entry.get('dtype')}")
                numel = 1
                for n in shape:
                    numel *= n
                if end - begin != numel * dtype.itemsize or begin < 0 or self._start + end > size:
                    raise ValueError(f"tensor {name} lies outside the file")
                self._spans[name] = (begin, end)
                meta[name] = torch.empty(shape, dtype=dtype, device="meta")
        except (ValueError, KeyError, TypeError, OSError, UnicodeDecodeError) as err:
            self._file.close()
            raise _corrupt(path, err) from None
        super().__init__(path, meta, metadata)
        self._scratch = torch.empty(0, dtype=torch.uint8)

    def load(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        begin, end = self._spans[key]
        meta = self.meta[key]
        cast = dtype is not None and meta.is_floating_point() and dtype != meta.dtype
        # A tensor that will be cast is read into one reused buffer: fresh memory costs a page fault per 4 KiB.
        if cast and end - begin > self._scratch.numel():
            self._scratch = torch.empty(end - begin, dtype=torch.uint8)
        data = self._scratch[:end - begin] if cast else torch.empty(end - begin, dtype=torch.uint8)
        self._file.seek(self._start + begin)
        if self._file.readinto(data.numpy()) != end - begin:
            raise _corrupt(self.path, ValueError(f"tensor {key} is cut short"))
        tensor = data.view(meta.dtype).reshape(meta.shape)
        return torch.empty(meta.shape, dtype=dtype).copy_(tensor) if cast else tensor

    def close(self) -> None:
        self._file.close()
        self._scratch = torch.empty(0, dtype=torch.uint8)


def _check_is_file(path: Path) -> None:
    if not path.exists():
        raise UserError(f"{path}: no such file; check the path (and quote it if it has spaces)")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, expected a .safetensors or .ckpt file")


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
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=stub_pickle,
                          mmap=zipfile.is_zipfile(path))
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, AttributeError) as err:
        raise UserError(f"{path}: cannot be read safely ({err}); convert it to .safetensors with a trusted tool first") from None
