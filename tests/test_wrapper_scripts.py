"""The lora-scripts style wrappers in scripts/: train.sh, train_by_toml.sh, tensorboard.sh and their .ps1 twins.

The bash scripts are run for real (a tiny LoRA run through launch.py, our `accelerate launch`) and in print-only mode
(SD_TRAINER_PRINT_ONLY=1: the command, one argument per line, nothing run).

PowerShell (pwsh) is NOT available on the machines these tests run on, so the .ps1 files are never executed here.
Instead each .ps1 is checked against its .sh twin statically. Both files of a pair are written in one disciplined
shape so that this comparison is small and honest:
  * the settings block (everything above the "DO NOT MODIFY" line) holds only `name="${name:-default}"` lines in
    bash and `$name = "default"` lines in PowerShell: both must list the same names, in the same order, with the
    same defaults;
  * the flag table between `# BEGIN ARGUMENTS` and `# END ARGUMENTS` holds one statement per line — helper calls
    (`add_arg "--flag" "$var"` / `Add-Arg "--flag" $var`), assignments, `fail`, and if/elif/else with one simple
    condition — which both readers below turn into the same neutral tuples; any line either reader does not
    understand fails the test, so nothing in the table escapes the comparison.
What is not checked without pwsh: that PowerShell itself accepts the .ps1 files and that their helper functions and
environment-override loop behave as the bash ones do (they are short and written to mirror the bash lines).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from library.data.demo import make_demo_dataset
from networks.registry import algo_modules
from tests.conftest import ROOT

SCRIPTS = ROOT / "scripts"
PAIRS = ("train", "train_by_toml", "tensorboard")
MARKER = "# ============= DO NOT MODIFY"


# ---------------------------------------------------------------------------------------------------------------
# Running the bash scripts
# ---------------------------------------------------------------------------------------------------------------

def _env(**overrides) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "SD_TRAINER_PRINT_ONLY"}
    env.update({"PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def _run(script_name: str, /, *, cwd=None, timeout=300, **overrides) -> subprocess.CompletedProcess:
    # Run from another folder on purpose: the scripts must cd to the repository root themselves.
    return subprocess.run(["bash", str(SCRIPTS / script_name)], cwd=cwd or "/", env=_env(**overrides), text=True,
                          capture_output=True, timeout=timeout)


def _print_only(script_name: str, /, **overrides) -> list[str]:
    result = _run(script_name, SD_TRAINER_PRINT_ONLY="1", timeout=60, **overrides)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def _split(lines: list[str], entry: str = "train_network.py") -> tuple[list[str], list[str], dict[str, list[str]]]:
    """Printed command -> (launcher part, trainer arguments, {--flag: [values]})."""
    assert lines[:2] == [sys.executable, "launch.py"], lines[:2]
    at = lines.index(entry)
    launch, train = lines[2:at], lines[at + 1:]
    flags: dict[str, list[str]] = {}
    current = None
    for item in train:
        if item.startswith("--"):
            current = item
            flags[current] = []
        else:
            assert current is not None, train
            flags[current].append(item)
    return launch, train, flags


TINY_RUN = dict(pretrained_model="tiny-sd1", resolution="32", min_bucket_reso="32", max_bucket_reso="64",
                bucket_reso_steps="32", batch_size="2", max_train_steps="2", optimizer_type="AdamW",
                mixed_precision="no", network_dim="4", network_alpha="2", lr="1e-3", unet_lr="1e-3",
                text_encoder_lr="1e-4", num_cpu_threads_per_process="1", max_data_loader_n_workers="0",
                output_name="wrapped")


@pytest.fixture
def demo_data(tmp_path):
    make_demo_dataset(tmp_path / "data", count=4, size=32, folder="2_sks shape")
    return tmp_path / "data"


def test_train_sh_trains_the_tiny_model_end_to_end(demo_data, tmp_path):
    out, logs = tmp_path / "out", tmp_path / "logs"
    result = _run("train.sh", train_data_dir=demo_data, output_dir=out, logging_dir=logs, **TINY_RUN)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Running: " in result.stdout and " launch.py " in result.stdout
    weights = load_file(str(out / "wrapped.safetensors"))
    assert weights and all(key.startswith("lora_") for key in weights)
    assert any(key.startswith("lora_unet_") for key in weights) and any(key.startswith("lora_te_") for key in weights)
    assert list(logs.rglob("events.out.tfevents.*")), sorted(map(str, logs.rglob("*")))
    # --log_prefix is the output name, as in lora-scripts
    assert any(p.name.startswith("wrapped") for p in logs.iterdir())


def test_sdxl_switch_picks_sdxl_train_network_py():
    lines = _print_only("train.sh")
    assert "train_network.py" in lines and "sdxl_train_network.py" not in lines  # sdxl=0 by default
    launch, train, flags = _split(_print_only("train.sh", sdxl="1"), entry="sdxl_train_network.py")
    assert "train_network.py" not in train
    # everything else is the same command
    assert (launch, train) == _split(lines)[:2]
    # PowerShell (not run here): the same switch in its flag table, and the command built from its choice
    ps = _read("train.ps1")
    table = _statements_ps(ps)
    at = table.index(("if", "sdxl", "==", "1"))
    assert table[at:at + 5] == [("if", "sdxl", "==", "1"), ("set", "train_script", "sdxl_train_network.py"), ("else",),
                                ("set", "train_script", "train_network.py"), ("end",)]
    assert ("sdxl", "0") in _settings_ps(ps) and ("sdxl", "0") in _settings_sh(_read("train.sh"))
    assert '@($LaunchArgs) + @($train_script) + @($TrainArgs)' in ps and '"train_network.py")' not in ps
    assert '"${launch_args[@]}" "$train_script" "${args[@]}"' in _read("train.sh")


def test_train_sh_sdxl_trains_the_tiny_sdxl_model_end_to_end(demo_data, tmp_path):
    out = tmp_path / "out"
    settings = {**TINY_RUN, "pretrained_model": "tiny-sdxl", "sdxl": "1"}
    result = _run("train.sh", train_data_dir=demo_data, output_dir=out, logging_dir=tmp_path / "logs", **settings)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " sdxl_train_network.py " in result.stdout
    weights = load_file(str(out / "wrapped.safetensors"))
    assert any(key.startswith("lora_unet_input_blocks_") for key in weights)  # sd-scripts' SDXL names
    assert any(key.startswith("lora_te1_") for key in weights) and any(key.startswith("lora_te2_") for key in weights)
    # (An SD 1.x model given to sdxl_train_network.py is refused in one line: tests/models/test_sdxl.py; that a
    # trainer's one line and exit code 2 come through the wrapper: the bad-option test below.)


def test_train_sh_bad_option_is_the_trainers_one_line_and_exit_code_2(tmp_path):
    result = _run("train.sh", train_data_dir=tmp_path, output_dir=tmp_path / "out", extra_args="--network_dimm 4",
                  timeout=120, **TINY_RUN)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "CalledProcessError" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: unknown option --network_dimm (did you mean '--network_dim'?)"


def test_train_sh_default_command_matches_lora_scripts_conventions():
    launch, train, flags = _split(_print_only("train.sh"))
    assert launch == ["--num_cpu_threads_per_process=4"]
    for switch in ("--enable_bucket", "--cache_latents", "--shuffle_caption"):
        assert flags[switch] == []
    expected = {"--pretrained_model_name_or_path": "./sd-models/model.safetensors", "--network_module": "networks.lora",
                "--network_dim": "32", "--network_alpha": "32", "--optimizer_type": "AdamW8bit",
                "--mixed_precision": "fp16", "--seed": "1337", "--caption_extension": ".txt", "--clip_skip": "2",
                "--output_dir": "./output", "--logging_dir": "./logs", "--log_prefix": "my_lora",
                "--max_train_epochs": "10", "--save_every_n_epochs": "2", "--learning_rate": "1e-4",
                "--unet_lr": "1e-4", "--text_encoder_lr": "1e-5", "--lr_scheduler": "cosine_with_restarts",
                "--lr_scheduler_num_cycles": "1", "--save_model_as": "safetensors", "--resolution": "512,512"}
    assert {flag: flags[flag] for flag in expected} == {flag: [value] for flag, value in expected.items()}
    # Empty settings and 0 switches leave their flags out.
    for absent in ("--reg_data_dir", "--network_weights", "--resume", "--noise_offset", "--min_snr_gamma",
                   "--max_train_steps", "--v2", "--v_parameterization", "--save_state", "--network_args",
                   "--network_train_unet_only", "--stop_text_encoder_training"):
        assert absent not in flags, absent
    assert len([t for t in train if t.startswith("--")]) == len(flags)


def test_train_sh_settings_become_flags():
    launch, _, flags = _split(_print_only(
        "train.sh", multi_gpu="2", model_type="sd2", parameterization="1", reg_data_dir="./reg",
        noise_offset="0.1", min_snr_gamma="5", save_state="1", resume="./output/s-state", train_unet_only="1",
        max_train_steps="50", lr_scheduler="constant", extra_args="--gradient_checkpointing --max_grad_norm 1.0"))
    assert launch == ["--num_cpu_threads_per_process=4", "--multi_gpu", "--num_processes=2"]
    assert flags["--v2"] == [] and flags["--v_parameterization"] == [] and "--clip_skip" not in flags
    assert flags["--reg_data_dir"] == ["./reg"] and flags["--noise_offset"] == ["0.1"]
    assert flags["--min_snr_gamma"] == ["5"] and flags["--resume"] == ["./output/s-state"]
    assert flags["--save_state"] == [] and flags["--network_train_unet_only"] == []
    assert flags["--max_train_steps"] == ["50"] and "--max_train_epochs" not in flags
    assert "--lr_scheduler_num_cycles" not in flags
    assert flags["--gradient_checkpointing"] == [] and flags["--max_grad_norm"] == ["1.0"]


@pytest.mark.parametrize("algo, module, network_args", [
    (algo, module, None if algo in ("lora", "oft", "dylora") else ["conv_dim=8", "conv_alpha=2"])
    for algo, module in algo_modules().items()
])
def test_algo_picks_network_module_and_network_args(algo, module, network_args):
    _, _, flags = _split(_print_only("train.sh", algo=algo, conv_dim="8", conv_alpha="2"))
    assert flags["--network_module"] == [module]
    assert flags.get("--network_args") == network_args


def test_explicit_network_module_and_dropout():
    _, _, flags = _split(_print_only("train.sh", network_module="lycoris.kohya", algo="loha", dropout="0.1"))
    assert flags["--network_module"] == ["lycoris.kohya"]
    assert flags["--network_args"] == ["conv_dim=4", "conv_alpha=4", "algo=loha", "dropout=0.1"]


def test_unknown_algo_is_refused():
    result = _run("train.sh", SD_TRAINER_PRINT_ONLY="1", algo="dora", timeout=60)
    assert result.returncode == 2 and "unknown algo" in result.stderr


def test_train_by_toml_print_only():
    lines = _print_only("train_by_toml.sh")
    launch, train, _ = _split(lines)
    assert launch == ["--num_cpu_threads_per_process=4"]
    assert train == ["--config_file", "./configs/lora.toml"]
    lines = _print_only("train_by_toml.sh", config_file="my.toml", sample_prompts="p.txt", script="train_db.py",
                        multi_gpu="2")
    launch, train, _ = _split(lines, entry="train_db.py")
    assert launch == ["--num_cpu_threads_per_process=4", "--multi_gpu", "--num_processes=2"]
    assert train == ["--config_file", "my.toml", "--sample_prompts", "p.txt"]


def test_train_by_toml_trains_from_a_small_config(demo_data, tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(f"""
[model_arguments]
pretrained_model_name_or_path = "tiny-sd1"

