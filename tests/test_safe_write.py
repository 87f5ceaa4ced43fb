"""Writing by temporary name and rename: the result appears whole or not at all, with ordinary permissions."""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path

import pytest

from library.errors import UserError
from library.safe_write import atomic_dir, atomic_file, refuse_input_as_output, write_atomically


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


def test_a_full_disk_is_one_line_naming_the_file_and_the_free_space(tmp_path):
    dst = tmp_path / "model.safetensors"
    dst.write_bytes(b"old")
    with pytest.raises(UserError) as info:
        with atomic_file(dst) as tmp:
            tmp.write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
    message = str(info.value)
    assert message.startswith(f"could not write {dst}: No space left on device (") and "free on its disk" in message
    assert "\n" not in message and dst.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == [dst.name]


@pytest.mark.parametrize("raised", [
    # what safetensors and torch.save raise when the disk refuses a write (measured under RLIMIT_FSIZE)
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
    Exception("Error while serializing: I/O error: No space left on device (os error 28)"),
])
def test_writers_that_do_not_raise_oserror_are_recognised_and_bugs_are_not(tmp_path, raised):
    with pytest.raises(UserError, match="could not write .*b.bin: "):
        with atomic_dir(tmp_path / "folder") as tmp, atomic_file(tmp / "b.bin"):
            raise raised
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(KeyError):  # a bug is not a disk problem: it keeps its own exception and traceback
        with atomic_file(tmp_path / "a.bin"):
            raise KeyError("not a disk problem")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_final_rename_keeps_the_old_file_or_folder(tmp_path, monkeypatch):
    (tmp_path / "net-state").mkdir()
    (tmp_path / "net-state" / "old.bin").write_bytes(b"old")
    (tmp_path / "net.safetensors").write_bytes(b"old")
    real_replace = os.replace

    def rename_of_the_new_one_fails(src, dst):
        if Path(src).name.endswith(".tmp"):  # moving the old folder aside works, bringing the new one in does not
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", rename_of_the_new_one_fails)
    with pytest.raises(UserError, match="net-state: No space left on device"):
        with atomic_dir(tmp_path / "net-state") as tmp:
            (tmp / "new.bin").write_bytes(b"new")
    with pytest.raises(UserError, match="net.safetensors: No space left on device"):
        write_atomically(tmp_path / "net.safetensors", lambda tmp: tmp.write_bytes(b"new"))
    monkeypatch.setattr(os, "replace", real_replace)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net-state", "net.safetensors"]
    assert (tmp_path / "net-state" / "old.bin").read_bytes() == b"old"
    assert (tmp_path / "net.safetensors").read_bytes() == b"old"


def test_a_warning_comes_before_a_save_that_will_not_fit(tmp_path, monkeypatch):
    from library.safe_write import space_warning

    assert space_warning(tmp_path / "net.safetensors", 1000) is None
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 500, 500))
    warning = space_warning(tmp_path / "net.safetensors", 2_000_000)
    assert warning == (f"warning: net.safetensors needs about 2.0 MB but only 500 bytes is free on the disk holding "
                       f"{tmp_path}; free some space now or this save will fail")
