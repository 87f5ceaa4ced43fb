"""Reading checkpoints tensor by tensor (open_checkpoint): same tensors as the safetensors library, clear errors."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.errors import UserError
from library.models.checkpoint_io import open_checkpoint

ODD_TENSORS = {
    "f32": torch.randn(3, 5),
    "f16": torch.randn(7).half(),
    "bf16": torch.randn(2, 2, 2).bfloat16(),
    "f64": torch.randn(4).double(),
    "i64": torch.arange(6).reshape(2, 3),
    "i8": torch.tensor([-3, 4], dtype=torch.int8),
    "u8": torch.tensor([250, 1], dtype=torch.uint8),
    "bool": torch.tensor([True, False, True]),
    "scalar": torch.tensor(0.5),
    "empty": torch.zeros(0, 4),
}


def test_reads_every_tensor_as_the_safetensors_library_does(tmp_path):
    path = tmp_path / "odd.safetensors"
    save_file(ODD_TENSORS, str(path), metadata={"ss_network_dim": "4"})
    reference = load_file(str(path))
    with open_checkpoint(path) as file:
        assert sorted(file.keys()) == sorted(reference)
        assert file.metadata == {"ss_network_dim": "4"}
        for key, expected in reference.items():
            assert file.meta[key].device.type == "meta"
            assert (file.meta[key].shape, file.meta[key].dtype) == (expected.shape, expected.dtype)
            got = file.load(key)
            assert got.dtype == expected.dtype and torch.equal(got, expected), key


def test_cast_on_read_converts_floats_only_and_returns_independent_tensors(tmp_path):
    path = tmp_path / "odd.safetensors"
    save_file(ODD_TENSORS, str(path))
    with open_checkpoint(path) as file:
        first = file.load("f16", torch.float32)
        second = file.load("bf16", torch.float32)  # reuses the read buffer; `first` must not change
        assert first.dtype == torch.float32 and torch.equal(first, ODD_TENSORS["f16"].float())
        assert torch.equal(second, ODD_TENSORS["bf16"].float())
        assert file.load("i64", torch.float32).dtype == torch.int64
        assert file.load("bool", torch.float32).dtype == torch.bool


def test_pickled_checkpoints_open_the_same_way(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"a.weight": torch.randn(2, 3).half()}, "epoch": 3, "global_step": 10}, path)
    with open_checkpoint(path) as file:
        assert file.keys() == ["a.weight"]
        assert file.non_tensor_keys == []  # "state_dict" is unwrapped; epoch/global_step sit outside it
        assert file.load("a.weight", torch.float32).dtype == torch.float32


def _write_raw(path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("case", ["short", "header_past_end", "not_json", "data_past_end", "unknown_dtype", "wrong_size"])
def test_damaged_safetensors_files_are_one_clear_error(case, tmp_path):
    path = tmp_path / f"{case}.safetensors"
    entry = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    if case == "short":
        path.write_bytes(b"\x01\x02")
    elif case == "header_past_end":
        path.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    elif case == "not_json":
        path.write_bytes(struct.pack("<Q", 5) + b"nope!")
    elif case == "data_past_end":
        _write_raw(path, {"w": entry}, b"\x00" * 4)
    elif case == "unknown_dtype":
        _write_raw(path, {"w": entry | {"dtype": "Q7"}}, b"\x00" * 8)
    else:
        _write_raw(path, {"w": entry | {"shape": [3]}}, b"\x00" * 8)
    with pytest.raises(UserError, match=rf"{case}\.safetensors: not a readable \.safetensors file .*truncated or corrupt"):
        open_checkpoint(path)


def test_missing_file_and_folder_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        open_checkpoint(tmp_path / "absent.safetensors")
    with pytest.raises(UserError, match="is a folder"):
        open_checkpoint(tmp_path)
