"""sd-scripts' ss_* training metadata, sshs_* hashes and LoRA modelspec.* keys: key sets, string formats, hashes."""

from __future__ import annotations

import hashlib
import json
import time

import pytest
import safetensors.torch
import torch

from library.config.declarations import OPTIONS
from library.config.resolve import resolve
from library.data.plan import plan_run
from library.data.subsets import list_subset_images
from library.errors import UserError
from library.models.family import family_named
from library.formats.kohya_metadata import (MINIMUM_KEYS, TRAINER_VERSION, file_hashes, minimal_metadata,
                                            model_hashes, modelspec_from_config, network_modelspec,
                                            save_time_metadata, saved_metadata, training_metadata)
from tests.helpers import make_image_folder

# "metadata_keys" of /work/shared/reference/layouts/sd-scripts-lora-sd15-rank16.json: what sd-scripts 48d368fa
# train_network.py writes for a plain LoRA run without --dataset_config (networks.lora, dim 16, alpha 8).
GOLDEN_KEYS = {
    "modelspec.architecture", "modelspec.date", "modelspec.implementation", "modelspec.implementation_version",
    "modelspec.prediction_type", "modelspec.resolution", "modelspec.sai_model_spec", "modelspec.title",
    "ss_adaptive_noise_scale", "ss_base_model_version", "ss_batch_size_per_device", "ss_bucket_info",
    "ss_bucket_no_upscale", "ss_cache_latents", "ss_caption_dropout_every_n_epochs", "ss_caption_dropout_rate",
    "ss_caption_tag_dropout_rate", "ss_clip_skip", "ss_color_aug", "ss_dataset_dirs", "ss_debiased_estimation",
    "ss_enable_bucket", "ss_epoch", "ss_face_crop_aug_range", "ss_flip_aug", "ss_fp8_base", "ss_fp8_base_unet",
    "ss_full_fp16", "ss_gradient_accumulation_steps", "ss_gradient_checkpointing", "ss_huber_c", "ss_huber_scale",
    "ss_huber_schedule", "ss_ip_noise_gamma", "ss_ip_noise_gamma_random_strength", "ss_keep_tokens",
    "ss_learning_rate", "ss_loss_type", "ss_lowram", "ss_lr_scheduler", "ss_lr_warmup_steps", "ss_max_bucket_reso",
    "ss_max_grad_norm", "ss_max_token_length", "ss_max_train_steps", "ss_max_validation_steps",
    "ss_min_bucket_reso", "ss_min_snr_gamma", "ss_mixed_precision", "ss_multires_noise_discount",
    "ss_multires_noise_iterations", "ss_network_alpha", "ss_network_dim", "ss_network_dropout",
    "ss_network_module", "ss_new_sd_model_hash", "ss_noise_offset", "ss_noise_offset_random_strength",
    "ss_num_batches_per_epoch", "ss_num_epochs", "ss_num_reg_images", "ss_num_train_images",
    "ss_num_validation_images", "ss_optimizer", "ss_output_name", "ss_prior_loss_weight", "ss_random_crop",
    "ss_reg_dataset_dirs", "ss_resize_interpolation", "ss_resolution", "ss_scale_weight_norms", "ss_sd_model_hash",
    "ss_sd_model_name", "ss_sd_scripts_commit_hash", "ss_seed", "ss_session_id", "ss_shuffle_caption", "ss_steps",
    "ss_tag_frequency", "ss_text_encoder_lr", "ss_total_batch_size", "ss_training_comment",
    "ss_training_finished_at", "ss_training_started_at", "ss_unet_lr", "ss_v2", "ss_validate_every_n_epochs",
    "ss_validate_every_n_steps", "ss_validation_seed", "ss_validation_split", "ss_zero_terminal_snr",
    "sshs_legacy_hash", "sshs_model_hash",
}
GOLDEN_SS = {key for key in GOLDEN_KEYS if key.startswith("ss_")}
GOLDEN_MODELSPEC = {key for key in GOLDEN_KEYS if key.startswith("modelspec.")}
SAVE_TIME_KEYS = {"ss_training_finished_at", "ss_steps", "ss_epoch"}
# Written only without --dataset_config; with it, everything per dataset goes into ss_datasets.
FOLDER_ONLY_KEYS = {"ss_batch_size_per_device", "ss_total_batch_size", "ss_resolution", "ss_color_aug", "ss_flip_aug",
                    "ss_random_crop", "ss_shuffle_caption", "ss_enable_bucket", "ss_bucket_no_upscale",
                    "ss_min_bucket_reso", "ss_max_bucket_reso", "ss_keep_tokens", "ss_reg_dataset_dirs",
                    "ss_bucket_info"}
