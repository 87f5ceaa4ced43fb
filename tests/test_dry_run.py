"""sd-scripts command lines and configs resolve here unchanged, and --dry_run prints the plan without loading weights."""

from __future__ import annotations

import subprocess
import sys

import pytest

import train_db
import train_hypernetwork
import train_network
from library.config.declarations import OPTIONS
from library.config.options import NETWORK
from library.config.resolve import resolve
from tests.conftest import ROOT
from tests.helpers import make_image_folder
from tools import dry_run as dry_run_tool

# The flat --config_file layout sd-scripts reads (section names are free; this is the one its GUIs write).
SD_SCRIPTS_LORA_TOML = """
[model_arguments]
v2 = false
v_parameterization = false
pretrained_model_name_or_path = "./sd-models/model.safetensors"

[additional_network_arguments]
network_module = "networks.lora"
network_dim = 32
network_alpha = 16
network_train_unet_only = false
network_args = ["conv_dim=4", "conv_alpha=1"]

[optimizer_arguments]
optimizer_type = "AdamW8bit"
learning_rate = 1e-4
unet_lr = 1e-4
text_encoder_lr = 1e-5
lr_scheduler = "cosine_with_restarts"
lr_warmup_steps = 0
lr_scheduler_num_cycles = 1

[dataset_arguments]
cache_latents = true
shuffle_caption = true
enable_bucket = true
keep_tokens = 1

[training_arguments]
output_name = "mylora"
output_dir = "./output"
save_precision = "fp16"
save_every_n_epochs = 2
train_batch_size = 2
max_token_length = 225
xformers = true
max_train_epochs = 10
max_data_loader_n_workers = 8
persistent_data_loader_workers = true
seed = 1337
mixed_precision = "fp16"
clip_skip = 2
logging_dir = "./logs"
log_prefix = "mylora"
resolution = "512,512"
train_data_dir = "./train/aki"
noise_offset = 0.0

[sample_prompt_arguments]
sample_every_n_epochs = 5
sample_sampler = "euler_a"

[saving_arguments]
save_model_as = "safetensors"
"""


def test_sd_scripts_flat_config_resolves_to_the_values_sd_scripts_would_use(tmp_path):
    (tmp_path / "lora.toml").write_text(SD_SCRIPTS_LORA_TOML)
    config = resolve(["--config_file", str(tmp_path / "lora.toml")], NETWORK, OPTIONS)
    expected = {"pretrained_model_name_or_path": "./sd-models/model.safetensors", "network_module": "networks.lora",
                "network_dim": 32, "network_alpha": 16.0, "network_args": ["conv_dim=4", "conv_alpha=1"],
                "optimizer_type": "AdamW8bit", "learning_rate": 1e-4, "text_encoder_lr": [1e-5],  # nargs="*" in sd-scripts
                "lr_scheduler": "cosine_with_restarts", "lr_warmup_steps": 0, "cache_latents": True,
                "keep_tokens": 1, "train_batch_size": 2, "max_token_length": 225, "max_train_epochs": 10,
                "seed": 1337, "mixed_precision": "fp16", "clip_skip": 2, "resolution": "512,512",
                "sample_sampler": "euler_a", "save_model_as": "safetensors"}
    assert {k: config[k] for k in expected} == expected
    # untouched options keep sd-scripts' defaults
    assert (config.caption_extension, config.max_train_steps, config.gradient_accumulation_steps) == (".caption", 1600, 1)


