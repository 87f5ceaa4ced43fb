"""Shared fixtures: seeded tiny random models of every registered family, in every format, and small image +
caption folders."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Before anything else imports a library that might reach for the network: the suite's network guard, in this process
# and (its folder first on PYTHONPATH, as `sitecustomize`) in every Python process a test starts.
from tests.netguard import sitecustomize as netguard

NETLOG = Path(tempfile.mkstemp(prefix="sd-trainer-netlog-", suffix=".txt")[1])
os.environ[netguard.LOG_ENV] = str(NETLOG)
NETGUARD_PATH = str(Path(netguard.__file__).parent)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (NETGUARD_PATH, os.environ.get("PYTHONPATH")) if p)
netguard.install()

import pytest  # noqa: E402
import torch  # noqa: E402

from library.models.family import tiny_model_names
from library.models.saving import save_diffusers, to_ldm_state_dict
from library.models.tiny import build_tiny
from tests.helpers import make_image_folder

ROOT = Path(__file__).resolve().parent.parent


def python_path(*first) -> str:
    """A PYTHONPATH for a child process: `first`, then the inherited one (which starts with the network guard)."""
    return os.pathsep.join([*map(str, first), os.environ["PYTHONPATH"]])

# Under pytest-xdist each worker gets one core's worth of threads: two workers with two OpenMP threads each on
# a 2-core machine spin against each other and run 10-30x slower.
# The processes the tests start (scripts, tools, DDP ranks) inherit one thread too.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
GOLDEN = Path(__file__).resolve().parent / "golden"


@pytest.fixture(scope="session")
def tiny_parts():
    """name -> Components of the seeded tiny models (built once; tests must not modify them)."""
    return {name: build_tiny(name, seed=0) for name in tiny_model_names()}


@pytest.fixture(scope="session")
def tiny_files(tiny_parts, tmp_path_factory):
    """name -> {"safetensors", "ckpt", "diffusers"} paths of the tiny models written in every format.

    The single files are written straight from the ldm state dict with safetensors.save_file / torch.save (not
    through our savers), so loading tests do not lean on the code they check; the folder via save_pretrained.
    """
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("tiny-models")
    out = {}
    for name, parts in tiny_parts.items():
        sd = to_ldm_state_dict(parts)
        paths = {"safetensors": root / f"{name}.safetensors", "ckpt": root / f"{name}.ckpt", "diffusers": root / name}
        save_file(sd, str(paths["safetensors"]))
        torch.save({"state_dict": sd, "epoch": 0, "global_step": 0}, paths["ckpt"])
        save_diffusers(parts, paths["diffusers"])
        out[name] = paths
    return out


@pytest.fixture
def image_folder(tmp_path):
    """Factory: image_folder(**kwargs) -> a fresh `<repeats>_<class>` folder under tmp_path."""
    return lambda **kwargs: make_image_folder(tmp_path / "train", **kwargs)


def pytest_collection_finish(session):
    """Every test module is imported now: freeze what is alive (the libraries' objects), as a training run does at
    start-up, so the explicit collections of the many in-process runs scan only what the tests created. Without
    it those collections took a third of tests/test_train_network.py's time (68 of them, 23 s of 72 s)."""
    from library.training.memory import freeze_long_lived_objects

    freeze_long_lived_objects()


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite tests/golden files from the current code (review the diff before committing)")


@pytest.fixture
def golden(request):
    """golden(name, value): compare `value` with tests/golden/<name>.json, or rewrite it with --update-golden."""
    import json

    def check(name: str, value):
        path = GOLDEN / f"{name}.json"
        if request.config.getoption("--update-golden"):
            path.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")
        assert path.exists(), f"{path} missing: run pytest --update-golden and review the new file"
        assert value == json.loads(path.read_text()), f"{path.name} differs (pytest --update-golden to accept)"

    return check


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a busy machine OpenMP's spin-waits make them 10x slower
    (modules opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_netlog_checked = 0  # how much of NETLOG earlier tests have answered for


@pytest.fixture(autouse=True)
def offline():
    """Fails the test during which this process or any process it started reached beyond this machine (see
    tests/netguard/sitecustomize.py); the attempt itself was refused as an offline machine refuses it. An attempt made
    while the test modules were imported fails the first test to run in the process."""
    global _netlog_checked
    yield
    with open(NETLOG, encoding="utf-8") as log:
        log.seek(_netlog_checked)
        attempts = log.read()
        _netlog_checked = log.tell()
    if attempts:
        pytest.fail("reached for the network (ground rule 2: offline at run time), during this test or, for the first "
                    "test in a process, while modules were imported:\n" + attempts, pytrace=False)


def pytest_unconfigure(config):
    NETLOG.unlink(missing_ok=True)
