"""Writing by temporary name and rename: the result appears whole or not at all, with ordinary permissions."""

from __future__ import annotations

import os
import stat

import pytest

from library.errors import UserError
from library.safe_write import atomic_dir, atomic_file, refuse_input_as_output


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    dst = tmp_path / "model.safetensors"
    dst.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_file(dst) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash")
    assert dst.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_new_files_and_folders_get_the_umask_mode_and_a_replaced_file_keeps_its_own(tmp_path):
    old_mask = os.umask(0o022)
    try:
        with atomic_file(tmp_path / "new.bin") as tmp:
            tmp.write_bytes(b"x")
        assert stat.S_IMODE((tmp_path / "new.bin").stat().st_mode) == 0o644  # not mkstemp's 0600
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "a").write_bytes(b"x")
        assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o755
        (tmp_path / "shared.bin").write_bytes(b"old")
        os.chmod(tmp_path / "shared.bin", 0o664)
        with atomic_file(tmp_path / "shared.bin") as tmp:
            tmp.write_bytes(b"new")
        assert stat.S_IMODE((tmp_path / "shared.bin").stat().st_mode) == 0o664
    finally:
        os.umask(old_mask)


def test_an_input_is_never_an_output(tmp_path):
    src = tmp_path / "a.safetensors"
    src.write_bytes(b"x")
    refuse_input_as_output(tmp_path / "b.safetensors", [src], "--save_to")  # a new path is fine
    with pytest.raises(UserError, match="--save_to .*a.safetensors: is also an input"):
        refuse_input_as_output(tmp_path / "." / "a.safetensors", [src], "--save_to")