TS = 1700000000.25
TRAIN_TAGS = {"sks dog": 4, "red": 2, "photo": 2, "blue": 1}


def _folders(tmp_path, train_count=4, reg_count=3):
    """10_sks dog (captions with case, spaces and empty tags; one image without a caption file) and 1_dog."""
    train = make_image_folder(tmp_path / "train", repeats=10, class_tokens="sks dog", count=train_count)
    for name, text in (("img000", "sks dog, Red , photo"), ("img001", "sks dog, red, ,photo"),
                       ("img002", "SKS Dog, blue")):
        if (train / f"{name}.png").exists():
            (train / f"{name}.txt").write_text(text)
    if (train / "img003.txt").exists():
        (train / "img003.txt").unlink()  # falls back to the class tokens "sks dog"
    reg = make_image_folder(tmp_path / "reg", repeats=1, class_tokens="dog", count=reg_count, seed=1)
    for caption in reg.glob("*.txt"):
        caption.write_text("dog")
    return train.parent, reg.parent


def _model_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(bytes(range(256)) * 5000)  # 1.28 MB: the legacy hash window lies inside
    return path


def _config(*argv):
    return resolve([str(a) for a in argv], "network", OPTIONS)


def _run(tmp_path, *extra, resolution="64", optimizer=torch.optim.AdamW, optimizer_kwargs=None, **kwargs):
    train, reg = _folders(tmp_path)
    config = _config("--train_data_dir", train, "--reg_data_dir", reg, "--caption_extension", ".txt",
                     "--resolution", resolution, "--output_name", "mylora", "--seed", "42", "--max_train_epochs", "2",
                     *extra)
    return config, training_metadata(config, plan_run(config), session_id=1234, training_started_at=TS,
                                     optimizer=optimizer, optimizer_kwargs=optimizer_kwargs, **kwargs)


def _golden_run(tmp_path):
    model = _model_file(tmp_path)
    return _run(tmp_path, "--pretrained_model_name_or_path", model, "--network_module", "networks.lora",
                "--network_dim", "16", "--network_alpha", "8", "--enable_bucket", "--min_bucket_reso", "32",
                "--max_bucket_reso", "128", "--bucket_reso_steps", "16",
                optimizer_kwargs={"weight_decay": 0.01, "betas": (0.9, 0.999)}, sd_model_hashes=file_hashes(model))


# ---- keys and formats without --dataset_config

def test_plain_run_writes_exactly_the_golden_ss_keys(tmp_path):
    _, metadata = _golden_run(tmp_path)
    saved = save_time_metadata(metadata, steps=10, epoch=1, finished_at=TS + 60)
    assert set(saved) == GOLDEN_SS
    assert set(metadata) == GOLDEN_SS - SAVE_TIME_KEYS
    assert all(isinstance(value, str) for value in saved.values())


