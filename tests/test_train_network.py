"""train_network.py end to end on the tiny model: every adapter, configs and flags, learning, resume, samples."""

from __future__ import annotations

import re

import pytest
import torch
import yaml
from safetensors.torch import load_file

import train_network
from library.data.demo import make_demo_dataset
from library.models.checkpoint_io import read_state_dict
from networks.files import describe_network_file
from tests.helpers import ADAPTER_FLAGS

ALGORITHMS = ADAPTER_FLAGS


@pytest.fixture
def data(tmp_path):
    make_demo_dataset(tmp_path / "data", count=4, size=32)
    return tmp_path / "data"


def _flags(data, out, *extra, steps=3, lr="1e-3", dim="4"):
    return ["--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", str(data), "--caption_extension", ".txt",
            "--resolution", "32", "--output_dir", str(out), "--output_name", "net", "--train_batch_size", "2",
            "--max_train_steps", str(steps), "--learning_rate", lr, "--network_dim", dim, "--network_alpha", "2",
            "--seed", "1", "--max_data_loader_n_workers", "0", *extra]


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_each_adapter_trains_from_flags_and_reloads_with_metadata(algorithm, data, tmp_path):
    result = train_network.main(_flags(data, tmp_path / "out", *ALGORITHMS[algorithm]))
    assert result.global_step == 3 and len(result.losses) == 3
    weights, metadata = read_state_dict(tmp_path / "out" / "net.safetensors")
    info = describe_network_file(weights, source="net")
    assert info.algorithm == {"locon": "lora"}.get(algorithm, algorithm)
    if algorithm == "locon":
        assert info.conv_modules
    assert metadata["ss_network_module"] == ALGORITHMS[algorithm][1] and metadata["ss_steps"] == "3"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert (tmp_path / "out" / "net.config.toml").is_file()


