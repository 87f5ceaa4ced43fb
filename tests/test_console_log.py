"""--console_log_level / --console_log_file: the console lines filtered by level and written to a file instead."""

from __future__ import annotations

import io
import sys

import pytest

from library.console import console_log, line_level
from library.data.demo import make_demo_dataset
from library.errors import UserError


def _say():
    print("loading the model")
    print("warning: something odd")
    print("a note", file=sys.stderr)
    print("error: bad", file=sys.stderr)


def test_lines_below_the_level_are_dropped(capsys):
    with console_log("WARNING", None):
        _say()
    out, err = capsys.readouterr()
    assert out == "warning: something odd\n" and err == "a note\nerror: bad\n"
    with console_log("ERROR", None):
        _say()
    out, err = capsys.readouterr()
    assert out == "" and err == "error: bad\n"
    with console_log("DEBUG", None):
        _say()
    assert capsys.readouterr().out == "loading the model\nwarning: something odd\n"


def test_a_log_file_gets_the_lines_instead_of_the_console_but_not_progress_bars(tmp_path, capsys):
    log = tmp_path / "run.log"
    log.write_text("an older run\n")
    with console_log(None, str(log)):
        _say()
        sys.stderr.write("\r 10%|#   | 1/10")
        sys.stderr.write("\r100%|####| 10/10\n")
    out, err = capsys.readouterr()
    assert out == "" and "100%" in err and "a note" not in err
    assert log.read_text() == "loading the model\nwarning: something odd\na note\nerror: bad\n"  # written afresh


def test_the_error_that_ends_a_run_is_in_the_file_too(tmp_path):
    log = tmp_path / "run.log"
    with pytest.raises(UserError), console_log("INFO", str(log)):
        raise UserError("no training images")
    assert log.read_text() == "error: no training images\n"


def test_a_binary_file_is_not_overwritten_by_the_log(tmp_path):
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"\x08\0\0\0\0\0\0\0{}")
    with pytest.raises(UserError, match="is not a text file"), console_log(None, str(model)):
        pass
    assert model.read_bytes() == b"\x08\0\0\0\0\0\0\0{}"


def test_levels_come_from_the_line_start():
    assert line_level("Warning: x", 20) == 30 and line_level("error: x", 20) == 40 and line_level("x", 20) == 20


def test_a_training_run_writes_its_log_file(tmp_path, capsys):
    import train_network

    make_demo_dataset(tmp_path / "data", count=2, size=32)
    log = tmp_path / "train.log"
    train_network.main(["--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", str(tmp_path / "data"),
                        "--caption_extension", ".txt", "--resolution", "32", "--output_dir", str(tmp_path / "out"),
                        "--max_train_steps", "1", "--network_dim", "4", "--max_data_loader_n_workers", "0",
                        "--console_log_file", str(log), "--console_log_level", "INFO"])
    assert "training images" in log.read_text() and "training images" not in capsys.readouterr().out


class _Raw(io.RawIOBase):
    """A console as the OS sees it: each write it receives (what a pipe shared by the ranks would get)."""

    def __init__(self):
        self.writes = []

    def writable(self):
        return True

    def write(self, data):
        self.writes.append(bytes(data).decode())
        return len(data)


def test_a_trainer_writes_each_line_whole_even_unbuffered(tmp_path, monkeypatch):
    # Ranks under accelerate launch share the console. With PYTHONUNBUFFERED, Python's stderr is a write-through text
    # layer over the file itself, and print() hands it the text, then the newline: two writes another rank's line
    # could fall between. Every rank warns here (a TOML key another script uses), so every rank's line must be whole.
    import train_network

    out, err = _Raw(), _Raw()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(out, encoding="utf-8", write_through=True))
    monkeypatch.setattr(sys, "stderr", io.TextIOWrapper(err, encoding="utf-8", write_through=True))
    make_demo_dataset(tmp_path / "data", count=2, size=32, folder="1_sks shape")
    cfg = tmp_path / "cfg.toml"
    cfg.write_text("stop_text_encoder_training = 100\n")
    train_network.main(["--config_file", str(cfg), "--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir",
                        str(tmp_path / "data"), "--caption_extension", ".txt", "--resolution", "32", "--dry_run"])
    sys.stdout.flush(), sys.stderr.flush()
    assert any("train_network.py ignores it" in line for line in err.writes)
    assert len(out.writes) > 3  # the dry run's plan
    for writes in (out.writes, err.writes):
        assert all(text.endswith("\n") for text in writes), writes