def test_plain_run_values_are_formatted_as_sd_scripts_formats_them(tmp_path):
    config, metadata = _golden_run(tmp_path)
    plan = plan_run(config)
    model = (tmp_path / "model.safetensors").read_bytes()
    expected = {
        "ss_session_id": "1234", "ss_training_started_at": "1700000000.25", "ss_output_name": "mylora",
        "ss_resolution": "(64, 64)", "ss_network_dim": "16", "ss_network_alpha": "8.0", "ss_seed": "42",
        "ss_dataset_dirs": '{"10_sks dog": {"n_repeats": 10, "img_count": 4}}',
        "ss_reg_dataset_dirs": '{"1_dog": {"n_repeats": 1, "img_count": 3}}',
        "ss_tag_frequency": json.dumps({"10_sks dog": TRAIN_TAGS, "1_dog": {"dog": 3}}),
        "ss_optimizer": "torch.optim.adamw.AdamW(weight_decay=0.01,betas=(0.9, 0.999))",
        "ss_v2": "False", "ss_base_model_version": "sd_v1", "ss_enable_bucket": "True", "ss_bucket_no_upscale": "False",
        "ss_min_bucket_reso": "32", "ss_max_bucket_reso": "128", "ss_unet_lr": "None", "ss_text_encoder_lr": "None",
        "ss_clip_skip": "None", "ss_network_dropout": "None", "ss_training_comment": "None",
        "ss_learning_rate": "2e-06", "ss_max_grad_norm": "1.0", "ss_multires_noise_discount": "0.3",
        "ss_caption_dropout_rate": "0.0", "ss_caption_dropout_every_n_epochs": "0", "ss_lr_warmup_steps": "0",
        "ss_lowram": "False", "ss_mixed_precision": "no", "ss_loss_type": "l2", "ss_face_crop_aug_range": "None",
        "ss_num_train_images": "40", "ss_num_reg_images": "3", "ss_num_validation_images": "0",
        "ss_num_epochs": "2", "ss_max_train_steps": str(2 * plan.steps_per_epoch),
        "ss_num_batches_per_epoch": str(plan.batches_per_epoch), "ss_total_batch_size": "1", "ss_keep_tokens": "0",
        "ss_network_module": "networks.lora", "ss_sd_scripts_commit_hash": TRAINER_VERSION,
        "ss_sd_model_name": "model.safetensors", "ss_new_sd_model_hash": hashlib.sha256(model).hexdigest(),
        "ss_sd_model_hash": hashlib.sha256(model[0x100000:0x110000]).hexdigest()[:8],
    }
    assert {key: metadata[key] for key in expected} == expected
    assert "ss_network_args" not in metadata  # only with --network_args


def test_bucket_info_is_the_json_of_used_buckets_with_string_indices(tmp_path):
    folder = make_image_folder(tmp_path / "train", repeats=1, count=2)  # 64x64 and 96x64
    config = _config("--train_data_dir", folder.parent, "--caption_extension", ".txt", "--resolution", "64",
                     "--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "128",
                     "--bucket_reso_steps", "16")
    metadata = training_metadata(config, plan_run(config), session_id=1, training_started_at=TS, optimizer="x.Y")
    # 96x64 (aspect 1.5) goes to the 80x48 bucket, the nearest aspect ratio; 64x64 fits its own.
    error = abs(80 / 48 - 96 / 64) / 2
    assert metadata["ss_bucket_info"] == ('{"buckets": {"0": {"resolution": [64, 64], "count": 1}, '
                                          '"1": {"resolution": [80, 48], "count": 1}}, '
                                          f'"mean_img_ar_error": {error!r}}}')


def test_other_option_values_follow_sd_scripts_parsing(tmp_path):
    _, metadata = _run(tmp_path, "--v2", "--v_parameterization", "--cache_latents_to_disk",
                       "--text_encoder_lr", "1e-5", "2e-5",
                       "--lr_warmup_steps", "0.1", "--train_batch_size", "3", "--gradient_accumulation_steps", "2",
                       "--pretrained_model_name_or_path", "runwayml/stable-diffusion-v1-5", resolution="64,80")
    expected = {
        "ss_resolution": "(64, 80)", "ss_v2": "True", "ss_base_model_version": "sd_v2_v", "ss_cache_latents": "True",
        "ss_text_encoder_lr": "1e-05", "ss_lr_warmup_steps": "0.1",
        "ss_batch_size_per_device": "3", "ss_total_batch_size": "6", "ss_optimizer": "torch.optim.adamw.AdamW",
        # argparse leaves the int default 1 of --network_alpha unconverted
        "ss_network_alpha": "1", "ss_network_dim": "None",
        "ss_enable_bucket": "False", "ss_min_bucket_reso": "None", "ss_max_bucket_reso": "None",
        "ss_bucket_info": "null", "ss_sd_model_name": "runwayml/stable-diffusion-v1-5",
        "ss_network_module": "networks.lora",  # the module that trained when none is named (was "None")
    }
    assert {key: metadata[key] for key in expected} == expected
    assert "ss_sd_model_hash" not in metadata and "ss_new_sd_model_hash" not in metadata  # a hub id has no file
    # prepare_dataset_args makes "2.0,4.0" the tuple (2.0, 4.0) before it is written
    _, metadata = _run(tmp_path / "face", "--face_crop_aug_range", "2.0,4.0")
    assert metadata["ss_face_crop_aug_range"] == "(2.0, 4.0)"


