"""Stopping a run from outside: SIGTERM (schedulers, `docker stop`, preemption) saves the adapter and a state like
Ctrl+C does; Ctrl+C before training began is one line and exit code 130. Real processes, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest

from library.data.demo import make_demo_dataset
from tests.conftest import ROOT, python_path

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

REQUIRED = ["optimizer.bin", "scheduler.bin", "custom_checkpoint_0.pkl", "random_states_0.pkl", "train_state.json"]


def _start(tmp_path, steps: int, workers: int = 0) -> subprocess.Popen:
    make_demo_dataset(tmp_path / "data", count=2, size=32)
    argv = ["--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", str(tmp_path / "data"),
            "--caption_extension", ".txt", "--resolution", "32", "--output_dir", str(tmp_path / "out"),
            "--output_name", "net", "--max_train_steps", str(steps), "--network_dim", "4", "--seed", "1",
            "--max_data_loader_n_workers", str(workers),
            # --color_aug: pixels change every epoch, so no latent cache, and the loader really starts its workers
            # (latents cached as training first needs them are encoded in the main process, without workers)
            *(["--persistent_data_loader_workers", "--color_aug"] if workers else [])]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    # A session of its own, so a signal can go to the run's whole process group (its loader workers too).
    return subprocess.Popen([sys.executable, str(ROOT / "train_network.py"), *argv], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _signal_after(proc: subprocess.Popen, line_start: str, signum: int, *, group: bool = False) -> tuple[str, str]:
    """Read stdout until a line starting with `line_start`, send `signum`, then collect everything."""
    watchdog = threading.Timer(300, proc.kill)  # a hung run fails the test instead of hanging it
    watchdog.start()
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.append(proc.stderr.read()), daemon=True)
    reader.start()  # the progress bar writes to stderr: keep its pipe drained
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith(line_start):
                os.killpg(proc.pid, signum) if group else proc.send_signal(signum)
                break
        else:
            raise AssertionError(f"the run ended before printing {line_start!r}:\n{''.join(seen)}")
        rest = proc.stdout.read()
        proc.wait(timeout=240)
        reader.join(timeout=10)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
    return "".join(seen) + rest, "".join(stderr)


# `docker stop` signals the main process; timeout, Slurm's scancel or a closing terminal signal the whole group,
# data-loader workers included, and a worker killed by it must not abort the save.
@pytest.mark.parametrize("workers, group", [(0, False), (2, True)], ids=["main process", "process group, 2 workers"])
def test_sigterm_during_training_saves_the_adapter_and_a_complete_state(tmp_path, workers, group):
    proc = _start(tmp_path, steps=100_000, workers=workers)
    out, err = _signal_after(proc, "first step took", signal.SIGTERM, group=group)
    assert proc.returncode == 128 + signal.SIGTERM, out + err
    assert "Traceback" not in err
    said = [line for line in out.splitlines() if line.startswith("terminated (SIGTERM) at step ")]
    step = int(said[0].split()[4].rstrip(":"))
    model = tmp_path / "out" / f"net-step{step:08d}.safetensors"
    assert said[-1] == f"terminated (SIGTERM) at step {step}: saved {model} and its -state folder (continue with --resume)"
    from safetensors.torch import load_file

    from library.training.checkpoints import state_problem

    assert any(key.endswith("lora_up.weight") for key in load_file(model))

    assert state_problem(tmp_path / "out" / f"net-step{step:08d}-state", REQUIRED) is None


def test_ctrl_c_during_start_up_is_one_line_and_exit_code_130(tmp_path):
    proc = _start(tmp_path, steps=2)
    # The plan is printed first; libraries, options and models load after it.
    out, err = _signal_after(proc, "steps: ", signal.SIGINT)
    assert proc.returncode == 130, out + err
    assert "Traceback" not in err and "training starts" not in out
    assert err.strip().splitlines()[-1] == ("interrupted during start-up, before training began: no model or state "
                                            "was saved")
    assert not list((tmp_path / "out").glob("*.safetensors"))


# A loader iterator still alive when the interpreter exits: what a run stopped by an error leaves (its traceback holds
# the iterator, so the workers were never shut down). multiprocessing's exit hook sends them SIGTERM and waits.
_EXIT_WITH_LIVE_WORKERS = """
import sys
from library.training.data_loading import EpochBatchSampler, make_loader

class Data:
    epoch = 1
    def __len__(self): return 4
    def set_epoch(self, epoch): self.epoch = epoch
    def set_step(self, step): pass
    def __getitem__(self, index): return index

kept = iter(make_loader(Data(), EpochBatchSampler(4, start_epoch=1, epochs=1), workers=2, persistent=False))
print(next(kept), flush=True)
sys.exit(2)
"""


def test_the_process_exits_while_loader_workers_that_ignore_sigterm_are_alive():
    # Before: the workers ignored that SIGTERM too and the process waited for them forever (--strict on a broken
    # image with --max_data_loader_n_workers 2 never returned to the shell).
    run = subprocess.run([sys.executable, "-c", _EXIT_WITH_LIVE_WORKERS], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env=dict(os.environ, PYTHONPATH=python_path(ROOT)))
    assert run.returncode == 2 and run.stdout.split() == ["(1,", "0,", "0)"], run.stdout + run.stderr
    assert "Traceback" not in run.stderr and "killed by signal" not in run.stderr, run.stderr
