"""Every option value is checked against its declaration before any weights load, for flags, --config_file and
--dataset_config alike: an out-of-range, non-finite, unwritable or unprintable value exits 2 with one line naming
the option (no traceback), while every value sd-scripts gives a meaning to still runs."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

import train_db
import train_hypernetwork
import train_network
import train_textual_inversion
from library.config.checks import check_value, has_range, option_range_text
from library.config.config_file import dump_config, is_off
from library.config.declarations import MOST_REPEATS, OPTIONS
from library.config.options import DB, HYPERNETWORK, NETWORK, TI, IntOrFloat
from library.config.resolve import options_for, resolve
from library.training.schedulers import decay_steps, warmup_steps
from tests.conftest import ROOT

ENTRY_POINTS = {NETWORK: train_network, DB: train_db, TI: train_textual_inversion, HYPERNETWORK: train_hypernetwork}
SCRIPTS = (NETWORK, DB, TI, HYPERNETWORK)
MISSING_MODEL = "no-such-model.safetensors"  # were weights loaded, the error would name this file instead


def _main(script, argv, capsys):
    """Run an entry script in-process; (exit code, stderr lines)."""
    with pytest.raises(SystemExit) as exit_info:
        ENTRY_POINTS[script].main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return exit_info.value.code, [line for line in err.splitlines() if not line.startswith("warning: ")]


def _refused(script, argv, capsys) -> str:
    code, lines = _main(script, argv, capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def _toml_value(value) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # nan, inf, -inf are TOML floats
    return json.dumps(value)  # ints, floats, and strings with JSON escapes (\u0000), which TOML shares


# --- the table over the declarations: a newly declared range is covered here without a new line of test ---

def _script_of(opt) -> str:
    return next(s for s in SCRIPTS if s in opt.scripts)


def _out_of_range(opt) -> list:
    """Values just outside each declared bound, in the option's own type and form."""
    kind = opt.numbers.type if opt.numbers else (int if opt.type is int else float)
    step = 1 if kind is int else 0.5
    values = []
    if opt.minimum is not None:
        values.append(kind(opt.minimum - step))
    if opt.above is not None:
        values.append(kind(opt.above))
    if opt.maximum is not None:
        values.append(kind(opt.maximum + step))
    if opt.below is not None:
        values.append(kind(opt.below))
    if opt.numbers:  # '7' or '7,7' for a size: every number must be in range
        return [",".join([str(v)] * opt.numbers.counts[-1]) for v in values]
    return [[v] if opt.nargs else v for v in values]


RANGED = [(opt, value) for opt in OPTIONS if has_range(opt) for value in _out_of_range(opt)]
BY_NAME = {o.name: o for o in OPTIONS}


@pytest.mark.parametrize("opt", OPTIONS, ids=lambda o: o.name)
def test_constraints_are_well_formed(opt):
    if has_range(opt) or opt.allow_inf:
        assert opt.type in (int, float, IntOrFloat) or opt.numbers, opt.name
    assert not (opt.minimum is not None and opt.above is not None), "one lower bound"
    assert not (opt.maximum is not None and opt.below is not None), "one upper bound"
    if opt.numbers or opt.path or opt.max_bytes or opt.pattern:
        assert opt.type is str
    if opt.requires:
        assert opt.requires[0] in BY_NAME and opt.scripts <= BY_NAME[opt.requires[0]].scripts
    if opt.not_above:
        other = BY_NAME[opt.not_above]
        assert other.type is opt.type and opt.scripts <= other.scripts


def test_the_table_covers_the_numeric_options():
    names = {opt.name for opt, _ in RANGED}
    assert len(names) >= 70
    numeric = {o.name for o in OPTIONS if o.type in (int, float, IntOrFloat) and not o.choices}
    # numeric options without a range are finite-checked floats whose sign means something
    assert numeric - names == {"adaptive_noise_scale", "base_weights_multiplier", "hypernetwork_multiplier"}


@pytest.mark.parametrize("opt, value", RANGED, ids=[f"{o.name}={v}" for o, v in RANGED])
def test_out_of_range_flag_exits_2_naming_the_option(opt, value, capsys):
    flag = f"--{opt.name}=" + (" ".join(map(str, value)) if isinstance(value, list) else str(value))
    line = _refused(_script_of(opt), [flag, "--pretrained_model_name_or_path", MISSING_MODEL], capsys)
    assert line.startswith(f"error: --{opt.name} ") and "must be" in line, line
    assert option_range_text(opt).removeprefix("each ").removeprefix("number ") in line


