"""The suite's network guard (tests/netguard/sitecustomize.py, wired in conftest.py): a test during which this process
or any Python process it starts reaches beyond the machine fails; loopback stays open for the distributed tests."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

from tests.conftest import ROOT
from tests.netguard import sitecustomize as netguard


def test_a_test_that_reaches_for_the_network_fails_whether_it_or_its_child_did():
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_XDIST_WORKER"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider", "-o", "addopts=",
                           "-q", "tests/netguard/case.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"\b2 passed\b.*\b2 errors\b", proc.stdout), proc.stdout[-3000:]
    assert "name lookup of 'huggingface.co'" in proc.stdout
    assert "connection to ('93.184.215.14', 443)" in proc.stdout


def test_an_attempt_is_refused_as_offline_and_recorded_in_this_process_and_in_a_child(tmp_path, monkeypatch):
    log = tmp_path / "attempts.txt"
    monkeypatch.setenv(netguard.LOG_ENV, str(log))  # this test's own log, so the suite's fixture sees nothing
    try:
        socket.getaddrinfo("huggingface.co", 443)
    except socket.gaierror as exc:
        assert "network guard" in str(exc)
    else:
        raise AssertionError("the lookup was not refused")
    child = subprocess.run([sys.executable, "-c", "import socket; socket.gethostbyname('pypi.org')"],
                           capture_output=True, text=True, timeout=60)
    assert child.returncode == 1 and "refused by the test suite's network guard" in child.stderr
    lines = log.read_text().splitlines()
    assert [line.split(" (pid")[0] for line in lines] == ["name lookup of 'huggingface.co'", "name lookup of 'pypi.org'"]
    assert lines[0].endswith(f"(pid {os.getpid()})") and not lines[1].endswith(f"(pid {os.getpid()})")


def test_loopback_and_this_hosts_name_stay_open(tmp_path, monkeypatch):
    log = tmp_path / "attempts.txt"
    monkeypatch.setenv(netguard.LOG_ENV, str(log))
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(("localhost", server.getsockname()[1]), timeout=5):
            pass
    socket.getaddrinfo(socket.gethostname(), None)
    assert not log.exists()
