"""Shared fixtures: seeded tiny random models of every registered family, in every format, and small image +
caption folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from library.models.family import tiny_model_names
from library.models.saving import save_diffusers, to_ldm_state_dict
from library.models.tiny import build_tiny
from tests.helpers import make_image_folder

ROOT = Path(__file__).resolve().parent.parent

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
