"""Option resolution: defaults < --config_file < command line, strict keys and types, did-you-mean, --output_config."""

from __future__ import annotations

import pytest

from library.config.options import DB, NETWORK, IntOrFloat, Option
from library.config.resolve import check_supported, resolve, write_resolved_config
from library.errors import UserError

OPTIONS = (
    Option("config_file", str, None, "config TOML", "config"),
    Option("output_config", bool, False, "write the resolved options", "config"),
    Option("pretrained_model_name_or_path", str, None, "base model", "model"),
    Option("network_dim", int, None, "rank", "network", scripts=frozenset({NETWORK}), later=4),
    Option("learning_rate", float, 2e-6, "lr", "optimizer"),
    Option("lr_warmup_steps", IntOrFloat, 0, "warmup", "optimizer"),
    Option("caption_extension", str, ".caption", "caption file extension", "captions"),
    Option("shuffle_caption", bool, False, "shuffle tags", "captions"),
    Option("network_args", str, None, "k=v", "network", nargs="*", scripts=frozenset({NETWORK})),
    Option("stop_text_encoder_training", int, None, "steps", "dreambooth", scripts=frozenset({DB})),
    Option("mixed_precision", str, "no", "precision", "training", choices=("no", "fp16", "bf16")),
    Option("xformers", bool, False, "xformers", "advanced", note="is not needed: SDPA attention is always used"),
)


def _resolve(argv, script=NETWORK):
    return resolve(argv, script, OPTIONS, "test")