# In a config file, a value an option declares as "not set" (GUIs write 0 for it) leaves the default instead.
RANGED_IN_FILES = [(opt, value) for opt, value in RANGED if not is_off(value, opt)]
GUI_ZEROS = [(opt, value) for opt, value in RANGED if is_off(value, opt)]


@pytest.mark.parametrize("opt, value", RANGED_IN_FILES, ids=[f"{o.name}={v}" for o, v in RANGED_IN_FILES])
def test_out_of_range_config_file_value_exits_2_naming_file_and_key(opt, value, tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(f"[{opt.section}]\n{opt.name} = {_toml_value(value)}\n", encoding="utf-8")
    line = _refused(_script_of(opt), ["--config_file", config, "--dry_run"], capsys)
    assert line.startswith(f"error: {config} [{opt.section}]: {opt.name} = ") and "must be" in line, line


@pytest.mark.parametrize("opt, value", GUI_ZEROS, ids=[f"{o.name}={v}" for o, v in GUI_ZEROS])
def test_a_gui_unset_zero_in_a_config_file_leaves_the_default(opt, value, tmp_path):
    assert value == 0 and 0 in opt.off  # declared, not guessed: only where GUIs write 0 for "not set"
    config = tmp_path / "run.toml"
    config.write_text(f"[{opt.section}]\n{opt.name} = {_toml_value(value)}\n", encoding="utf-8")
    script = _script_of(opt)
    resolved = resolve(["--config_file", str(config)], script, OPTIONS)
    assert resolved[opt.name] == opt.for_script(script).default and not resolved.is_set(opt.name)


@pytest.mark.parametrize("opt", [o for o in OPTIONS if o.type is float], ids=lambda o: o.name)
def test_nan_is_refused_for_every_float_option(opt, capsys):
    line = _refused(_script_of(opt), [f"--{opt.name}", "nan", "--dry_run"], capsys)
    # named first; another problem of the same run (adaptive_noise_scale needs noise_offset) may follow
    problem = f"--{opt.name} nan: must be a finite number"
    assert line.startswith(f"error: {problem}") or (
        line.startswith("error: 2 problems in the options: ") and problem in line), line


def test_inf_is_refused_unless_it_means_something(capsys):
    assert [o.name for o in OPTIONS if o.allow_inf] == ["max_grad_norm"]  # inf: gradients are never clipped
    assert "must be a finite number" in _refused(NETWORK, ["--learning_rate", "inf", "--dry_run"], capsys)
    config = resolve(["--max_grad_norm", "inf"], NETWORK, OPTIONS)
    assert config.max_grad_norm == math.inf


# --- defaults keep their own constraints, and every documented default resolves when given explicitly ---

@pytest.mark.parametrize("opt", OPTIONS, ids=lambda o: o.name)
def test_every_default_satisfies_its_constraints(opt):
    for script in opt.scripts:
        check_value(opt.for_script(script), opt.for_script(script).default, f"default of --{opt.name}")


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_documented_default_resolves_as_a_flag_and_in_a_config_file(script, tmp_path):
    declared = options_for(script, OPTIONS)
    defaults = {n: o.default for n, o in declared.items() if o.default not in (None, False) and n != "config_file"}
    argv = [f"--{name}={value}" for name, value in defaults.items()]
    config = resolve(argv, script, OPTIONS)
    assert {n: config[n] for n in defaults} == defaults
    path = tmp_path / "defaults.toml"
    path.write_text(dump_config(defaults, declared), encoding="utf-8")
    config = resolve(["--config_file", str(path)], script, OPTIONS)
    assert {n: config[n] for n in defaults} == defaults


# --- the inputs issue #14 found, through the real entry points and before the (missing) model is loaded ---

EXAMPLES = [
    (NETWORK, ["--train_batch_size", "0"], "--train_batch_size 0: must be at least 1"),
    (NETWORK, ["--resolution", "0"], "--resolution 0: each number must be at least 8, got 0"),
    (NETWORK, ["--resolution", "64,0"], "--resolution 64,0: each number must be at least 8, got 0"),
    (NETWORK, ["--resolution", "64x64"], "--resolution 64x64: must be 1 or 2 comma-separated integers"),
    (NETWORK, ["--learning_rate", "-1"], "--learning_rate -1.0: must be at least 0"),
    (NETWORK, ["--learning_rate", "nan"], "--learning_rate nan: must be a finite number"),
    (NETWORK, ["--seed", str(2**32)], "--seed 4294967296: must be between 0 and 4294967295"),
    (DB, ["--seed=-1"], "--seed -1: must be between 0 and 4294967295"),
    (NETWORK, ["--network_dim", "0"], "--network_dim 0: must be at least 1"),
    (NETWORK, ["--network_dim=-4"], "--network_dim -4: must be at least 1"),
    (NETWORK, ["--network_args", "conv_dim=-4"], "--network_args conv_dim=-4: conv_dim must be at least 0"),
    (NETWORK, ["--network_args", "dropout=1.0"], "--network_args dropout=1.0: dropout must be at least 0 and below 1"),
    (NETWORK, ["--network_module", "networks.loha", "--network_args", "conv_alpha=nan"],
     "--network_args conv_alpha=nan: conv_alpha must be a finite number"),
    (NETWORK, ["--network_args", "block_dims=" + ",".join(["4"] * 24 + ["-1"])],
     "block_dims values must each be at least 0 (got -1)"),
    (NETWORK, ["--network_args", "down_lr_weight=1,1,-0.5"], "down_lr_weight weights must each be at least 0"),
    (NETWORK, ["--max_train_steps", "0"], "--max_train_steps 0: must be at least 1"),
    (TI, ["--max_train_steps=-1"], "--max_train_steps -1: must be at least 1"),
    (NETWORK, ["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps 0: must be at least 1"),
    (NETWORK, ["--network_alpha=-1"], "--network_alpha -1.0: must be at least 0"),
    (NETWORK, ["--network_module="], "--network_module '': must be a Python module name such as networks.lora"),
    (NETWORK, ["--full_fp16"], "--full_fp16 (command line) needs --mixed_precision fp16, but --mixed_precision is "
                               "'no' (default): add --mixed_precision fp16, or drop --full_fp16"),
    (DB, ["--full_bf16", "--mixed_precision", "fp16"], "--full_bf16 (command line) needs --mixed_precision bf16"),
    (NETWORK, ["--output_name="], "--output_name '': must be a file name, not empty"),
    (NETWORK, ["--noise_offset", "nan"], "--noise_offset nan: must be a finite number"),
    (NETWORK, ["--caption_dropout_rate", "1.5"], "--caption_dropout_rate 1.5: must be between 0 and 1"),
    (NETWORK, ["--min_timestep", "2000"], "--min_timestep 2000: must be between 0 and 999"),
    (NETWORK, ["--max_timestep", "1001"], "--max_timestep 1001: must be between 1 and 1000"),
    (NETWORK, ["--min_timestep", "600", "--max_timestep", "500"],
     "--min_timestep 600 (command line) is above --max_timestep 500 (command line)"),
    (NETWORK, ["--clip_skip", "100"], "--clip_skip 100: must be between 1 and 24"),
    (NETWORK, ["--clip_skip", "0"], "--clip_skip 0: must be between 1 and 24"),
    (NETWORK, ["--dataset_repeats", str(MOST_REPEATS + 1)], f"--dataset_repeats {MOST_REPEATS + 1}: must be between"),
    (NETWORK, ["--adaptive_noise_scale", "0.1"], "--adaptive_noise_scale (command line) needs --noise_offset"),
    (NETWORK, ["--lr_warmup_steps", "10.0"], "write 10 (no decimal point) for a count of steps"),
    (NETWORK, ["--lr_decay_steps", "100%"], "a fraction of all steps must be below 1 (or a percentage below 100%)"),
    (NETWORK, ["--face_crop_aug_range", "4.0,2.0"], "the first number must not be larger than the second"),
]


@pytest.mark.parametrize("script, argv, message", EXAMPLES, ids=[" ".join(a) for _, a, _ in EXAMPLES])
def test_issue_examples_exit_2_with_one_line(script, argv, message, capsys):
    for extra in (["--dry_run"], ["--pretrained_model_name_or_path", MISSING_MODEL]):
        line = _refused(script, argv + extra, capsys)
        assert message in line, line


def test_values_sd_scripts_gives_a_meaning_still_resolve(tmp_path):
    cases = [
        (NETWORK, ["--max_grad_norm", "0"]),  # no clipping
        (NETWORK, ["--network_alpha", "0"]),  # alpha = dim
        (NETWORK, ["--network_alpha", "0.5", "--network_dim", "4"]),  # a float alpha
        (NETWORK, ["--text_encoder_lr", "0", "--unet_lr", "0"]),  # frozen parts
        (NETWORK, ["--lr_warmup_steps", "0.1", "--lr_decay_steps", "250"]),  # a ratio, a count
        (NETWORK, ["--lr_warmup_steps", "10%", "--lr_decay_steps", "0%"]),  # sd-scripts' int_or_float
        (NETWORK, ["--min_snr_gamma", "0", "--noise_offset", "0", "--scale_weight_norms", "0"]),  # 0 = off
        (NETWORK, ["--sample_every_n_steps", "0", "--sample_every_n_epochs", "0"]),  # sd-scripts: <= 0 disables
        (NETWORK, ["--network_args", "conv_dim=0", "conv_alpha=0"]),  # no 3x3 adapters
        (NETWORK, ["--network_args", "algo=lokr", "factor=-1"]),  # unknown keys are create_network's to name
        (NETWORK, ["--network_module", "lycoris.kohya", "--network_args", "conv_dim=-1"]),  # its own rules
        (NETWORK, ["--min_timestep", "500", "--max_timestep", "500"]),  # sd-scripts: every timestep is 500
        (NETWORK, ["--seed", "0"]), (NETWORK, ["--seed", str(2**32 - 1)]),
        (NETWORK, ["--full_fp16", "--mixed_precision", "fp16"]), (DB, ["--full_bf16", "--mixed_precision", "bf16"]),
        (DB, ["--stop_text_encoder_training", "-1"]),  # never train the text encoder
        (NETWORK, ["--adaptive_noise_scale", "-0.1", "--noise_offset", "0.1"]),
        (NETWORK, ["--dataset_repeats", "0"]),  # sd-scripts ignores the subset
        (NETWORK, ["--resolution", "512,768", "--face_crop_aug_range", "2.0,2.0"]),
        (NETWORK, ["--output_dir", str(tmp_path / "new" / "deeper"), "--logging_dir", str(tmp_path)]),
        (NETWORK, ["--output_name", "ü" * 100]),  # 200 bytes
    ]
    for script, argv in cases:
        resolve(argv, script, OPTIONS)


# --- --dataset_config keys get the same checks, named by file, table and key ---

DATASET_CASES = [
    ("[general]\nbatch_size = 0\n", "[general]: batch_size = 0: must be at least 1"),
    ("[general]\nresolution = 0\n", "[general]: resolution = 0: each number must be at least 8, got 0"),
    ("[general]\nresolution = [64, 0]\n", "[general]: resolution = [64, 0]: each number must be at least 8"),
    ("[general]\nkeep_tokens = -1\n", "[general]: keep_tokens = -1: must be at least 0"),
    ("[general]\ncaption_dropout_rate = 1.5\n", "caption_dropout_rate = 1.5: must be between 0 and 1"),
    ("[general]\ncaption_tag_dropout_rate = nan\n", "caption_tag_dropout_rate = NaN: must be a finite number"),
    ("[general]\nbucket_reso_steps = 0\n", "bucket_reso_steps = 0: must be at least 1"),
    ("[general]\nnetwork_multiplier = inf\n", "network_multiplier = Infinity: must be a finite number"),
    ("[general]\nface_crop_aug_range = [0.0, 2.0]\n", "face_crop_aug_range = [0.0, 2.0]: each number must be above 0"),
    ("[general]\nvalidation_split = 1.0\n", "validation_split = 1.0: must be at least 0 and below 1"),
    ("", "[[datasets]] #1 > [[datasets.subsets]] #1: num_repeats = 100000: must be between 0 and 10000", 100000),
    ("", "[[datasets]] #1 > [[datasets.subsets]] #1: num_repeats = -1: must be between 0 and 10000", -1),
]


@pytest.mark.parametrize("case", DATASET_CASES, ids=[c[1].split(": ")[-2] for c in DATASET_CASES])
def test_dataset_config_values_exit_2_naming_file_table_and_key(case, tmp_path, capsys):
    general, message, *repeats = case
    subset = f"image_dir = 'images'\nnum_repeats = {repeats[0]}\n" if repeats else "image_dir = 'images'\n"
    path = tmp_path / "dataset.toml"
    path.write_text(f"{general}[[datasets]]\n[[datasets.subsets]]\n{subset}", encoding="utf-8")
    line = _refused(NETWORK, ["--dataset_config", path, "--dry_run"], capsys)
    assert line.startswith(f"error: {path}:") and message in line, line


def test_dataset_config_json_and_folder_names_are_checked_too(tmp_path, capsys):
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"datasets": [{"batch_size": 2, "subsets": [{"image_dir": "x", "keep_tokens": -2}]}]}))
    assert "keep_tokens = -2: must be at least 0" in _refused(NETWORK, ["--dataset_config", path, "--dry_run"], capsys)
    (tmp_path / "data" / f"{MOST_REPEATS * 10}_sks dog").mkdir(parents=True)
    line = _refused(NETWORK, ["--train_data_dir", tmp_path / "data", "--dry_run"], capsys)
    assert f"folder '{MOST_REPEATS * 10}_sks dog' repeats its images {MOST_REPEATS * 10} times; at most" in line


