"""Config TOMLs saved by the kohya_ss GUI and by lora-scripts load as sd-scripts loads them: off values and GUI-only
keys pass (named in one note), and everything really wrong in a file is reported in one run, in one line.

The fixtures under tests/fixtures/gui_tomls/ are real files from those projects (each names its source)."""

from __future__ import annotations

from pathlib import Path

import pytest

import train_network
from library.config.declarations import OPTIONS
from library.config.gui_keys import GUI_KEYS
from library.config.options import NETWORK
from library.config.resolve import resolve
from library.config.sd_scripts_options import SD_SCRIPTS_OPTIONS
from tests.helpers import make_image_folder

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "gui_tomls"
BY_NAME = {o.name: o for o in OPTIONS}


@pytest.fixture
def data(tmp_path) -> Path:
    root = tmp_path / "data"
    make_image_folder(root, caption_extension=".txt")
    return root


def _dry_run(argv, capsys) -> tuple[int, list[str], str]:
    """train_network.py --dry_run in-process: (exit code, stderr lines, stdout)."""
    try:
        train_network.main([str(a) for a in argv] + ["--dry_run"])
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.err.splitlines(), captured.out


def _fixture_run(name, data, tmp_path, capsys, *more):
    # the files point at their authors' model and folders: the tiny model and a generated folder stand in
    return _dry_run(["--config_file", FIXTURES / name, "--pretrained_model_name_or_path", "tiny-sd1",
                     "--train_data_dir", data, "--output_dir", tmp_path / "out", *more], capsys)


def _notes(err: list[str]) -> list[str]:
    return [line for line in err if line.startswith("note: ") and "GUI key" in line]


# --- the real files ---

# fixture -> the GUI keys its one note line names
LOADS = {
    "kohya_ss_gui_sdxl_lora.toml": ["epoch", "noise_offset_type"],
    "lora_scripts_default.toml": ["lr_restart_cycles"],
    "lora_scripts_lora.toml": ["lr_restart_cycles", "enable_contrastive", "negative_sampling_method",
                               "noise_strength", "contrastive_weight", "contrastive_warmup_steps"],
    "lora_scripts_toml_lora.toml": ["lr_restart_cycles", "batch_size"],
}


@pytest.mark.parametrize("name", sorted(LOADS))
def test_a_gui_saved_toml_runs_with_one_note_naming_the_gui_keys(name, data, tmp_path, capsys):
    code, err, out = _fixture_run(name, data, tmp_path, capsys)
    assert code == 0, err
    assert "problems: none" in out or "problems (" in out  # the plan was printed: the whole file resolved
    notes = _notes(err)
    assert len(notes) == 1, err
    assert notes[0].startswith(f"note: {FIXTURES / name}: ignoring {len(LOADS[name])} GUI key")
    for key in LOADS[name]:
        assert key in notes[0]
    assert not [line for line in err if line.startswith("error")]


def test_the_kohya_gui_toml_keeps_its_real_settings_and_drops_its_off_values(data, tmp_path, capsys):
    config = resolve(["--config_file", str(FIXTURES / "kohya_ss_gui_sdxl_lora.toml")], NETWORK, OPTIONS)
    assert config.max_train_steps == 1600 and config.train_batch_size == 4 and config.min_snr_gamma == 5
    assert config.text_encoder_lr == [1e-5] and config.optimizer_type == "AdamW8Bit"
    # "" / "no" / 75 / [] mean "not used": the defaults apply, as sd-scripts ends up using them
    assert config.huggingface_repo_id is None and config.sample_prompts is None and config.train_data_dir is None
    assert config.max_token_length is None and config.dynamo_backend == "inductor"
    assert config.network_args is None and config.optimizer_args is None
    err = capsys.readouterr().err
    # upload settings written with an empty repo id change nothing: accepted, named in a note
    assert ("note: huggingface_repo_type, huggingface_path_in_repo, huggingface_repo_visibility, async_upload act "
            "only with huggingface_repo_id set, and it is not: ignored") in err