def _toml(tmp_path, text, name="cfg.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_file_and_flags_layer_in_that_order(tmp_path):
    cfg = _toml(tmp_path, '[model]\npretrained_model_name_or_path = "a.safetensors"\n'
                          '[optimizer]\nlearning_rate = 1e-4\nlr_warmup_steps = 0.1\n')
    config = _resolve(["--config_file", str(cfg), "--learning_rate", "3e-4"])
    assert config.pretrained_model_name_or_path == "a.safetensors"
    assert config.learning_rate == 3e-4 and config.origin("learning_rate") == "command line"
    assert config.lr_warmup_steps == 0.1 and config.origin("lr_warmup_steps") == f"{cfg} [optimizer]"
    assert config.caption_extension == ".caption" and config.origin("caption_extension") == "default"


def test_sd_scripts_section_names_are_free_and_top_level_keys_work(tmp_path):
    cfg = _toml(tmp_path, 'shuffle_caption = true\n[whatever_name]\nnetwork_args = ["conv_dim=4", "conv_alpha=2"]\n')
    config = _resolve(["--config_file", str(cfg)])
    assert config.shuffle_caption is True and config.network_args == ["conv_dim=4", "conv_alpha=2"]


def test_config_file_name_without_extension_gets_toml(tmp_path):
    _toml(tmp_path, "learning_rate = 0.5\n", name="mine.toml")
    assert _resolve(["--config_file", str(tmp_path / "mine")]).learning_rate == 0.5


def test_key_given_twice_across_sections_is_an_error(tmp_path):
    cfg = _toml(tmp_path, "[a]\nlearning_rate = 1e-4\n[b]\nlearning_rate = 2e-4\n")
    with pytest.raises(UserError, match=r"'learning_rate' is set twice \(\[a\] and \[b\]\)"):
        _resolve(["--config_file", str(cfg)])


def test_flag_given_twice_takes_the_last_and_warns_once(capsys):
    # sd-scripts' argparse keeps the last value; wrappers that append an override rely on it
    config = _resolve(["--learning_rate", "1", "--shuffle_caption", "--learning_rate=2", "--shuffle_caption"])
    assert config.learning_rate == 2.0 and config.shuffle_caption is True
    err = capsys.readouterr().err
    assert err == ("warning: --learning_rate is given 2 times on the command line; the last one (2.0) is used, "
                   "as in sd-scripts\n")  # a repeated switch means the same either way: no warning
    config = _resolve(["--network_args", "a=1", "--network_args", "b=2"])
    assert config.network_args == ["b=2"] and "--network_args is given 2 times" in capsys.readouterr().err


def test_misspelt_key_names_file_table_key_and_suggests(tmp_path):
    cfg = _toml(tmp_path, '[dataset_arguments]\ncaption_extention = ".txt"\n')
    with pytest.raises(UserError) as err:
        _resolve(["--config_file", str(cfg)])
    assert str(err.value) == f"{cfg} [dataset_arguments]: unknown option 'caption_extention' (did you mean 'caption_extension'?)"


def test_misspelt_flag_suggests():
    with pytest.raises(UserError, match=r"unknown option --netwrok_dim \(did you mean '--network_dim'\?\)"):
        _resolve(["--netwrok_dim", "8"])


def test_wrong_types_say_what_was_expected(tmp_path):
    for text, phrase in [('learning_rate = "fast"', "learning_rate must be a number, got 'fast'"),
                         ("shuffle_caption = 2", "shuffle_caption must be true or false, got 2"),
                         ('mixed_precision = "fp8"', "mixed_precision must be one of no, fp16, bf16, got 'fp8'")]:
        cfg = _toml(tmp_path, text + "\n")
        with pytest.raises(UserError, match=phrase):
            _resolve(["--config_file", str(cfg)])
    with pytest.raises(UserError, match="--learning_rate expects a number, got 'fast'"):
        _resolve(["--learning_rate", "fast"])


def test_numbers_written_as_strings_are_read_like_the_command_line(tmp_path):
    cfg = _toml(tmp_path, 'learning_rate = "1e-4"\nlr_warmup_steps = "100"\n')
    config = _resolve(["--config_file", str(cfg)])
    assert config.learning_rate == 1e-4 and config.lr_warmup_steps == 100 and isinstance(config.lr_warmup_steps, int)


def test_toml_syntax_error_names_line(tmp_path):
    cfg = _toml(tmp_path, "learning_rate = \n")
    with pytest.raises(UserError, match=r"cfg.toml:1:\d+: TOML syntax error"):
        _resolve(["--config_file", str(cfg)])


def test_other_scripts_options_are_warned_about_and_ignored(tmp_path, capsys):
    cfg = _toml(tmp_path, "stop_text_encoder_training = 100\n")
    config = _resolve(["--config_file", str(cfg)])
    assert "stop_text_encoder_training" not in config
    assert "is an option of train_db.py; train_network.py ignores it" in capsys.readouterr().err


def test_output_config_writes_non_defaults_to_the_config_path_and_exits(tmp_path):
    target = tmp_path / "new.toml"
    with pytest.raises(SystemExit) as exit_info:
        _resolve(["--config_file", str(target), "--output_config", "--learning_rate", "1e-4", "--shuffle_caption"])
    assert exit_info.value.code == 0
    text = target.read_text()
    assert "[optimizer]\nlearning_rate = 0.0001" in text and "shuffle_caption = true" in text
    assert "caption_extension" not in text  # defaults are not written
    assert _resolve(["--config_file", str(target)]).learning_rate == 1e-4  # and it reads back


def test_output_config_with_an_existing_file_prints_instead_of_overwriting(tmp_path, capsys):
    cfg = _toml(tmp_path, "learning_rate = 0.5\n")
    with pytest.raises(SystemExit):
        _resolve(["--config_file", str(cfg), "--output_config", "--shuffle_caption"])
    assert cfg.read_text() == "learning_rate = 0.5\n"
    out = capsys.readouterr().out
    assert "learning_rate = 0.5" in out and "shuffle_caption = true" in out


def test_resolved_config_written_next_to_outputs_reproduces_the_run(tmp_path):
    config = _resolve(["--learning_rate", "1e-4", "--network_args", "a=1", "b=2"])
    path = write_resolved_config(config, OPTIONS, tmp_path, "my_lora")
    assert path == tmp_path / "my_lora.config.toml"
    again = _resolve(["--config_file", str(path)])
    assert {k: again[k] for k in config if k != "config_file"} == {k: config[k] for k in config if k != "config_file"}


def test_unimplemented_options_are_parsed_but_refused_by_name(tmp_path):
    config = _resolve(["--network_dim", "16"])
    assert config.network_dim == 16
    with pytest.raises(UserError, match=r"--network_dim \(from command line\) is not supported yet \(it lands with issue #4\)"):
        check_supported(config, OPTIONS)
    with pytest.raises(UserError, match="--xformers .* is not needed: SDPA attention is always used"):
        check_supported(_resolve(["--xformers"]), OPTIONS)
    check_supported(_resolve(["--learning_rate", "1"]), OPTIONS)  # implemented ones pass