def _dataset(tmp_path, count=4, corrupt=False):
    root = tmp_path / "train"
    make_image_folder(root, repeats=10, class_tokens="sks dog", count=count, caption_extension=".txt")
    make_image_folder(tmp_path / "reg", repeats=1, class_tokens="dog", count=3, caption_extension=".txt", seed=1)
    if corrupt:
        (root / "10_sks dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    return root


def test_dry_run_prints_the_plan_and_reports_a_corrupt_image_by_name(tmp_path, capsys):
    root = _dataset(tmp_path, corrupt=True)
    train_network.main(["--dry_run", "--train_data_dir", str(root), "--reg_data_dir", str(tmp_path / "reg"),
                        "--caption_extension", ".txt", "--resolution", "64", "--enable_bucket",
                        "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "16",
                        "--train_batch_size", "2", "--max_train_epochs", "3", "--network_dim", "8"])
    out = capsys.readouterr().out
    assert "4 training images (40 with repeats), 3 regularisation images (40 with repeats)" in out
    assert "[train] " in out and "10_sks dog: 4 images, repeats 10, class tokens 'sks dog', 4 with captions" in out
    assert "repeats 13-14 (balanced)" in out  # 3 reg images balanced to 40: 14, 13, 13
    assert "skipped unreadable image" in out and "broken.png" in out
    # 80 entries (40 train + 40 reg) split 57 / 23 over two buckets; batches never mix buckets, so with batch
    # size 2 that is ceil(57/2) + ceil(23/2) = 41 batches, not 40.
    assert "64 x 64        57 images" in out and "80 x 48        23 images" in out
    assert "steps: 41 batches per epoch, 41 optimizer steps per epoch" in out and "123 steps = 3 epochs" in out
    assert "network_dim" not in out  # accepted for later, not a problem for a dry run


def test_strict_makes_a_corrupt_image_fatal(tmp_path, capsys):
    root = _dataset(tmp_path, corrupt=True)
    with pytest.raises(SystemExit) as exit_info:
        train_network.main(["--dry_run", "--strict", "--train_data_dir", str(root), "--caption_extension", ".txt"])
    assert exit_info.value.code == 2
    assert "broken.png" in capsys.readouterr().err


def test_folders_without_a_repeat_prefix_get_the_convention_explained(tmp_path, capsys):
    (tmp_path / "data" / "dog").mkdir(parents=True)
    with pytest.raises(SystemExit):
        train_network.main(["--dry_run", "--train_data_dir", str(tmp_path / "data")])
    err = capsys.readouterr().err
    assert "10_sks dog" in err and "'dog'" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv_or_toml, phrase", [
    (["--netwrok_dim", "8"], "unknown option --netwrok_dim (did you mean '--network_dim'?)"),
    ('[dataset_arguments]\ncaption_extnsion = ".txt"\n', "(did you mean 'caption_extension'?)"),
])
def test_typos_fail_with_did_you_mean_and_exit_2(argv_or_toml, phrase, tmp_path, capsys):
    argv = argv_or_toml
    if isinstance(argv_or_toml, str):
        (tmp_path / "c.toml").write_text(argv_or_toml)
        argv = ["--config_file", str(tmp_path / "c.toml"), "--train_data_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        train_network.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert phrase in err and len(err.splitlines()) == 1


def test_dataset_config_typo_names_file_table_and_key(tmp_path, capsys):
    (tmp_path / "ds.toml").write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\ncaption_extention = ".txt"\n')
    with pytest.raises(SystemExit):
        train_network.main(["--dry_run", "--dataset_config", str(tmp_path / "ds.toml")])
    err = capsys.readouterr().err
    assert "ds.toml" in err and "caption_extention" in err and "did you mean 'caption_extension'" in err


def test_a_real_run_refuses_an_unsupported_option_by_name(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_network.main(["--pretrained_model_name_or_path", "tiny-sd1", "--output_dir", str(tmp_path),
                            "--huggingface_repo_id", "me/x"])
    assert exit_info.value.code == 2
    assert "--huggingface_repo_id (from command line) is not supported: " in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_cache_conflicts_are_refused_before_any_model_loads(tmp_path, capsys):
    root = _dataset(tmp_path)
    with pytest.raises(SystemExit):
        train_network.main(["--dry_run", "--train_data_dir", str(root), "--cache_latents", "--color_aug"])
    assert "color_aug" in capsys.readouterr().err


def test_real_run_checks_data_then_saves_model_and_resolved_options(tmp_path, capsys):
    root = _dataset(tmp_path)
    out = tmp_path / "out"
    train_network.main(["--pretrained_model_name_or_path", "tiny-sd1", "--output_dir", str(out),
                        "--output_name", "demo", "--train_data_dir", str(root), "--caption_extension", ".txt",
                        "--max_train_steps", "1", "--resolution", "64"])
    printed = capsys.readouterr().out
    assert printed.index("training images") < printed.index("model: tiny-sd1")  # data checked first
    resolved = out / "demo.config.toml"
    assert sorted(p.name for p in out.iterdir()) == ["demo.config.toml", "demo.safetensors"]
    again = resolve(["--config_file", str(resolved)], NETWORK, OPTIONS)
    assert again.train_data_dir == str(root) and again.caption_extension == ".txt" and again.output_name == "demo"


def test_hypernetwork_dry_run_prints_the_plan_and_loads_nothing(tmp_path, capsys):
    root = _dataset(tmp_path)
    train_hypernetwork.main(["--dry_run", "--train_data_dir", str(root), "--caption_extension", ".txt",
                             "--pretrained_model_name_or_path", str(tmp_path / "no-such-model.safetensors")])
    assert "4 training images" in capsys.readouterr().out


def test_train_db_dry_run_prints_the_plan(tmp_path, capsys):
    root = _dataset(tmp_path)
    train_db.main(["--dry_run", "--train_data_dir", str(root), "--caption_extension", ".txt"])
    assert "4 training images" in capsys.readouterr().out


def test_dry_run_tool_takes_the_script_name(tmp_path, capsys):
    root = _dataset(tmp_path)
    dry_run_tool.main(["train_db.py", "--train_data_dir", str(root), "--caption_extension", ".txt"])
    assert "steps:" in capsys.readouterr().out


def test_help_is_grouped_by_section():
    proc = subprocess.run([sys.executable, "train_network.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0
    for section in ("model:", "dataset:", "captions:", "caching:", "network:", "saving:"):
        assert f"\n{section}\n" in proc.stdout, section
    assert "--network_dim" in proc.stdout.split("\nnetwork:\n")[1]
