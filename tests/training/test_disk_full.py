"""A full disk never ends in a traceback: whatever was being written (model, state, options, latent cache, sample
image) stops the run with one line naming it and the free space, its half-written file is gone, and every file
saved before is byte-identical. A save that will not fit is announced before it starts."""

from __future__ import annotations

import errno
import re
import shutil
from pathlib import Path

import pytest

import train_network
from library.data.demo import make_demo_dataset
from tests.helpers import tiny_lora_flags

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture
def data(tmp_path):
    make_demo_dataset(tmp_path / "data", count=2, size=32)
    return tmp_path / "data"


def _flags(data, out, *extra, steps=2):
    return tiny_lora_flags(data, out, *extra, steps=steps, seed=2)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _one_error_line(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        train_network.main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and "Traceback" not in err and len(errors) == 1, err
    return errors[0]


def test_a_full_disk_during_a_model_save_keeps_every_earlier_file(data, tmp_path, capsys, monkeypatch):
    import networks.files

    out = tmp_path / "out"
    argv = _flags(data, out, "--save_every_n_steps", "1", "--save_state")
    train_network.main(argv)
    before = _files(out)
    assert "net-step00000001.safetensors" in before and "net-state/optimizer.bin" in before

    def half_then_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)  # what got onto the disk before it filled up
        raise ENOSPC

    monkeypatch.setattr(networks.files, "save_file", half_then_full)
    line = _one_error_line(capsys, argv)  # the same run again: its first save would replace step 1's file
    assert line.startswith(f"error: could not write {out / 'net-step00000001.safetensors'}: No space left on device (")
    assert "free on its disk); files saved before are intact" in line
    assert _files(out) == before  # byte-identical, and no temporary file left anywhere


@pytest.mark.parametrize("writer", ["options", "latent cache", "sample image"])
def test_every_writer_stops_with_one_line_on_a_full_disk(writer, data, tmp_path, capsys, monkeypatch):
    """All files go through library.safe_write, so each writer gets the same one line."""
    import numpy as np
    from PIL import Image

    out = tmp_path / "out"
    extra, target = [], None
    if writer == "options":
        real = Path.write_text

        def full(self, *args, **kwargs):
            if ".config.toml." in self.name:
                raise ENOSPC
            return real(self, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", full)
        target = out / "net.config.toml"
    elif writer == "latent cache":
        extra = ["--cache_latents", "--cache_latents_to_disk"]
        monkeypatch.setattr(np, "savez", lambda *a, **k: (_ for _ in ()).throw(ENOSPC))
        target = data
    else:
        (tmp_path / "p.txt").write_text("sks shape --w 32 --h 32 --s 1\n")
        extra = ["--sample_prompts", str(tmp_path / "p.txt"), "--sample_every_n_steps", "1"]
        monkeypatch.setattr(Image.Image, "save", lambda *a, **k: (_ for _ in ()).throw(ENOSPC))
        target = out / "sample"
    line = _one_error_line(capsys, _flags(data, out, *extra, steps=1))
    assert line.startswith(f"error: could not write {target}") and ": No space left on device (" in line
    assert not [p for p in tmp_path.rglob(".*") if p.name.endswith(".tmp")]  # no half-written file left


def test_a_save_that_will_not_fit_is_announced_before_it_starts(data, tmp_path, capsys, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=1000))
    result = train_network.main(_flags(data, tmp_path / "out", "--save_state", steps=1))
    said = capsys.readouterr().out
    assert result.global_step == 1  # only a warning: the real disk had room
    # Before the first save the estimate is the trainable weights (x3 for a state: the optimizer's two moments).
    for name in ("net.safetensors", "net-state"):
        expected = (rf"^warning: {name} needs about [0-9.]+ KB but only 1.0 KB is free on the disk holding "
                    rf"{re.escape(str(tmp_path / 'out'))}; free some space now or this save will fail$")
        assert re.search(expected, said, re.M), said
