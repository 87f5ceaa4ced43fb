"""launch.py, the documented launcher: `accelerate launch` whose failed runs end with the trainer's one line and exit
code, never the launcher's traceback or torchrun's failure report — for one process and for several."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from library.launch import said_its_line
from tests.conftest import ROOT

BAD_OPTION = "error: unknown option --network_dimm (did you mean '--network_dim'?)"


def _launch(*argv: str, timeout: int = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "launch.py", *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("processes", [1, 2], ids=["one", "two"])
def test_a_bad_option_ends_with_our_one_line_and_exit_code_2(processes):
    # --multi_gpu runs torchrun's launcher; without a GPU both processes run on the CPU, which is all this needs.
    several = ["--multi_gpu", "--main_process_port", str(_free_port())] if processes > 1 else []
    proc = _launch(*several, "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "train_network.py", "--network_dimm", "4")
    said = proc.stdout + proc.stderr
    assert proc.returncode == 2, said
    assert "Traceback" not in said and "CalledProcessError" not in said and "FAILED" not in said, said
    assert "exitcode" not in said and "closing signal" not in said, said
    errors = [line for line in said.splitlines() if "error" in line.lower()]
    assert errors and set(errors) == {BAD_OPTION}, said  # one line per process, each the trainer's own


def test_a_crash_keeps_its_traceback_and_exit_code(tmp_path):
    script = tmp_path / "crash.py"
    script.write_text("import sys\nprint('boom', file=sys.stderr)\nsys.exit(3)\n")
    proc = _launch("--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   str(script))
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.strip().splitlines()[-2:] == ["boom", f"launch.py: {script} exited with code 3"]
    assert "CalledProcessError" not in proc.stderr


def test_several_processes_are_quiet_only_when_every_failed_one_said_its_line():
    stopped = -signal.SIGTERM  # the processes torchrun stops after the first failure
    assert said_its_line([2, stopped]) == 2
    assert said_its_line([130]) == 130
    assert said_its_line([stopped, 2, 2]) == 2
    assert said_its_line([2, 1]) is None  # a crash deserves torchrun's report
    assert said_its_line([2, -signal.SIGKILL]) is None  # so does a process killed from outside
    assert said_its_line([stopped]) is None