FLAT_TOML = """
[model_arguments]
pretrained_model_name_or_path = "tiny-sd1"

[additional_network_arguments]
network_module = "{module}"
network_dim = 4
network_alpha = 2
network_args = {args}

[optimizer_arguments]
optimizer_type = "AdamW"
learning_rate = 1e-3
lr_scheduler = "constant_with_warmup"
lr_warmup_steps = 1

[dataset_arguments]
train_data_dir = "{data}"
caption_extension = ".txt"
resolution = "32,32"
shuffle_caption = true
keep_tokens = 1

[training_arguments]
output_dir = "{out}"
output_name = "flat"
train_batch_size = 2
max_train_steps = 2
seed = 3
max_data_loader_n_workers = 0
save_precision = "fp16"
"""


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_each_adapter_trains_from_a_flat_sd_scripts_config(algorithm, data, tmp_path):
    flags = ALGORITHMS[algorithm]
    args = [f for f in flags[3:]] if "--network_args" in flags else []
    (tmp_path / "c.toml").write_text(FLAT_TOML.format(module=flags[1], args=str(args).replace("'", '"'),
                                                      data=data.as_posix(), out=(tmp_path / "o").as_posix()))
    result = train_network.main(["--config_file", str(tmp_path / "c.toml")])
    assert result.global_step == 2
    weights = load_file(str(tmp_path / "o" / "flat.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.float16}


def test_resume_continues_exactly_like_the_uninterrupted_run(data, tmp_path):
    common = ["--save_every_n_steps", "3", "--save_state", "--lr_scheduler", "cosine", "--optimizer_type", "AdamW"]
    full = train_network.main(_flags(data, tmp_path / "a", *common, steps=6))
    state = tmp_path / "a" / "net-step00000003-state"
    assert state.is_dir() and (state / "train_state.json").is_file()
    resumed = train_network.main(_flags(data, tmp_path / "b", *common, "--resume", str(state), steps=6))
    assert resumed.losses == full.losses[3:]
    a, b = load_file(str(tmp_path / "a" / "net.safetensors")), load_file(str(tmp_path / "b" / "net.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_hundred_steps_lower_the_loss_and_change_the_samples(data, tmp_path):
    from library.models.tiny import build_tiny
    from library.training.sampling import load_prompts, sample_images

    make_demo_dataset(data, count=4, size=32)
    result = train_network.main(_flags(data, tmp_path / "out", "--network_train_unet_only", steps=200, lr="3e-3",
                                       dim="8"))
    first, last = sum(result.losses[:40]) / 40, sum(result.losses[-40:]) / 40
    # Threshold: the mean loss of the last 40 steps is at least 15% below the first 40 steps'.
    assert last < 0.85 * first, (first, last)
    (tmp_path / "p.txt").write_text("sks shape, red circle --w 32 --h 32 --d 7 --s 4\n")
    prompts = load_prompts(tmp_path / "p.txt")
    base = build_tiny("tiny-sd1")
    trained = build_tiny("tiny-sd1")
    from networks import lora

    network = lora.create_network_from_weights(1.0, str(tmp_path / "out" / "net.safetensors"), None,
                                               trained.text_encoder, trained.unet)
    network.load_weights(str(tmp_path / "out" / "net.safetensors"))
    network.apply_to(trained.text_encoder, trained.unet)
    images = [sample_images(p, prompts, output_dir=tmp_path / name, output_name=name, step=200, epoch=None,
                            default_sampler="ddim", device="cpu", dtype=torch.float32)[0]
              for p, name in ((base, "base"), (trained, "trained"))]
    assert images[0].read_bytes() != images[1].read_bytes()


def test_sd_scripts_quick_start_command_line_runs_unchanged(data, tmp_path):
    """sd-scripts' train_network README command (SD 1.5 LoRA), model path swapped for the tiny model."""
    (tmp_path / "lora_train_config.toml").write_text(
        f"[general]\nenable_bucket = true\n[[datasets]]\nresolution = 64\nbatch_size = 2\nmin_bucket_reso = 64\n"
        f"  [[datasets.subsets]]\n  image_dir = '{(data / '10_sks shape').as_posix()}'\n"
        f"  caption_extension = '.txt'\n  num_repeats = 10\n")
    argv = ["--pretrained_model_name_or_path=tiny-sd1", f"--dataset_config={tmp_path / 'lora_train_config.toml'}",
            f"--output_dir={tmp_path / 'lora_train1'}", "--output_name=lora_train1", "--save_model_as=safetensors",
            "--prior_loss_weight=1.0", "--max_train_steps=4", "--learning_rate=1e-4", "--optimizer_type=AdamW8bit",
            "--xformers", "--mixed_precision=fp16", "--cache_latents", "--gradient_checkpointing",
            "--save_every_n_epochs=1", "--network_module=networks.lora"]
    result = train_network.main(argv)
    assert result.global_step == 4 and (tmp_path / "lora_train1" / "lora_train1.safetensors").is_file()


def test_tensorboard_scalars_and_samples_are_written(data, tmp_path):
    (tmp_path / "p.txt").write_text("sks shape --w 32 --h 32 --d 1 --s 2\n")
    train_network.main(_flags(data, tmp_path / "out", "--logging_dir", str(tmp_path / "logs"), "--sample_prompts",
                              str(tmp_path / "p.txt"), "--sample_every_n_steps", "2", "--sample_sampler", "euler",
                              steps=2))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    assert runs
    events = EventAccumulator(str(runs[0].parent))
    events.Reload()
    assert {"loss/current", "loss/average", "lr/textencoder", "lr/unet"} <= set(events.Tags()["scalars"])
    assert list((tmp_path / "out" / "sample").glob("net_000002_00_*_1.png"))


def test_the_vae_is_released_only_when_every_latent_is_cached_and_nothing_is_decoded(data, tmp_path, capsys):
    cached = train_network.main(_flags(data, tmp_path / "a", steps=2))
    assert cached.method.parts.vae is None  # its memory went to training
    out = capsys.readouterr().out
    assert re.search(r"training starts [0-9.]+ s after launch", out) and re.search(r"first step took [0-9.]+ s", out)

    (tmp_path / "p.txt").write_text("sks shape --w 32 --h 32 --s 1\n")
    sampled = train_network.main(_flags(data, tmp_path / "b", "--sample_prompts", str(tmp_path / "p.txt"),
                                        "--sample_every_n_steps", "1", steps=2))
    assert sampled.method.parts.vae is not None
    assert list((tmp_path / "b" / "sample").glob("net_000002_*.png"))
    assert sampled.losses == cached.losses  # releasing the VAE changes nothing about training

    augmented = train_network.main(_flags(data, tmp_path / "c", "--color_aug", steps=2))
    assert augmented.method.parts.vae is not None and augmented.global_step == 2  # encoded every step


@pytest.mark.parametrize("ratio, saved_epochs", [(2, [3, 6]), (3, [2, 4, 6]), (7, [1, 2, 3, 4, 5, 6])])
def test_save_n_epoch_ratio_saves_about_n_times_as_sd_scripts(tmp_path, ratio, saved_epochs):
    """sd-scripts: every floor(epochs / N) epochs (at least 1), over --save_every_n_epochs; the last is the final file."""
    make_demo_dataset(tmp_path / "data", count=2, size=32, folder="1_sks shape")  # 1 step per epoch at batch 2
    out = tmp_path / "out"
    train_network.main(_flags(tmp_path / "data", out, "--max_train_epochs", "7", "--save_n_epoch_ratio", str(ratio),
                              "--save_every_n_epochs", "5", "--network_module", "networks.lora"))
    names = sorted(p.name for p in out.glob("net*.safetensors"))
    assert names == sorted([f"net-{e:06d}.safetensors" for e in saved_epochs] + ["net.safetensors"])


def test_log_config_and_log_tracker_config_reach_tensorboard(data, tmp_path):
    """--log_config records the options (TensorBoard hparams; secrets and paths left out); --log_tracker_config's
    [tensorboard] table goes to its SummaryWriter (here: the event files' name suffix)."""
    (tmp_path / "trackers.toml").write_text('[tensorboard]\nfilename_suffix = ".sdtrainer"\n')
    for run, extra in (("with", ("--log_config", "--log_tracker_config", str(tmp_path / "trackers.toml"))),
                       ("without", ())):
        train_network.main(_flags(data, tmp_path / run, "--logging_dir", str(tmp_path / run / "logs"), *extra,
                                  steps=1))
    events = list((tmp_path / "with" / "logs").rglob("events.out.tfevents.*"))
    assert any(p.name.endswith(".sdtrainer") for p in events), events
    [hparams] = list((tmp_path / "with" / "logs").rglob("hparams.yml"))
    logged = yaml.safe_load(hparams.read_text())
    assert logged["network_dim"] == 4 and logged["learning_rate"] == 1e-3
    assert not {"train_data_dir", "output_dir", "pretrained_model_name_or_path", "logging_dir"} & logged.keys()
    assert not list((tmp_path / "without" / "logs").rglob("hparams.yml"))  # as sd-scripts: only with --log_config
    assert not any(p.name.endswith(".sdtrainer") for p in (tmp_path / "without" / "logs").rglob("*"))


def test_initial_step_counts_on_and_skip_until_initial_step_continues_the_data(tmp_path):
    from tests.helpers import make_image_folder

    make_image_folder(tmp_path / "data", repeats=1, count=4, caption_extension=".txt", sizes=((32, 32),))
    flags = ["--train_batch_size", "1", "--save_every_n_steps", "1", "--network_dropout", "0"]
    full = train_network.main(_flags(tmp_path / "data", tmp_path / "a", *flags, steps=6))  # 4 batches per epoch
    start = str(tmp_path / "a" / "net-step00000002.safetensors")
    # From the weights of step 2, counting on from step 2 and skipping the data steps 1-2 used: the third step sees
    # the same weights, batch and noise as the uninterrupted run's third step (the optimizer's moments restart).
    skipped = train_network.main(_flags(tmp_path / "data", tmp_path / "b", *flags, "--network_weights", start,
                                        "--initial_step", "2", "--skip_until_initial_step", steps=6))
    assert skipped.global_step == 6 and len(skipped.losses) == 4
    assert skipped.losses[0] == full.losses[2] and skipped.losses[1:] != full.losses[3:]
    assert (tmp_path / "b" / "net-step00000003.safetensors").is_file()
    assert not (tmp_path / "b" / "net-step00000001.safetensors").exists()
    # Without skipping, the epoch's data starts from its beginning: another batch for step 3.
    restarted = train_network.main(_flags(tmp_path / "data", tmp_path / "c", *flags, "--network_weights", start,
                                          "--initial_step", "2", steps=6))
    assert len(restarted.losses) == 4 and restarted.losses[0] != full.losses[2]
    # --initial_epoch 2 is step 4 (4 steps per epoch); the run must still have steps left.
    assert len(train_network.main(_flags(tmp_path / "data", tmp_path / "d", *flags, "--initial_epoch", "2",
                                         steps=6)).losses) == 2
    with pytest.raises(SystemExit):
        train_network.main(_flags(tmp_path / "data", tmp_path / "e", *flags, "--initial_step", "6", steps=6))


@pytest.mark.parametrize("flag, text_encoder_fp8", [("--fp8_base", True), ("--fp8_base_unet", False)])
def test_fp8_base_stores_the_frozen_weights_in_float8_and_trains(data, tmp_path, flag, text_encoder_fp8):
    plain = train_network.main(_flags(data, tmp_path / "a", steps=2))
    result = train_network.main(_flags(data, tmp_path / "b", flag, steps=2))
    parts = result.method.parts
    unet_linear = parts.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    te_linear = getattr(parts.text_encoder, "text_model", parts.text_encoder).encoder.layers[0].mlp.fc1
    assert unet_linear.weight.dtype == torch.float8_e4m3fn  # at rest, between forwards
    assert (te_linear.weight.dtype == torch.float8_e4m3fn) == text_encoder_fp8
    assert parts.unet.conv_in.weight.dtype == torch.float8_e4m3fn
    # The adapter trained on them: finite losses near the full-precision run's, and a file that loads.
    assert all(abs(a - b) < 0.1 * abs(b) for a, b in zip(result.losses, plain.losses))
    assert result.losses != plain.losses  # float8 rounding reached the outputs
    weights, _ = read_state_dict(tmp_path / "b" / "net.safetensors")
    assert weights and all(torch.isfinite(t).all() for t in weights.values())


def test_cpu_offload_checkpointing_moves_what_backward_needs_to_the_cpu(data, tmp_path):
    from types import SimpleNamespace

    from library.methods.diffusion_method import DiffusionMethod

    def saves(device, **config):
        return DiffusionMethod._offloaded_saves(SimpleNamespace(config=config, device=torch.device(device)))

    assert isinstance(saves("cuda", cpu_offload_checkpointing=True), torch.autograd.graph.save_on_cpu)
    assert not isinstance(saves("cuda"), torch.autograd.graph.save_on_cpu)
    assert not isinstance(saves("cpu", cpu_offload_checkpointing=True), torch.autograd.graph.save_on_cpu)
    # What stays in CPU memory comes back unchanged: the same training, here where it is a no-op anyway.
    flags = ("--gradient_checkpointing", "--network_train_unet_only")
    plain = train_network.main(_flags(data, tmp_path / "a", *flags, steps=2))
    offloaded = train_network.main(_flags(data, tmp_path / "b", *flags, "--cpu_offload_checkpointing", steps=2))
    assert offloaded.losses == plain.losses


def test_save_every_n_minutes_saves_on_time_and_keeps_only_the_last_such_save(data, tmp_path):
    out = tmp_path / "out"
    # Every step is past a few milliseconds: steps 1 and 3 save on time (2 is the --save_every_n_steps cadence's,
    # 4 the final save); each on-time save replaces the one before, state included.
    train_network.main(_flags(data, out, "--save_every_n_minutes", "0.0001", "--save_every_n_steps", "2",
                              "--save_state", steps=4))
    names = sorted(p.name for p in out.iterdir() if p.name.startswith("net") and p.suffix != ".toml")
    assert names == sorted(["net.safetensors", "net-state", "net-step00000002.safetensors", "net-step00000002-state",
                            "net-step00000003.safetensors", "net-step00000003-state"])
    quiet = tmp_path / "quiet"
    train_network.main(_flags(data, quiet, "--save_every_n_minutes", "60", steps=3))
    assert sorted(p.name for p in quiet.glob("*.safetensors")) == ["net.safetensors"]
