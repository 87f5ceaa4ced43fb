"""The base model is checked first: a wrong kind of file is refused from its header before the dataset is scanned,
and the resolved options (`<name>.config.toml`) are written only once the models have loaded."""

from __future__ import annotations

import pytest

import train_network
from library.data.demo import make_demo_dataset
from library.errors import UserError
from library.models.detect import check_base_model
from library.models.loading import load_components
from tests.models.test_bad_input import CASES, _bad_inputs


@pytest.fixture
def data(tmp_path):
    make_demo_dataset(tmp_path / "data", count=2, size=32, folder="1_sks shape")
    return tmp_path / "data"


def _flags(model, data, out, *extra):
    return ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--caption_extension",
            ".txt", "--resolution", "32", "--output_dir", str(out), "--output_name", "net", "--max_train_steps", "1",
            "--network_dim", "4", *extra]


def _one_error_line(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        train_network.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("case", CASES)
def test_a_wrong_base_model_is_refused_before_the_dataset_is_scanned(case, tiny_files, data, tmp_path, capsys,
                                                                      monkeypatch):
    import library.data.plan

    def scanned(*args, **kwargs):
        raise AssertionError("the dataset was scanned before the base model was checked")

    monkeypatch.setattr(library.data.plan, "plan_run", scanned)
    path, phrase = _bad_inputs(tmp_path, tiny_files)[case]
    out = tmp_path / "out"
    line = _one_error_line(capsys, _flags(path, data, out))
    # The same message as the loader's: one classification serves both.
    with pytest.raises(UserError) as loader_error:
        load_components(str(path))
    assert line == f"error: {loader_error.value}" and phrase in line and str(path) in line
    assert not list(out.glob("*.config.toml"))


def test_the_header_check_passes_every_real_base_model(tiny_files):
    for files in tiny_files.values():
        for path in files.values():
            check_base_model(str(path))
    check_base_model("tiny-sd1")


def test_a_run_that_fails_while_loading_the_model_leaves_no_options_file(tiny_files, data, tmp_path, capsys):
    out = tmp_path / "out"
    # An SD 1.x model with --v2 passes the header check and fails in the loader.
    line = _one_error_line(capsys, _flags(tiny_files["tiny-sd1"]["safetensors"], data, out, "--v2"))
    assert "--v2 was given but this is an SD 1.x model" in line
    assert not list(out.glob("*.config.toml"))


def test_the_options_file_is_written_once_the_model_has_loaded_with_the_seed_used(data, tmp_path, monkeypatch):
    import toml

    import library.models.loading as loading
    import library.training.loop as loop

    out, seen = tmp_path / "out", {}
    real_load = loading.load_components

    def load(*args, **kwargs):
        seen["before load"] = (out / "net.config.toml").exists()
        return real_load(*args, **kwargs)

    def train(config, plan, parts, make_method, **kwargs):
        seen["before training"], seen["seed"] = (out / "net.config.toml").exists(), config.seed

    monkeypatch.setattr(loading, "load_components", load)
    monkeypatch.setattr(loop, "train", train)
    train_network.main(_flags("tiny-sd1", data, out))  # no --seed: one is drawn, and the saved options must hold it
    assert (seen["before load"], seen["before training"]) == (False, True)
    assert seen["seed"] is not None and toml.load(out / "net.config.toml")["training"]["seed"] == seen["seed"]
