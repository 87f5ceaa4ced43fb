"""The validation loss: held-out images (validation_split, validation_seed, is_val subsets) that never train, scored
at fixed timesteps with fixed noise (the same figure twice for the same weights), logged as sd-scripts names it."""

from __future__ import annotations

import random

import pytest
from safetensors import safe_open

import train_network
from library.config.declarations import OPTIONS
from library.config.options import NETWORK
from library.config.resolve import resolve
from library.data.dataset import TrainingDataset
from library.data.plan import plan_run, print_plan, split_validation
from library.errors import UserError
from library.training.validation import make_validator, validation_timesteps
from tests.helpers import make_image_folder


def _options(tmp_path, *flags, count=10, reg=False):
    make_image_folder(tmp_path / "train", repeats=3, count=count, caption_extension=".txt", sizes=((32, 32),))
    if reg:
        make_image_folder(tmp_path / "reg", repeats=1, class_tokens="dog", count=4, sizes=((32, 32),))
    return resolve(["--train_data_dir", str(tmp_path / "train"), "--caption_extension", ".txt", "--resolution", "32",
                    "--train_batch_size", "2", *(["--reg_data_dir", str(tmp_path / "reg")] if reg else []), *flags],
                   NETWORK, OPTIONS)


# ---- the split ---------------------------------------------------------------------------------------------------

def test_split_shuffles_with_the_seed_as_sd_scripts_and_the_parts_never_overlap():
    images = [f"img{i}" for i in range(10)]
    train, held_out = split_validation(images, 0.3, seed=42)
    order = list(images)
    random.seed(42)  # sd-scripts: random.seed(validation_seed); random.shuffle(dataset)
    random.shuffle(order)
    assert train == order[:7] and held_out == order[7:]
    assert split_validation(images, 0.3, seed=42) == (train, held_out)  # the same images each time
    assert split_validation(images, 0.3, seed=43)[1] != held_out
    assert len(split_validation(images, 0.7, seed=1)[1]) == 7  # 10 * (1 - 0.7) is 3.0000000000000004: still 3 train
    assert split_validation(images, 0.0, seed=1) == (images, [])


def test_held_out_images_never_train_and_reg_images_never_validate(tmp_path):
    plan = plan_run(_options(tmp_path, "--validation_split", "0.3", "--validation_seed", "5", reg=True))
    held_out = {e.path for d in plan.validation for e in d.entries}
    assert len(held_out) == 3 and plan.validation_images == 3
    assert all(e.num_repeats == 1 and not e.is_reg for d in plan.validation for e in d.entries)
    trained = {p for batch in TrainingDataset(plan, seed=0) for p in batch.image_paths}
    assert trained and not trained & {str(p) for p in held_out}
    assert len(plan.datasets[0].train) == 7 and len(plan.datasets[0].reg) > 0
    # Reg images are balanced against the images that train: 7 x 3 repeats.
    assert sum(e.num_repeats for e in plan.datasets[0].reg) == 21


def test_the_seed_picks_the_images_and_without_one_the_split_is_still_the_same_each_time(tmp_path):
    picks = {seed: {e.path for d in plan_run(_options(tmp_path, "--validation_split", "0.3", "--validation_seed",
                                                      str(seed))).validation for e in d.entries} for seed in (1, 2)}
    assert picks[1] != picks[2]
    plain = _options(tmp_path, "--validation_split", "0.3")
    assert [e.path for e in plan_run(plain).validation[0].entries] == \
        [e.path for e in plan_run(plain).validation[0].entries]


def test_an_is_val_subset_only_validates(tmp_path, capsys):
    make_image_folder(tmp_path / "a", repeats=1, count=4, caption_extension=".txt", sizes=((32, 32),))
    make_image_folder(tmp_path / "b", repeats=1, count=2, caption_extension=".txt", sizes=((32, 32),))
    (tmp_path / "d.toml").write_text(
        f"[[datasets]]\nresolution = 32\n[[datasets.subsets]]\nimage_dir = '{tmp_path / 'a' / '1_sks dog'}'\n"
        f"caption_extension = '.txt'\n[[datasets.subsets]]\nimage_dir = '{tmp_path / 'b' / '1_sks dog'}'\n"
        "caption_extension = '.txt'\nis_val = true\n")
    plan = plan_run(resolve(["--dataset_config", str(tmp_path / "d.toml")], NETWORK, OPTIONS))
    assert len(plan.datasets[0].train) == 4 and {e.path.parent.parent.name for e in plan.validation[0].entries} == {"b"}
    print_plan(plan, verbose=False)
    assert "2 validation images (held out: they never train)" in capsys.readouterr().out