def test_unsupported_options_a_gui_toml_really_sets_are_all_named_in_one_error(data, tmp_path, capsys):
    # with a repo id, the file's upload settings act: each is one we do not support, and all are named at once
    code, err, _ = _fixture_run("kohya_ss_gui_sdxl_lora.toml", data, tmp_path, capsys,
                                "--huggingface_repo_id", "me/my-lora")
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: 5 problems in the options (")
    for name in ("huggingface_repo_id", "huggingface_repo_type", "huggingface_path_in_repo",
                 "huggingface_repo_visibility", "async_upload"):
        assert f"--{name} (from " in err[0]


def test_a_toml_for_another_trainer_fork_gets_every_problem_in_one_line(data, tmp_path, capsys):
    # lora-scripts' exported example for an SDXL flow-matching fork: its fork's keys and a token length no
    # SD 1.x/2.x trainer takes, all reported in the first run
    code, err, _ = _fixture_run("lora_scripts_example_sdxl_flow.toml", data, tmp_path, capsys)
    assert code == 2 and len(err) == 1, err
    line = err[0]
    assert line.startswith(f"error: 2 problems in {FIXTURES / 'lora_scripts_example_sdxl_flow.toml'}: ")
    assert "max_token_length must be one of 150, 225, got 255" in line
    assert ("6 unknown options: flow_model, flow_use_ot, flow_timestep_distribution, flow_uniform_static_ratio, "
            "contrastive_flow_matching, cfm_lambda") in line
    assert "model_train_type" not in line  # a lora-scripts key: ignored


def test_the_kohya_gui_defaults_file_fails_only_on_what_is_really_wrong(data, tmp_path, capsys):
    # the GUI's own settings file: its folder and widget keys are ignored, its "" / 0 / false values pass; only
    # xformers = "xformers" (a dropdown value where sd-scripts takes a switch) is left
    code, err, _ = _fixture_run("kohya_ss_config_example.toml", data, tmp_path, capsys)
    assert code == 2
    errors = [line for line in err if line.startswith("error")]
    assert errors == [f"error: {FIXTURES / 'kohya_ss_config_example.toml'} [advanced]: xformers must be true or "
                      "false, got 'xformers'"]


# --- the rules, on small files ---

def test_three_unrelated_problems_are_reported_in_one_run(tmp_path, capsys):
    cfg = tmp_path / "my.toml"
    cfg.write_text('[training]\nfoo_bar_baz = 1\nlearning_rate = "fast"\ntrain_batch_size = -1\n')
    code, err, _ = _dry_run(["--config_file", cfg, "--train_data_dir", tmp_path], capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0] == (f"error: 3 problems in {cfg}: [training]: learning_rate must be a number, got 'fast'; "
                      "[training]: unknown option 'foo_bar_baz'; [training]: train_batch_size = -1: must be at least 1")


def test_typos_keep_their_did_you_mean_and_other_unknown_keys_are_listed_together(tmp_path, capsys):
    cfg = tmp_path / "my.toml"
    cfg.write_text('netwrok_dim = 8\nfoo_one = 1\nfoo_two = 2\nhuggingface_repo_id = "me/x"\n')
    code, err, _ = _dry_run(["--config_file", cfg, "--train_data_dir", tmp_path], capsys)
    assert code == 2 and len(err) == 1, err
    line = err[0]
    assert line.startswith(f"error: 3 problems in {cfg}: ")
    assert "unknown option 'netwrok_dim' (did you mean 'network_dim'?)" in line
    assert "2 unknown options: foo_one, foo_two (" in line
    assert f"--huggingface_repo_id (from {cfg}) is not supported: " in line


def test_off_values_are_accepted_for_every_option_supported_or_not(tmp_path):
    cfg = tmp_path / "gui.toml"
    cfg.write_text('huggingface_repo_id = ""\nresume = false\ndynamo_backend = "no"\nmax_token_length = 75\n'
                   'sample_prompts = ""\nvae_batch_size = 0\nsave_every_n_steps = 0\nclip_skip = 0\n'
                   'text_encoder_lr = []\nmasked_loss = false\nwandb_api_key = ""\nconsole_log_level = ""\n'
                   'persistent_data_loader_workers = 1\nnoise_offset = ""\n')
    config = resolve(["--config_file", str(cfg)], NETWORK, OPTIONS)
    for name in ("huggingface_repo_id", "resume", "dynamo_backend", "max_token_length", "sample_prompts",
                 "vae_batch_size", "save_every_n_steps", "clip_skip", "text_encoder_lr", "wandb_api_key",
                 "console_log_level", "noise_offset"):
        assert config[name] == BY_NAME[name].default and not config.is_set(name), name
    assert config.persistent_data_loader_workers is True  # the kohya_ss GUI writes 1 for true


def test_a_gui_key_that_would_change_the_run_is_an_error_naming_the_real_option(tmp_path, capsys):
    cfg = tmp_path / "old.toml"
    cfg.write_text("[training_arguments]\nbatch_size = 4\nenable_contrastive = true\nnoise_strength = 1.0\n")
    code, err, _ = _dry_run(["--config_file", cfg, "--train_data_dir", tmp_path], capsys)
    assert code == 2 and len(err) == 1, err
    assert ("batch_size = 4 is train_batch_size as lora-scripts names it; sd-scripts does not read that name from "
            "a config file (the run would use train_batch_size = 1): write train_batch_size = 4 instead") in err[0]
    assert "enable_contrastive = true: lora-scripts' contrastive training is not supported here" in err[0]
    assert err[0].startswith(f"error: 2 problems in {cfg}: ")  # noise_strength belongs to it: not named again


def test_a_key_repeated_across_sections_with_one_value_is_read_once(tmp_path):
    cfg = tmp_path / "twice.toml"
    cfg.write_text('[dataset_arguments]\nresolution = "512,512"\n[training_arguments]\nresolution = "512,512"\n')
    assert resolve(["--config_file", str(cfg)], NETWORK, OPTIONS).resolution == "512,512"


# --- the old spelling sd-scripts still reads ---

def test_caption_extention_flag_works_with_a_warning(data, capsys):
    code, err, out = _dry_run(["--train_data_dir", data, "--caption_extention", ".txt"], capsys)
    assert code == 0, err
    assert "4 with captions" in out  # the .txt captions were found
    assert err == ["warning: --caption_extention is sd-scripts' old misspelling of caption_extension; read as "
                   "caption_extension = .txt; rename it to caption_extension"]


def test_caption_extention_in_a_toml_sets_caption_extension_and_wins_as_in_sd_scripts(data, tmp_path, capsys):
    cfg = tmp_path / "old.toml"
    cfg.write_text('[dataset_arguments]\ncaption_extention = ".txt"\n')
    config = resolve(["--config_file", str(cfg), "--caption_extension", ".caption"], NETWORK, OPTIONS)
    assert config.caption_extension == ".txt" and config.caption_extention is None
    assert config.origin("caption_extension") == f"{cfg} [dataset_arguments]"
    err = capsys.readouterr().err
    assert f"warning: {cfg} [dataset_arguments]: caption_extention is sd-scripts' old misspelling" in err
    assert "it wins over caption_extension = .caption (command line), as in sd-scripts" in err
    code, _, out = _dry_run(["--config_file", cfg, "--train_data_dir", data], capsys)
    assert code == 0 and "4 with captions" in out


# --- the declared list ---

def test_gui_keys_are_neither_our_options_nor_sd_scripts_options():
    for name, key in GUI_KEYS.items():
        assert name == key.name and name not in BY_NAME and name not in SD_SCRIPTS_OPTIONS, name
        assert key.source
        assert key.means is None or key.means in BY_NAME, name
        assert key.switch is None or (key.switch in GUI_KEYS and key.feature), name


def test_an_option_that_acts_only_with_another_is_accepted_while_that_one_is_unset(tmp_path, capsys):
    # newer kohya_ss GUIs write wandb_run_name = <output_name> into every TOML, wandb or not
    cfg = tmp_path / "gui.toml"
    cfg.write_text('wandb_run_name = "last"\n')
    assert resolve(["--config_file", str(cfg)], NETWORK, OPTIONS).wandb_run_name == "last"
    err = capsys.readouterr().err
    assert "note: wandb_run_name acts only with log_with = wandb or all, and it is not: ignored" in err
    # with wandb logging it names the run, as sd-scripts passes it to wandb's init
    from library.training.reporting import tracker_init_kwargs

    config = resolve(["--config_file", str(cfg), "--log_with", "wandb"], NETWORK, OPTIONS)
    assert tracker_init_kwargs(config) == {"wandb": {"name": "last"}}