# --- names and paths ---

def test_paths_that_cannot_be_written_or_named(tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    cases = [
        (["--output_dir", a_file], f"--output_dir {a_file}: '{a_file}' is a file, not a folder"),
        (["--output_dir", a_file / "sub" / "dir"], f"'{a_file}' is not a folder (a file or a broken link), so no "
                                                   "folder can be made under it"),
        (["--logging_dir", a_file], f"--logging_dir {a_file}: '{a_file}' is a file, not a folder"),
        (["--output_name", "my\0lora"], "--output_name my\\x00lora: contains a NUL byte"),
        (["--train_data_dir", "data\0"], "--train_data_dir data\\x00: contains a NUL byte"),
        (["--output_name", "lora\udcff"], "--output_name lora\\udcff: contains bytes that are not UTF-8 text"),
        (["--output_name", "sub/name"], "--output_name sub/name: is a file name, not a path"),
        (["--output_name", "a" * 201], "is 201 bytes long; at most 200 bytes"),
        (["--train_data_dir", f"data/{'é' * 128}"], "is 256 bytes long; file systems allow at most 255 bytes"),
        (["--sample_prompts", "x" * 256 + ".txt"], "is 260 bytes long; file systems allow at most 255 bytes"),
    ]
    for argv, message in cases:
        line = _refused(NETWORK, argv + ["--dry_run"], capsys)
        assert message in line, line


def test_a_config_file_name_no_file_system_takes_is_refused_before_it_is_opened(capsys):
    line = _refused(NETWORK, ["--config_file", "run\0.toml"], capsys)
    assert line.startswith("error: --config_file run\\x00.toml: contains a NUL byte"), line


def test_a_nul_byte_in_a_config_file_value_is_named_with_its_file(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text('[saving]\noutput_name = "a\\u0000b"\n', encoding="utf-8")
    line = _refused(NETWORK, ["--config_file", config, "--dry_run"], capsys)
    assert line == f"error: {config} [saving]: output_name = a\\x00b: contains a NUL byte (\\x00), which no name " \
                   "or text may hold; remove it"


def test_undecodable_argv_bytes_end_in_one_line_in_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, "train_network.py", b"--output_name", b"lora\xff", "--dry_run"], cwd=ROOT,
                          capture_output=True)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "contains bytes that are not UTF-8 text" in err