def test_only_an_adapter_run_names_the_default_network_module(tmp_path):
    train, _ = _folders(tmp_path)
    argv = ["--train_data_dir", str(train), "--caption_extension", ".txt", "--resolution", "64"]
    for script, expected in (("network", "networks.lora"), ("db", "None")):  # a checkpoint trained no adapter
        config = resolve(argv, script, OPTIONS)
        metadata = training_metadata(config, plan_run(config), session_id=1, training_started_at=TS, optimizer="x.Y")
        assert metadata["ss_network_module"] == expected, script


@pytest.mark.parametrize("argv, network_args", [
    (["--network_args", "conv_dim=4", "conv_alpha=1"], '{"conv_dim": "4", "conv_alpha": "1", "dropout": null}'),
    (["--network_args", "conv_dim=4", "--network_dropout", "0.1"], '{"conv_dim": "4", "dropout": 0.1}'),
    (["--network_args", "dropout=0.2", "--network_dropout", "0.1"], '{"dropout": "0.2"}'),
    (["--network_args", "algo=lokr", "--dim_from_weights"], '{"algo": "lokr"}'),
    (["--network_args", "preset=a=b"], '{"preset": "a=b", "dropout": null}'),
])
def test_network_args_json_is_what_create_network_receives(tmp_path, argv, network_args):
    _, metadata = _run(tmp_path, *argv)
    assert metadata["ss_network_args"] == network_args


def test_toml_values_keep_their_toml_type(tmp_path):
    (tmp_path / "run.toml").write_text("[net]\nnetwork_alpha = 16\ntext_encoder_lr = 5e-5\n")
    _, metadata = _run(tmp_path, "--config_file", tmp_path / "run.toml")
    assert (metadata["ss_network_alpha"], metadata["ss_text_encoder_lr"]) == ("16", "5e-05")


def test_reg_counts_include_images_balancing_left_out_when_listed(tmp_path):
    train = make_image_folder(tmp_path / "train", repeats=1, class_tokens="sks dog", count=1)
    _, reg = _folders(tmp_path / "other", train_count=1, reg_count=3)  # 1_dog: 3 images captioned "dog"
    config = _config("--train_data_dir", train.parent, "--reg_data_dir", reg, "--caption_extension", ".txt",
                     "--resolution", "64")
    plan = plan_run(config)
    assert len(plan.datasets[0].reg) == 1  # balancing needs one reg image for one train image
    reg_subset = next(s for s in plan.datasets[0].spec.subsets if s.is_reg)
    listed = list_subset_images(reg_subset)[0]

    def metadata(**kwargs):
        return training_metadata(config, plan, session_id=1, training_started_at=TS, optimizer="x.Y", **kwargs)

    full = metadata(listed_reg_images=listed)
    assert full["ss_num_reg_images"] == "3"  # sd-scripts counts every reg image found
    assert full["ss_reg_dataset_dirs"] == '{"1_dog": {"n_repeats": 1, "img_count": 3}}'
    assert json.loads(full["ss_tag_frequency"])["1_dog"] == {"dog": 3}
    assert metadata()["ss_num_reg_images"] == "1"  # without the listing: the balanced entries only


def test_empty_folder_gets_empty_tag_counts_but_no_dir_entry(tmp_path):
    train, _ = _folders(tmp_path)
    (train / "5_empty").mkdir()
    config = _config("--train_data_dir", train, "--caption_extension", ".txt", "--resolution", "64")
    metadata = training_metadata(config, plan_run(config), session_id=1, training_started_at=TS, optimizer="x.Y")
    assert json.loads(metadata["ss_tag_frequency"]) == {"10_sks dog": TRAIN_TAGS, "5_empty": {}}
    assert json.loads(metadata["ss_dataset_dirs"]) == {"10_sks dog": {"n_repeats": 10, "img_count": 4}}