# ---- scoring -----------------------------------------------------------------------------------------------------

def test_validation_timesteps_are_sd_scripts_four_inner_points():
    assert validation_timesteps(None, None) == [200, 400, 600, 800]
    assert validation_timesteps(100, 900) == [260, 420, 580, 740]


def test_sharded_engines_are_refused_with_validation_images(tmp_path):
    plan = plan_run(_options(tmp_path, "--validation_split", "0.3"))
    with pytest.raises(UserError, match="not supported yet with FSDP or DeepSpeed"):
        make_validator({}, plan, None, None, None, sharded=object())
    assert make_validator({}, plan_run(_options(tmp_path / "b")), None, None, None, sharded=object()) is None


def _train(data, out, *extra, steps=2):
    return train_network.main([
        "--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", str(data), "--caption_extension", ".txt",
        "--resolution", "32", "--output_dir", str(out), "--output_name", "net", "--max_train_steps", str(steps),
        "--learning_rate", "1e-3", "--network_dim", "4", "--seed", "3", "--max_data_loader_n_workers", "0",
        "--train_batch_size", "2", "--network_dropout", "0.5", *extra])


def test_the_same_weights_score_the_same_and_the_figures_reach_tensorboard_and_metadata(tmp_path):
    from accelerate import Accelerator

    from library.training.validation import Validator

    make_image_folder(tmp_path / "data", repeats=1, count=6, caption_extension=".txt", sizes=((32, 32),))
    # --color_aug: latents are encoded each step, so the VAE is still there for the validations made below.
    result = _train(tmp_path / "data", tmp_path / "out", "--validation_split", "0.5", "--validate_every_n_steps", "1",
                    "--logging_dir", str(tmp_path / "logs"), "--color_aug")
    assert [(step, epoch) for step, epoch, _ in result.validation_losses] == [(1, None), (2, None), (2, 1)]
    assert result.validation_losses[0][2] != result.validation_losses[1][2]  # a step apart: other weights
    # Scored twice more with the final weights: the same figure, although the adapter has dropout 0.5 and is in
    # training mode, and each validation draws its noise again.
    method = result.method
    validator = Validator(method.config, plan_run(method.config), method, Accelerator(cpu=True))
    method.network.train()
    assert validator.loss() == validator.loss() == result.validation_losses[-1][2]
    assert method.network.training
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert {"loss/validation/step_average", "loss/validation/step_divergence", "loss/validation/epoch_average",
            "loss/validation/epoch_divergence"} <= set(events.Tags()["scalars"])
    with safe_open(str(tmp_path / "out" / "net.safetensors"), "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_num_validation_images"] == "3" and metadata["ss_num_train_images"] == "3"


def test_max_validation_steps_and_validate_every_n_epochs(tmp_path, capsys):
    make_image_folder(tmp_path / "data", repeats=1, count=8, caption_extension=".txt", sizes=((32, 32),))
    result = _train(tmp_path / "data", tmp_path / "out", "--validation_split", "0.5", "--max_validation_steps", "1",
                    "--validate_every_n_epochs", "2", "--max_train_epochs", "2", steps=100)
    assert [(step, epoch) for step, epoch, _ in result.validation_losses] == [(4, 2)]  # epoch 1 skipped
    assert "(4 images, 1 batches x 4 timesteps)" in capsys.readouterr().out


def test_each_batch_is_scored_at_the_four_timesteps_with_noise_drawn_afresh(tmp_path):
    import torch
    from accelerate import Accelerator

    from library.training.noise import NoiseSettings, make_noise_scheduler
    from library.training.validation import Validator

    config = _options(tmp_path, "--validation_split", "0.5", "--min_timestep", "100", "--max_timestep", "900",
                      "--seed", "7")

    class Method:  # what the validator asks of a training method
        noise_settings = NoiseSettings.from_config(config)
        scheduler = make_noise_scheduler(v_parameterization=False)
        caption_transform = None
        caption_variants = None
        calls = []

        def sampling_modules(self):
            return ()

        def loss(self, batch, generator):
            settings = self.noise_settings
            self.calls.append((settings.min_timestep, settings.max_timestep, len(batch.captions)))
            return torch.rand((), generator=generator)

    method = Method()
    validator = Validator(config, plan_run(config), method, Accelerator(cpu=True))
    first, second = validator.loss(), validator.loss()
    assert first == second  # the noise generator starts from the seed again each time
    timesteps = [260, 420, 580, 740]
    assert [c[:2] for c in method.calls] == [(t, t) for t in timesteps] * 3 * 2  # 5 images: batches of 2, 2, 1
    assert method.noise_settings.min_timestep == 100  # the run's own settings are back