# --- TOML nested thousands deep ---

@pytest.mark.parametrize("flag, name", [("--config_file", "run.toml"), ("--dataset_config", "dataset.toml"),
                                        ("--dataset_config", "dataset.json")])
def test_deeply_nested_files_end_in_one_line(flag, name, tmp_path, capsys):
    path = tmp_path / name
    deep = "[" * 5000 + "]" * 5000
    path.write_text(f'{{"datasets": {deep}}}' if name.endswith(".json") else f"a = {deep}\n")
    line = _refused(NETWORK, [flag, path, "--dry_run"], capsys)
    assert line.startswith(f"error: {path}: arrays or tables are nested too deeply to read"), line


# --- warmup and decay percentages (sd-scripts' int_or_float), both parsers ---

def test_warmup_and_decay_percentages_are_read_as_fractions(tmp_path):
    config = resolve(["--lr_warmup_steps", "10%", "--lr_decay_steps", "25%"], NETWORK, OPTIONS)
    assert (config.lr_warmup_steps, config.lr_decay_steps) == (0.1, 0.25)
    assert (warmup_steps(config, 200), decay_steps(config, 200)) == (20, 50)
    path = tmp_path / "run.toml"
    path.write_text('[optimizer]\nlr_warmup_steps = "5%"\nlr_decay_steps = "0%"\n')
    config = resolve(["--config_file", str(path)], NETWORK, OPTIONS)
    assert (config.lr_warmup_steps, config.lr_decay_steps) == (0.05, 0.0)
    assert resolve(["--lr_warmup_steps", "100"], NETWORK, OPTIONS).lr_warmup_steps == 100  # still a count


def test_a_bad_percentage_says_what_is_expected(capsys):
    line = _refused(NETWORK, ["--lr_warmup_steps", "ten%", "--dry_run"], capsys)
    assert "--lr_warmup_steps expects a step count, a fraction below 1 or a percentage (e.g. 100, 0.1 or 10%)" in line