[additional_network_arguments]
network_module = "networks.lora"
network_dim = 4
network_alpha = 2

[optimizer_arguments]
optimizer_type = "AdamW"
learning_rate = 1e-3

[dataset_arguments]
train_data_dir = "{demo_data.as_posix()}"
caption_extension = ".txt"
resolution = "32,32"
max_data_loader_n_workers = 0

[training_arguments]
output_dir = "{(tmp_path / 'out').as_posix()}"
output_name = "fromtoml"
train_batch_size = 2
max_train_steps = 2
seed = 1
""")
    result = _run("train_by_toml.sh", config_file=config, num_cpu_threads_per_process="1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"--config_file {config}" in result.stdout
    weights = load_file(str(tmp_path / "out" / "fromtoml.safetensors"))
    assert weights and all(key.startswith("lora_") for key in weights)


def test_tensorboard_print_only(tmp_path):
    lines = _print_only("tensorboard.sh", logdir=tmp_path / "logs", port="6123")
    assert lines[-4:] == ["--logdir", str(tmp_path / "logs"), "--port", "6123"]
    # Without a `tensorboard` command on PATH it falls back to python -m tensorboard.main.
    lines = _print_only("tensorboard.sh", PATH="/usr/bin:/bin")
    assert lines == [sys.executable, "-m", "tensorboard.main", "--logdir", "./logs", "--port", "6006"]
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "tensorboard").write_text("#!/bin/sh\n")
    (fake / "tensorboard").chmod(0o755)
    lines = _print_only("tensorboard.sh", PATH=f"{fake}:/usr/bin:/bin")
    assert lines == ["tensorboard", "--logdir", "./logs", "--port", "6006"]


# ---------------------------------------------------------------------------------------------------------------
# PowerShell parity, read statically (pwsh is not installed here and cannot be)
# ---------------------------------------------------------------------------------------------------------------

def _code_lines(text: str):
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            yield number, stripped


def _settings_sh(text: str) -> list[tuple[str, str]]:
    head = text.split(MARKER)[0]
    settings = []
    for number, line in _code_lines(head):
        m = re.fullmatch(r'(\w+)="\$\{(\w+):-([^"}]*)\}"\s*(#.*)?', line)
        assert m and m[1] == m[2], f"sh settings line {number} is not name=\"${{name:-default}}\": {line}"
        settings.append((m[1], m[3]))
    return settings


def _settings_ps(text: str) -> list[tuple[str, str]]:
    head = text.split(MARKER)[0]
    settings = []
    for number, line in _code_lines(head):
        if line.startswith("$__settings_before = "):  # the environment-override bookkeeping
            continue
        m = re.fullmatch(r'\$(\w+) = "([^"$`]*)"\s*(#.*)?', line)
        assert m, f"ps1 settings line {number} is not $name = \"default\": {line}"
        settings.append((m[1], m[2]))
    return settings


def _table(text: str) -> list[tuple[int, str]]:
    block = text.split("# BEGIN ARGUMENTS\n", 1)[1].split("# END ARGUMENTS", 1)[0]
    return list(_code_lines(block))


def _sh_condition(cond: str) -> tuple:
    patterns = [(r'-z "\$(\w+)"', lambda m: (m[1], "==", "")),
                (r'-n "\$(\w+)"', lambda m: (m[1], "!=", "")),
                (r'"\$(\w+)" -gt (\d+)', lambda m: (m[1], ">", m[2])),
                (r'"\$(\w+)" (==|!=) "([^"$]*)"', lambda m: (m[1], m[2], m[3])),
                (r'"\$(\w+)" == ([^"\s$]*\*)', lambda m: (m[1], "like", m[2]))]
    for pattern, build in patterns:
        if m := re.fullmatch(pattern, cond.strip()):
            return build(m)
    raise AssertionError(f"unrecognised bash condition: {cond}")


def _ps_condition(cond: str) -> tuple:
    patterns = [(r'\[int\]\$(\w+) -gt (\d+)', lambda m: (m[1], ">", m[2])),
                (r'\$(\w+) -(eq|ne) "([^"$`]*)"', lambda m: (m[1], {"eq": "==", "ne": "!="}[m[2]], m[3])),
                (r'\$(\w+) -like "([^"$`]*)"', lambda m: (m[1], "like", m[2]))]
    for pattern, build in patterns:
        if m := re.fullmatch(pattern, cond.strip()):
            return build(m)
    raise AssertionError(f"unrecognised PowerShell condition: {cond}")


def _call(name: str, rest: str, var: str, lit: str) -> tuple:
    tokens = [m[0] for m in re.finditer(rf'{var}|{lit}', rest)]
    assert re.sub(rf'{var}|{lit}|\s', "", rest) == "", f"unrecognised arguments: {rest}"
    normal = []
    for token in tokens:
        if m := re.fullmatch(var, token):
            normal.append(("var", m[1]))
        else:
            normal.append(("lit", re.fullmatch(lit, token)[1]))
    return ("call", name.replace("_", "").replace("-", "").lower(), *normal)


def _statements_sh(text: str) -> list[tuple]:
    out = []
    for number, line in _table(text):
        if m := re.fullmatch(r'(if|elif) \[\[ (.*) \]\]; then', line):
            out.append((m[1], *_sh_condition(m[2])))
        elif line in ("else", "fi"):
            out.append(({"fi": "end"}.get(line, line),))
        elif m := re.fullmatch(r'(\w+)="([^"$]*)"', line):
            out.append(("set", m[1], m[2]))
        elif m := re.fullmatch(r'([a-z_]+)((?: "[^"]*")+)', line):
            out.append(_call(m[1], m[2], var=r'"\$(\w+)"', lit=r'"([^"$]*)"'))
        else:
            raise AssertionError(f"unrecognised bash line {number} in the flag table: {line}")
    return out


def _statements_ps(text: str) -> list[tuple]:
    out = []
    for number, line in _table(text):
        if m := re.fullmatch(r'if \((.*)\) \{', line):
            out.append(("if", *_ps_condition(m[1])))
        elif m := re.fullmatch(r'\} elseif \((.*)\) \{', line):
            out.append(("elif", *_ps_condition(m[1])))
        elif line == "} else {":
            out.append(("else",))
        elif line == "}":
            out.append(("end",))
        elif m := re.fullmatch(r'\$(\w+) = "([^"$`]*)"', line):
            out.append(("set", m[1], m[2]))
        elif m := re.fullmatch(r'([A-Z][A-Za-z]*(?:-[A-Za-z]+)?)((?: (?:"[^"]*"|\$\w+))+)', line):
            out.append(_call(m[1], m[2], var=r'\$(\w+)', lit=r'"([^"$`]*)"'))
        else:
            raise AssertionError(f"unrecognised PowerShell line {number} in the flag table: {line}")
    return out


def _read(name: str) -> str:
    return (SCRIPTS / name).read_text(encoding="utf-8-sig")


@pytest.mark.parametrize("pair", PAIRS)
def test_ps1_has_the_same_settings_and_defaults_as_sh(pair):
    sh, ps = _settings_sh(_read(f"{pair}.sh")), _settings_ps(_read(f"{pair}.ps1"))
    assert sh, pair
    assert ps == sh


@pytest.mark.parametrize("pair", PAIRS)
def test_ps1_builds_the_same_flags_from_the_same_settings_as_sh(pair):
    sh, ps = _statements_sh(_read(f"{pair}.sh")), _statements_ps(_read(f"{pair}.ps1"))
    assert sh and any(s[0] == "call" for s in sh), pair
    assert ps == sh
    # if/end balance, so the nesting read from both files is the same tree
    depth = 0
    for statement in sh:
        depth += {"if": 1, "end": -1}.get(statement[0], 0)
        assert depth >= 0
    assert depth == 0


@pytest.mark.parametrize("pair", PAIRS)
def test_every_setting_is_used(pair):
    for suffix, reference in ((".sh", r"\$\{?NAME\b"), (".ps1", r"\$NAME\b")):
        text = _read(pair + suffix)
        names = [n for n, _ in (_settings_sh(text) if suffix == ".sh" else _settings_ps(text))]
        body = text.split(MARKER, 1)[1]
        unused = [n for n in names if not re.search(reference.replace("NAME", n), body)]
        assert not unused, f"{pair}{suffix}: settings never used: {unused}"


@pytest.mark.parametrize("pair", PAIRS)
def test_print_only_and_python_override_in_both(pair):
    sh, ps = _read(f"{pair}.sh"), _read(f"{pair}.ps1")
    assert '"${SD_TRAINER_PRINT_ONLY:-}" == "1"' in sh and '$env:SD_TRAINER_PRINT_ONLY -eq "1"' in ps
    assert "${PYTHON:-python}" in sh and "$env:PYTHON" in ps
    assert 'cd "$(dirname "${BASH_SOURCE[0]}")/.."' in sh and "Set-Location (Split-Path -Parent $PSScriptRoot)" in ps
    assert sh.isascii() and ps.isascii()  # Windows PowerShell 5.1 reads BOM-less files as ANSI


def test_the_parity_readers_notice_a_difference():
    sh, ps = _read("train.sh"), _read("train.ps1")
    assert _statements_ps(ps.replace('Add-Arg "--network_dim" $network_dim', 'Add-Arg "--network_dim" $network_alpha')) \
        != _statements_sh(sh)
    assert _settings_ps(ps.replace('$network_dim = "32"', '$network_dim = "16"')) != _settings_sh(sh)
    with pytest.raises(AssertionError, match="unrecognised"):
        _statements_ps(ps.replace('Add-Arg "--seed" $seed', 'if ($seed) { Add-Arg "--seed" $seed }'))


def _algo_choices(statements: list[tuple]) -> tuple[dict[str, str], list[str]]:
    """From a flag table: ({algo: network_module} of the `algo ==` branches, the algos its refusal names)."""
    mapping, refused, current = {}, [], None
    for statement in statements:
        if statement[0] in ("if", "elif") and statement[1] == "algo" and statement[2] == "==":
            current = statement[3]
        elif statement[0] == "set" and statement[1] == "network_module" and current is not None:
            mapping[current] = statement[2]
            current = None
        elif statement[:2] == ("call", "fail") and "unknown algo" in statement[2][1]:
            refused = re.split(r", | or ", re.search(r"\(use (.*)\)", statement[2][1])[1])
    return mapping, refused


@pytest.mark.parametrize("suffix", [".sh", ".ps1"])
def test_wrappers_algo_lists_are_the_registry(suffix):
    """The wrappers cannot import the registry, so their algo lists are checked against it here: registering an
    adapter (or an alias such as locon) without adding it to both wrappers fails this test."""
    text = _read("train" + suffix)
    statements = (_statements_sh if suffix == ".sh" else _statements_ps)(text)
    mapping, refused = _algo_choices(statements)
    assert mapping == algo_modules()
    assert sorted(refused) == sorted(algo_modules())
    # The setting's comment lists the choices too: `algo=... # lora | locon (LoRA + conv layers) | loha | lokr`
    comment = next(line for line in text.split(MARKER)[0].splitlines() if re.match(r'\$?algo\b', line))
    listed = [choice.split()[0] for choice in comment.split("#", 1)[1].split("|")]
    assert sorted(listed) == sorted(algo_modules())


@pytest.mark.parametrize("suffix", [".sh", ".ps1"])
def test_the_algo_list_check_notices_a_new_registration(monkeypatch, suffix):
    from networks.registry import ALGORITHMS

    monkeypatch.setitem(ALGORITHMS, "fake", "tests.networks.test_registry:FakeAdapter")  # an adapter, registered
    with pytest.raises(AssertionError, match="fake"):
        test_wrappers_algo_lists_are_the_registry(suffix)


@pytest.mark.parametrize("model_type, only", [("sd1", "train_unet_only"), ("sd2", "train_text_encoder_only")])
def test_every_setting_set_gives_flags_the_trainer_accepts(model_type, only):
    """Each setting given a value must become options train_network.py declares (a wrapper flag the trainer does not
    know would only fail when a user sets it)."""
    from library.config.declarations import OPTIONS
    from library.config.options import NETWORK
    from library.config.resolve import check_supported, resolve

    values = dict(model_type=model_type, parameterization="1" if model_type == "sd2" else "0", reg_data_dir="reg",
                  algo="locon", network_weights="w.safetensors", dropout="0.1", max_train_steps="100",
                  noise_offset="0.05", min_snr_gamma="5", bucket_reso_steps="64", max_data_loader_n_workers="2",
                  persistent_data_loader_workers="1", lr_warmup_steps="10", save_precision="fp16", save_state="1",
                  resume="state", multi_gpu="2", extra_args="--gradient_checkpointing", **{only: "1"})
    launch, train, flags = _split(_print_only("train.sh", **values))
    assert "--multi_gpu" in launch
    config = resolve(train, NETWORK, OPTIONS)  # an undeclared flag would exit 2 here
    check_supported(config, OPTIONS)  # and a declared-but-refused one here
    assert config.reg_data_dir == "reg" and config.resume == "state" and config.gradient_checkpointing
