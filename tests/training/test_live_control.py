"""Live control: a `control` file in the output folder, or SIGUSR1, asks a running training for a sample, a save, a
state or a clean stop, done after the current step."""

from __future__ import annotations

import os
import signal

import pytest

import train_network
from library.training.reporting import Reporter
from tests.helpers import make_image_folder


def _train(tmp_path, *extra, steps=4):
    return train_network.main([
        "--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", str(tmp_path / "data"),
        "--caption_extension", ".txt", "--resolution", "32", "--output_dir", str(tmp_path / "out"), "--output_name",
        "net", "--max_train_steps", str(steps), "--learning_rate", "1e-3", "--network_dim", "4", "--seed", "3",
        "--max_data_loader_n_workers", "0", *extra])


@pytest.fixture
def data(tmp_path):
    make_image_folder(tmp_path / "data", repeats=4, count=2, caption_extension=".txt", sizes=((32, 32),))
    (tmp_path / "p.txt").write_text("a dog --w 64 --h 64 --s 1 --d 1\n")


def _at_step(monkeypatch, step: int, action) -> None:
    """Run `action` just before the reporter's bookkeeping of optimizer step `step` (as if during that step)."""
    original = Reporter.after_step

    def after_step(self, state, loss, lr_scheduler):
        if state.global_step == step:
            action()
        return original(self, state, loss, lr_scheduler)

    monkeypatch.setattr(Reporter, "after_step", after_step)


def test_a_control_file_asks_for_a_sample_and_a_state_after_the_step(data, tmp_path, monkeypatch, capsys):
    control = tmp_path / "out" / "control"
    _at_step(monkeypatch, 2, lambda: control.write_text("sample\nstate bogus\n"))
    result = _train(tmp_path, "--sample_prompts", str(tmp_path / "p.txt"))
    assert result.global_step == 4  # it went on
    out = tmp_path / "out"
    assert list((out / "sample").glob("net_000002_00_*_1.png"))  # the sample of step 2, not of another step
    assert (out / "net-step00000002.safetensors").is_file() and (out / "net-step00000002-state").is_dir()
    assert not control.exists()  # done, so removed
    log = capsys.readouterr().out
    assert f"control ({control}): sample, state now" in log and "unknown 'bogus' ignored" in log


def test_stop_ends_cleanly_after_the_step_with_the_final_files(data, tmp_path, monkeypatch):
    _at_step(monkeypatch, 2, lambda: (tmp_path / "out" / "control").write_text("stop"))
    result = _train(tmp_path)
    assert result.global_step == 2 and (tmp_path / "out" / "net.safetensors").is_file()


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="SIGUSR1 is POSIX")
def test_sigusr1_saves_the_model_and_a_state_within_one_step(data, tmp_path, monkeypatch, capsys):
    _at_step(monkeypatch, 1, lambda: os.kill(os.getpid(), signal.SIGUSR1))
    result = _train(tmp_path)
    assert result.global_step == 4
    assert (tmp_path / "out" / "net-step00000001-state").is_dir()
    assert "control (SIGUSR1): state now" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # the handler is gone with the run