def test_fine_tuning_run_lists_the_metadata_file_and_counts_its_tags(tmp_path):
    folder = make_image_folder(tmp_path / "images", count=2)
    meta = tmp_path / "meta_cap.json"
    meta.write_text(json.dumps({"img000.png": {"caption": "a photo", "tags": "Red, blue"},
                                "img001.png": {"caption": "a dog", "tags": "red"}}))
    config = _config("--in_json", meta, "--train_data_dir", folder, "--resolution", "64", "--dataset_repeats", "3")
    metadata = training_metadata(config, plan_run(config), session_id=1, training_started_at=TS, optimizer="x.Y")
    assert metadata["ss_dataset_dirs"] == '{"meta_cap.json": {"n_repeats": 3, "img_count": 2}}'
    assert metadata["ss_reg_dataset_dirs"] == "{}"
    assert metadata["ss_tag_frequency"] == '{"meta_cap.json": {"red": 2, "blue": 1}}'
    assert metadata["ss_num_train_images"] == "6"


# ---- --dataset_config

def _dataset_config_run(tmp_path):
    train, reg = _folders(tmp_path)
    toml = f"""[general]
caption_extension = ".txt"

[[datasets]]
resolution = 64
batch_size = 2
  [[datasets.subsets]]
  image_dir = '{train / "10_sks dog"}'
  num_repeats = 10
  class_tokens = 'sks dog'
  [[datasets.subsets]]
  image_dir = '{reg / "1_dog"}'
  is_reg = true
  class_tokens = 'dog'

[[datasets]]
resolution = [64, 64]
enable_bucket = true
min_bucket_reso = 32
max_bucket_reso = 128
bucket_reso_steps = 16
  [[datasets.subsets]]
  image_dir = '{train / "10_sks dog"}'
  num_repeats = 2
  flip_aug = true
"""
    (tmp_path / "datasets.toml").write_text(toml)
    config = _config("--dataset_config", tmp_path / "datasets.toml", "--network_module", "networks.lora")
    plan = plan_run(config)
    return plan, training_metadata(config, plan, session_id=1, training_started_at=TS, optimizer="x.Y")


def test_dataset_config_run_writes_ss_datasets_instead_of_the_folder_keys(tmp_path):
    _, metadata = _dataset_config_run(tmp_path)
    golden_without_model = GOLDEN_SS - SAVE_TIME_KEYS - {"ss_sd_model_hash", "ss_new_sd_model_hash", "ss_sd_model_name"}
    assert set(metadata) == golden_without_model - FOLDER_ONLY_KEYS | {"ss_datasets"}


def test_ss_datasets_describes_every_dataset_and_subset(tmp_path):
    plan, metadata = _dataset_config_run(tmp_path)
    assert metadata["ss_datasets"].startswith('[{"is_dreambooth": true, "batch_size_per_device": 2, ')
    first, second = json.loads(metadata["ss_datasets"])
    common = {"color_aug": False, "random_crop": False, "shuffle_caption": False, "keep_tokens": 0,
              "keep_tokens_separator": "", "secondary_separator": None, "enable_wildcard": False,
              "caption_prefix": None, "caption_suffix": None, "resize_interpolation": None}
    assert first == {
        "is_dreambooth": True, "batch_size_per_device": 2, "num_train_images": 40, "num_reg_images": 3,
        "resolution": [64, 64], "enable_bucket": False, "min_bucket_reso": None, "max_bucket_reso": None,
        "tag_frequency": {"10_sks dog": TRAIN_TAGS, "1_dog": {"dog": 3}}, "bucket_info": None,
        "resize_interpolation": None,
        "subsets": [
            {"img_count": 4, "num_repeats": 10, "flip_aug": False, **common, "image_dir": "10_sks dog",
             "class_tokens": "sks dog", "is_reg": False},
            {"img_count": 3, "num_repeats": 1, "flip_aug": False, **common, "image_dir": "1_dog",
             "class_tokens": "dog", "is_reg": True},
        ],
    }
    # No class tokens here, so the image without a caption file adds no tag.
    assert second["tag_frequency"] == {"10_sks dog": {"sks dog": 3, "red": 2, "photo": 2, "blue": 1}}
    assert (second["num_train_images"], second["enable_bucket"], second["min_bucket_reso"]) == (8, True, 32)
    assert second["bucket_info"] == json.loads(json.dumps(plan.datasets[1].assignment.bucket_info()))
    assert second["subsets"] == [{"img_count": 4, "num_repeats": 2, "flip_aug": True, **common,
                                  "image_dir": "10_sks dog", "class_tokens": None, "is_reg": False}]


