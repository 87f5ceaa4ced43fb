"""Torch pickles (.pt/.ckpt) that AUTOMATIC1111's safe unpickler accepts and every torch.load reads.

A1111 (modules/safe.py, on by default) opens a .pt as a zip and refuses it as "may be malicious" when an entry is not
`<dir>/data.pkl`, `<dir>/data/<n>` or `<dir>/version` (1.10 also allows `byteorder` and `.data/serialization_id`),
or when the pickle names a global outside a short list (OrderedDict, `torch._utils._rebuild_tensor_v2`, the
`torch.*Storage` classes, ...). torch.save of torch >= 2.x adds `.format_version` and `.storage_alignment`, and
torch offers no switch to leave them out, so the zip is written here by hand, in torch's own layout: the pickle
references tensors through ("storage", torch.<Type>Storage, key, "cpu", numel) persistent ids and each storage is
a stored (uncompressed) entry `archive/data/<key>`, aligned to 64 bytes like torch's writer so mmap loading works.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import sys
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import torch

from library.safe_write import write_atomically

ARCHIVE = "archive"  # the zip's one folder; torch uses the file stem, any single name is accepted
FORMAT_VERSION = b"3\n"  # what torch writes in `version`
ALIGNMENT = 64  # torch's storage alignment: data offsets are multiples of it
PICKLE_PROTOCOL = 2  # torch.save's default, which every torch and A1111 reads
# The storage classes A1111's unpickler allows, by dtype; a tensor of another dtype could not be loaded there.
STORAGE_TYPES = {
    torch.float32: "FloatStorage", torch.float16: "HalfStorage", torch.bfloat16: "BFloat16Storage",
    torch.float64: "DoubleStorage", torch.int64: "LongStorage", torch.int32: "IntStorage", torch.uint8: "ByteStorage",
}
_PLAIN = (dict, list, tuple, str, int, float, bool, type(None), collections.OrderedDict)
_ZIP64_LOCAL_EXTRA = 20  # the zip64 size record zipfile adds to a large entry's local header
_PADDING_ID = 0x4246  # "FB", the extra-field id torch's writer pads with


class _StorageRef:
    """Stands for one tensor's bytes in the pickle; becomes a persistent id and an `archive/data/<key>` entry."""

    def __init__(self, key: str, tensor: torch.Tensor):
        self.key, self.tensor = key, tensor


class _Pickler(pickle.Pickler):
    """Pickles plain containers and tensors only, so the file names no global A1111 would refuse."""

    def __init__(self, file: BinaryIO):
        super().__init__(file, protocol=PICKLE_PROTOCOL)
        self.storages: list[_StorageRef] = []
        self._allowed_globals = (torch._utils._rebuild_tensor_v2, collections.OrderedDict,
                                 *(getattr(torch, name) for name in STORAGE_TYPES.values()))

    def persistent_id(self, obj: Any):
        if isinstance(obj, _StorageRef):
            storage_type = getattr(torch, STORAGE_TYPES[obj.tensor.dtype])
            return "storage", storage_type, obj.key, "cpu", obj.tensor.numel()
        return None

    def reducer_override(self, obj: Any):
        if isinstance(obj, torch.Tensor):
            return self._reduce_tensor(obj)
        if type(obj) in _PLAIN or any(obj is allowed for allowed in self._allowed_globals):
            return NotImplemented  # pickled the ordinary way: no global, or one A1111 allows
        raise TypeError(f"cannot write a {type(obj).__name__} into an A1111-safe pickle; only dicts, lists, tuples, "
                        f"str, int, float, bool, None and tensors are allowed")

    def _reduce_tensor(self, tensor: torch.Tensor):
        if tensor.dtype not in STORAGE_TYPES:
            raise TypeError(f"cannot write a {tensor.dtype} tensor into an A1111-safe pickle; A1111 loads "
                            f"{', '.join(str(d).removeprefix('torch.') for d in STORAGE_TYPES)} only")
        # Each tensor gets its own contiguous storage: no view ever drags a larger shared buffer into the file.
        # It stays on its device until written, so a GPU model is copied to the CPU one tensor at a time.
        ref = _StorageRef(str(len(self.storages)), tensor.detach().contiguous())
        self.storages.append(ref)
        shape = tuple(tensor.shape)
        # requires_grad False and no backward hooks: the arguments torch itself pickles for a plain tensor.
        return torch._utils._rebuild_tensor_v2, (ref, 0, shape, _contiguous_strides(shape), False,
                                                 collections.OrderedDict())


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def write_pickle(obj: Any, file: str | os.PathLike | BinaryIO) -> None:
    """Write `obj` (nested dicts/lists/tuples of plain values and tensors) as an A1111-safe torch zip pickle."""
    buffer = io.BytesIO()
    pickler = _Pickler(buffer)
    pickler.dump(obj)
    with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED) as archive:
        _write_entry(archive, "data.pkl", buffer.getbuffer())
        # A big-endian writer must say so (a missing byteorder means little); A1111 1.10 allows the entry.
        if sys.byteorder != "little":
            _write_entry(archive, "byteorder", sys.byteorder.encode())
        for ref in pickler.storages:
            _write_entry(archive, f"data/{ref.key}", _tensor_bytes(ref.tensor))
        _write_entry(archive, "version", FORMAT_VERSION)


def save_pickle(obj: Any, path: str | os.PathLike) -> Path:
    """write_pickle to a temporary file renamed onto `path` once complete."""
    return write_atomically(path, lambda tmp: write_pickle(obj, tmp))


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    # Through uint8, so bf16 (which numpy lacks) and 0-d tensors come out as their raw bytes without a copy.
    return memoryview(tensor.to("cpu").reshape(-1).view(torch.uint8).numpy())


def _write_entry(archive: zipfile.ZipFile, name: str, data) -> None:
    info = zipfile.ZipInfo(f"{ARCHIVE}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = len(data)
    # zipfile's own rule for giving a local header a zip64 record when the entry may pass 4 GiB.
    zip64 = info.file_size * 1.05 > zipfile.ZIP64_LIMIT
    header = 30 + len(info.filename.encode("utf-8")) + (_ZIP64_LOCAL_EXTRA if zip64 else 0)
    # Pad the local header with an extra field so the entry's data starts on an ALIGNMENT boundary.
    padding = (-(archive.fp.tell() + header + 4)) % ALIGNMENT
    info.extra = struct.pack("<HH", _PADDING_ID, padding) + b"Z" * padding
    with archive.open(info, "w", force_zip64=zip64) as entry:
        entry.write(data)
