"""The generated option docs match the declarations, and every sd-scripts option is declared and documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import train_db
import train_hypernetwork
import train_network
import train_textual_inversion
from library.config.config_file import SCRIPT_FILES
from library.config.declarations import OPTIONS
from library.config.options import ALL_SCRIPTS, DB, HYPERNETWORK, NETWORK, TI
from library.config.resolve import options_for
from library.config.sd_scripts_options import SD_SCRIPTS_COMMIT, SD_SCRIPTS_OPTIONS
from tools import make_docs

ROOT = Path(__file__).resolve().parent.parent
BY_NAME = {o.name: o for o in OPTIONS}
ENTRY_POINTS = {NETWORK: train_network, DB: train_db, TI: train_textual_inversion, HYPERNETWORK: train_hypernetwork}


def test_committed_docs_are_what_make_docs_generates():
    assert make_docs.stale() == [], "docs are stale: run python tools/make_docs.py and commit the result"


def test_check_names_stale_docs_and_writing_fixes_them(tmp_path, capsys):
    assert make_docs.main(["--check", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "docs/coming-from-sd-scripts.md is stale" in err and "docs/options/train_network.md is stale" in err
    assert not (tmp_path / "docs").exists()  # --check writes nothing
    assert make_docs.main(["--root", str(tmp_path)]) == 0
    assert make_docs.main(["--check", "--root", str(tmp_path)]) == 0
    (tmp_path / "docs" / "options" / "train_db.md").write_text("edited by hand\n")
    assert make_docs.main(["--check", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == "docs/options/train_db.md is stale: run python tools/make_docs.py\n"
    assert sorted(p.name for p in (tmp_path / "docs" / "options").iterdir()) == [
        "train_db.md", "train_hypernetwork.md", "train_network.md", "train_textual_inversion.md"]  # no temp files


def test_sd_scripts_list_is_well_formed():
    assert re.fullmatch(r"[0-9a-f]{40}", SD_SCRIPTS_COMMIT)
    assert list(SD_SCRIPTS_OPTIONS) == sorted(SD_SCRIPTS_OPTIONS)
    for name, scripts in SD_SCRIPTS_OPTIONS.items():
        assert re.fullmatch(r"[a-z0-9_]+", name) and scripts and scripts <= ALL_SCRIPTS, name
        assert scripts & {NETWORK, DB, TI}, name  # every option comes from one of sd-scripts' three trainers
    # spot checks of sd-scripts' parser split
    assert SD_SCRIPTS_OPTIONS["network_dim"] == {NETWORK}
    assert SD_SCRIPTS_OPTIONS["no_token_padding"] == {DB}
    assert SD_SCRIPTS_OPTIONS["token_string"] == {TI}
    assert TI not in SD_SCRIPTS_OPTIONS["caption_dropout_rate"] and TI not in SD_SCRIPTS_OPTIONS["weighted_captions"]
    assert DB not in SD_SCRIPTS_OPTIONS["in_json"] and SD_SCRIPTS_OPTIONS["use_safetensors"] == {DB}
    assert SD_SCRIPTS_OPTIONS["learning_rate"] == ALL_SCRIPTS


@pytest.mark.parametrize("script", [NETWORK, DB, TI, HYPERNETWORK])
def test_every_sd_scripts_option_is_declared_for_its_script(script):
    wanted = [name for name, scripts in SD_SCRIPTS_OPTIONS.items() if script in scripts]
    missing = [name for name in wanted if name not in BY_NAME or script not in BY_NAME[name].scripts]
    assert not missing, f"sd-scripts options not declared for {SCRIPT_FILES[script]}: {missing}"


@pytest.mark.parametrize("script", [NETWORK, DB, TI])
def test_every_sd_scripts_option_is_in_its_scripts_table(script):
    text = (ROOT / "docs" / "coming-from-sd-scripts.md").read_text(encoding="utf-8")
    section = text.split(f"\n## {SCRIPT_FILES[script]}\n", 1)[1].split("\n## ", 1)[0]
    rows = set(re.findall(r"^\| `--([a-z0-9_]+)` \|", section, flags=re.M))
    assert rows == {name for name, scripts in SD_SCRIPTS_OPTIONS.items() if script in scripts}


@pytest.mark.parametrize("script", [NETWORK, DB, TI, HYPERNETWORK])
def test_every_option_of_a_script_is_in_its_options_doc(script):
    text = (ROOT / "docs" / "options" / SCRIPT_FILES[script].replace(".py", ".md")).read_text(encoding="utf-8")
    rows = re.findall(r"^\| `--([a-z0-9_]+)` \|", text, flags=re.M)
    assert rows == list(options_for(script, OPTIONS))  # all of them, in declaration order


def test_statuses():
    assert make_docs.status(BY_NAME["async_upload"]).startswith("not supported yet (accepted, changing nothing, unless")
    assert make_docs.status(BY_NAME["huggingface_repo_id"]).startswith(
        "refused when set: --huggingface_repo_id is not supported: uploading to the Hugging Face Hub is not built")
    assert make_docs.status(BY_NAME["xformers"]).startswith("accepted, no effect (")
    assert make_docs.status(BY_NAME["learning_rate"]) == "supported"
    assert make_docs.status(BY_NAME["dataset_class"]).startswith("refused when set: --dataset_class is not supported")


# sd-scripts options we refuse, each given on a real command line of a script sd-scripts has it in.
REFUSED = [(NETWORK, ["--huggingface_repo_id", "me/my-lora"]), (DB, ["--huggingface_repo_id", "me/my-model"]),
           (TI, ["--huggingface_repo_id", "me/my-embedding"])]


@pytest.mark.parametrize("script,argv", REFUSED, ids=[f"{s}-{a[0]}" for s, a in REFUSED])
def test_not_supported_sd_scripts_option_exits_2_naming_it(script, argv, capsys):
    name = argv[0][2:]
    assert BY_NAME[name].note and script in SD_SCRIPTS_OPTIONS[name]
    with pytest.raises(SystemExit) as exit_info:
        ENTRY_POINTS[script].main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1  # one line, no traceback
    assert err.startswith(f"error: --{name} (from command line) is not supported: ")


def test_not_supported_sd_scripts_option_in_a_config_file_is_named_too(tmp_path, capsys):
    config = tmp_path / "lora.toml"
    config.write_text('[huggingface_arguments]\nhuggingface_repo_id = "me/my-lora"\n\n[logging]\nconsole_log_simple = false\n')
    with pytest.raises(SystemExit) as exit_info:
        train_network.main(["--config_file", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --huggingface_repo_id (from ")
    assert "is not supported" in err and "console_log_simple" not in err  # left at its default: harmless