def test_dataset_config_summaries_merge_datasets(tmp_path):
    _, metadata = _dataset_config_run(tmp_path)
    # reg folders are left out; a folder used twice gets " (2)"; tags of a folder count from its first dataset.
    assert metadata["ss_dataset_dirs"] == ('{"10_sks dog": {"n_repeats": 10, "img_count": 4}, '
                                           '"10_sks dog (2)": {"n_repeats": 2, "img_count": 4}}')
    assert json.loads(metadata["ss_tag_frequency"]) == {"10_sks dog": TRAIN_TAGS, "1_dog": {"dog": 3}}


# ---- per save and --no_metadata

def test_save_time_keys_and_no_metadata(tmp_path):
    _, metadata = _run(tmp_path, "--network_module", "networks.lora", "--network_dim", "4",
                       "--network_args", "conv_dim=4")
    spec = network_modelspec(family_named("sd1"), v_parameterization=False, timestamp=TS, title="mylora")
    saved = save_time_metadata(metadata, steps=120, epoch=3, finished_at=TS + 60)
    assert (saved["ss_steps"], saved["ss_epoch"], saved["ss_training_finished_at"]) == ("120", "3", "1700000060.25")
    assert "ss_steps" not in metadata  # a new dict: the start-of-run metadata is unchanged

    minimal = minimal_metadata(saved | spec | {"sshs_model_hash": "stale"})
    assert set(minimal) == set(MINIMUM_KEYS) | set(spec)
    assert MINIMUM_KEYS == ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim",
                            "ss_network_alpha", "ss_network_args")
    assert {key: minimal[key] for key in MINIMUM_KEYS} == {key: metadata[key] for key in MINIMUM_KEYS}

    full = saved_metadata(metadata, steps=120, epoch=3, finished_at=TS + 60, modelspec=spec)
    assert full == saved | spec
    assert saved_metadata(metadata, steps=120, epoch=3, finished_at=TS + 60, modelspec=spec,
                          no_metadata=True) == minimal_metadata(saved) | spec


# ---- hashes

def _tensors(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {"lora_unet_x.lora_down.weight": torch.randn(400, 1000, generator=generator),  # 1.6 MB
            "lora_unet_x.alpha": torch.tensor(8.0)}


def test_model_hashes_match_an_independent_computation_and_the_saved_file(tmp_path):
    tensors = _tensors()
    metadata = {"ss_network_dim": "16", "ss_output_name": "mylora", "modelspec.title": "mylora"}
    data = safetensors.torch.save(tensors, {"ss_network_dim": "16", "ss_output_name": "mylora"})
    header_end = 8 + int.from_bytes(data[:8], "little")
    expected = (hashlib.sha256(data[header_end:]).hexdigest(),
                hashlib.sha256(data[0x100000:0x100000 + 0x10000]).hexdigest()[:8])
    assert model_hashes(tensors, metadata) == expected
    # The model hash is what a reader computes from the written file, whatever else its header holds.
    safetensors.torch.save_file(tensors, str(tmp_path / "lora.safetensors"), metadata=metadata | {"x": "y"})
    written = (tmp_path / "lora.safetensors").read_bytes()
    assert hashlib.sha256(written[8 + int.from_bytes(written[:8], "little"):]).hexdigest() == expected[0]


def test_only_ss_metadata_and_tensors_change_the_hashes():
    tensors, metadata = _tensors(), {"ss_network_dim": "16"}
    hashes = model_hashes(tensors, metadata)
    assert model_hashes(tensors, metadata | {"modelspec.title": "renamed", "sshs_model_hash": "x"}) == hashes
    changed = dict(tensors, **{"lora_unet_x.lora_down.weight": tensors["lora_unet_x.lora_down.weight"] * 2})
    assert model_hashes(changed, metadata)[0] != hashes[0] and model_hashes(changed, metadata)[1] != hashes[1]
    # An ss_* key moves the tensor bytes in the file: the legacy hash (file offset 1 MiB) changes, the model hash not.
    longer = model_hashes(tensors, metadata | {"ss_training_comment": "x" * 100})
    assert longer[0] == hashes[0] and longer[1] != hashes[1]


def test_legacy_hash_of_a_file_under_one_mib_is_the_hash_of_nothing():
    assert model_hashes({"a": torch.zeros(4)}, None)[1] == hashlib.sha256(b"").hexdigest()[:8] == "e3b0c442"


def test_file_hashes(tmp_path):
    model = _model_file(tmp_path)
    data = model.read_bytes()
    assert file_hashes(model) == (hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8],
                                  hashlib.sha256(data).hexdigest())
    assert file_hashes(tmp_path) == ("IsADirectory", "IsADirectory")
    assert file_hashes(tmp_path / "missing.safetensors") is None and file_hashes(None) is None


# ---- modelspec.*

@pytest.fixture
def utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_modelspec_of_a_plain_run_has_the_golden_keys_and_values(tmp_path, utc):
    config, _ = _run(tmp_path)
    spec = modelspec_from_config(config, timestamp=TS)
    assert set(spec) == GOLDEN_MODELSPEC
    assert spec == {
        "modelspec.architecture": "stable-diffusion-v1/lora", "modelspec.implementation": "diffusers",
        "modelspec.title": "mylora", "modelspec.resolution": "64x64", "modelspec.date": "2023-11-14T22:13:20",
        "modelspec.sai_model_spec": "1.0.1", "modelspec.prediction_type": "epsilon",
        "modelspec.implementation_version": TRAINER_VERSION,
    }


@pytest.mark.parametrize("v2, v_parameterization, architecture, prediction, resolution", [
    (False, False, "stable-diffusion-v1/lora", "epsilon", "512x512"),
    (True, False, "stable-diffusion-v2-512/lora", "epsilon", "512x512"),
    (True, True, "stable-diffusion-v2-768-v/lora", "v", "768x768"),
])
def test_modelspec_architecture_and_default_resolution(v2, v_parameterization, architecture, prediction, resolution):
    spec = network_modelspec(family_named("sd2" if v2 else "sd1"), v_parameterization=v_parameterization,
                             timestamp=TS, title="t")
    assert (spec["modelspec.architecture"], spec["modelspec.prediction_type"],
            spec["modelspec.resolution"]) == (architecture, prediction, resolution)


def test_modelspec_optional_fields_from_options(tmp_path):
    thumbnail = tmp_path / "thumb.png"
    thumbnail.write_bytes(b"\x89PNG fake")
    config = _config("--resolution", "512,768", "--min_timestep", "100", "--clip_skip", "2",
                     "--metadata_author", "me", "--metadata_usage_hint", "say sks", "--metadata_thumbnail", thumbnail)
    spec = modelspec_from_config(config, timestamp=TS)
    assert spec["modelspec.title"] == "LoRA@1700000000.25"  # neither --metadata_title nor --output_name
    assert spec["modelspec.resolution"] == "512x768"
    assert (spec["modelspec.timestep_range"], spec["modelspec.encoder_layer"]) == ("100,1000", "2")
    assert (spec["modelspec.author"], spec["modelspec.usage_hint"]) == ("me", "say sks")
    assert spec["modelspec.thumbnail"] == "data:image/png;base64,iVBORyBmYWtl"
    assert "modelspec.description" not in spec and "modelspec.license" not in spec
    assert modelspec_from_config(config.replace(metadata_title="Mine"), timestamp=TS)["modelspec.title"] == "Mine"
    with pytest.raises(UserError, match="metadata_thumbnail"):
        modelspec_from_config(config.replace(metadata_thumbnail=str(tmp_path / "none.png")), timestamp=TS)
