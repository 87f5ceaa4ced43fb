"""sd-scripts' LoRA file metadata — `ss_*` training keys, `sshs_*` hashes, `modelspec.*` keys — as string dicts."""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import mimetypes
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import safetensors.torch

from library.config.options import NETWORK
from library.data.bucketing import adjust_bucket_reso_range
from library.data.captions import tag_frequency
from library.errors import UserError
from library.formats.modelspec import MODELSPEC_VERSION, TRAINER_VERSION
from library.models.family import ModelFamily, family_from_flags
from networks.args import DEFAULT_NETWORK_MODULE

if TYPE_CHECKING:
    import torch

    from library.data.plan import DatasetPlan, RunPlan
    from library.data.specs import DatasetSpec, SubsetSpec
    from library.data.subsets import ImageEntry

# sd-scripts writes its git commit here ("(unknown)" outside a checkout); we have no commit to offer, so our version.
# train_util.SS_METADATA_MINIMUM_KEYS, in its order: all that --no_metadata keeps of the ss_* keys.
MINIMUM_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                "ss_network_args")
# A1111's legacy hash: sha256 of the 64 KiB at offset 1 MiB, first 8 hex digits.
LEGACY_HASH_OFFSET, LEGACY_HASH_LENGTH = 0x100000, 0x10000
# Float options whose sd-scripts argparse default is an int literal (argparse does not convert defaults):
# left unset they are written "1", not "1.0".
_ARGPARSE_INT_DEFAULTS = {"network_alpha": 1}
# The metadata_* options get_sai_model_spec passes as named fields; every other metadata_* becomes an extra key.
_MODELSPEC_NAMED = ("title", "author", "description", "license", "tags")


# ---- ss_* training metadata -------------------------------------------------------------------------------------

@dataclass
class _DatasetRecord:
    """One dataset as sd-scripts' metadata sees it: the subsets it registered, with their image counts."""

    plan: "DatasetPlan"
    subsets: list  # [(SubsetSpec, img_count)]
    tag_frequency: dict[str, dict[str, int]]
    num_train_images: int  # with repeats
    num_reg_images: int  # with repeats, before balancing


def training_metadata(config: Mapping[str, Any], plan: "RunPlan", *, session_id: int, training_started_at: float,
                      optimizer: type | str, optimizer_kwargs: Mapping[str, Any] | None = None,
                      sd_model_hashes: tuple[str, str] | None = None, vae_hashes: tuple[str, str] | None = None,
                      listed_reg_images: Sequence["ImageEntry"] | None = None, num_validation_images: int = 0,
                      commit_hash: str = TRAINER_VERSION, family: "ModelFamily | None" = None) -> dict[str, str]:
    """The `ss_*` keys train_network.py writes into every LoRA of a run, built once when training starts.

    `config` holds what the run really uses: the resolved seed (sd-scripts draws one when --seed is unset) and the
    detected v_parameterization; `family` is the loaded model's (None: the one the flags imply, e.g. --v2).
    `session_id` is sd-scripts' `random.randint(0, 2**32)`, `training_started_at` a `time.time()`. `optimizer` is
    the optimizer class (or its dotted name) and `optimizer_kwargs` the keyword arguments given to it from
    --optimizer_args. `sd_model_hashes` / `vae_hashes` are `file_hashes(path)` of
    --pretrained_model_name_or_path / --vae (None for a hub id). `listed_reg_images`: every image the reg subsets
    list, before balancing — sd-scripts counts them all; without it the plan's balanced reg entries are counted,
    which leaves out reg images balancing did not need. The save-time keys come from `save_time_metadata`.
    """
    records = [_dataset_record(dataset, listed_reg_images) for dataset in plan.datasets]
    values = _run_keys(config, plan, records, session_id=session_id, training_started_at=training_started_at,
                       num_validation_images=num_validation_images, family=family or family_from_flags(config))
    values["ss_sd_scripts_commit_hash"] = commit_hash
    values["ss_optimizer"] = optimizer_description(optimizer, optimizer_kwargs)
    values |= _loss_keys(config)
    values |= _datasets_keys(records) if config.get("dataset_config") else _folder_keys(config, records)
    if config.get("network_args"):
        values["ss_network_args"] = json.dumps(network_kwargs(config))
    values |= _model_file_keys(config, sd_model_hashes, vae_hashes)
    # safetensors metadata is str -> str; sd-scripts converts with str(), so None is "None" and True "True".
    return {key: str(value) for key, value in values.items()}


def _run_keys(config: Mapping[str, Any], plan: "RunPlan", records: list[_DatasetRecord], *, session_id: int,
              training_started_at: float, num_validation_images: int, family: "ModelFamily") -> dict[str, Any]:
    model_keys = family.ss_keys(bool(config.get("v_parameterization")))
    return {
        "ss_session_id": session_id,
        "ss_training_started_at": training_started_at,
        "ss_output_name": config.get("output_name"),
        "ss_learning_rate": config.get("learning_rate"),
        "ss_text_encoder_lr": _text_encoder_lr(config.get("text_encoder_lr")),
        "ss_unet_lr": config.get("unet_lr"),
        "ss_num_train_images": sum(record.num_train_images for record in records),
        "ss_num_validation_images": num_validation_images,
        "ss_num_reg_images": sum(record.num_reg_images for record in records),
        "ss_num_batches_per_epoch": plan.batches_per_epoch,  # len(train_dataloader) on one process
        "ss_num_epochs": plan.epochs,
        "ss_gradient_checkpointing": config.get("gradient_checkpointing"),
        "ss_gradient_accumulation_steps": config.get("gradient_accumulation_steps"),
        "ss_max_train_steps": plan.total_steps,
        "ss_lr_warmup_steps": config.get("lr_warmup_steps"),
        "ss_lr_scheduler": config.get("lr_scheduler"),
        # An adapter's module (networks.lora when none was named: loaders read it); "None" for other trainers.
        "ss_network_module": config.get("network_module") or (DEFAULT_NETWORK_MODULE if config.script == NETWORK
                                                              else None),
        "ss_network_dim": config.get("network_dim"),
        "ss_network_alpha": _as_sd_scripts_parsed(config, "network_alpha"),
        "ss_network_dropout": config.get("network_dropout"),
        "ss_mixed_precision": config.get("mixed_precision"),
        "ss_full_fp16": bool(config.get("full_fp16")),
        **model_keys,  # ss_v2, ss_base_model_version
        "ss_clip_skip": config.get("clip_skip"),
        "ss_max_token_length": config.get("max_token_length"),
        # verify_training_args turns cache_latents on when cache_latents_to_disk is given.
        "ss_cache_latents": bool(config.get("cache_latents") or config.get("cache_latents_to_disk")),
        "ss_seed": config.get("seed"),
        "ss_lowram": config.get("lowram"),
        "ss_training_comment": config.get("training_comment"),
    }


def _loss_keys(config: Mapping[str, Any]) -> dict[str, Any]:
    get = config.get
    return {
        "ss_noise_offset": get("noise_offset"),
        "ss_multires_noise_iterations": get("multires_noise_iterations"),
        "ss_multires_noise_discount": get("multires_noise_discount"),
        "ss_adaptive_noise_scale": get("adaptive_noise_scale"),
        "ss_zero_terminal_snr": get("zero_terminal_snr"),
        "ss_max_grad_norm": get("max_grad_norm"),
        "ss_caption_dropout_rate": get("caption_dropout_rate"),
        "ss_caption_dropout_every_n_epochs": get("caption_dropout_every_n_epochs"),
        "ss_caption_tag_dropout_rate": get("caption_tag_dropout_rate"),
        # prepare_dataset_args turns "2.0,4.0" into the tuple (2.0, 4.0) before it is written.
        "ss_face_crop_aug_range": _number_tuple(get("face_crop_aug_range"), float),
        "ss_prior_loss_weight": get("prior_loss_weight"),
        "ss_min_snr_gamma": get("min_snr_gamma"),
        "ss_scale_weight_norms": get("scale_weight_norms"),
        "ss_ip_noise_gamma": get("ip_noise_gamma"),
        "ss_debiased_estimation": bool(get("debiased_estimation_loss")),
        "ss_noise_offset_random_strength": get("noise_offset_random_strength"),
        "ss_ip_noise_gamma_random_strength": get("ip_noise_gamma_random_strength"),
        "ss_loss_type": get("loss_type"),
        "ss_huber_schedule": get("huber_schedule"),
        "ss_huber_scale": get("huber_scale"),
        "ss_huber_c": get("huber_c"),
        "ss_fp8_base": bool(get("fp8_base")),
        "ss_fp8_base_unet": bool(get("fp8_base_unet")),
        "ss_validation_seed": get("validation_seed"),
        "ss_validation_split": get("validation_split"),
        "ss_max_validation_steps": get("max_validation_steps"),
        "ss_validate_every_n_epochs": get("validate_every_n_epochs"),
        "ss_validate_every_n_steps": get("validate_every_n_steps"),
        "ss_resize_interpolation": get("resize_interpolation"),
    }


def _folder_keys(config: Mapping[str, Any], records: list[_DatasetRecord]) -> dict[str, Any]:
    """The keys written without --dataset_config (one dataset from --train_data_dir/--reg_data_dir or --in_json)."""
    if len(records) != 1:
        raise ValueError(f"a run without --dataset_config has one dataset, got {len(records)}")
    record = records[0]
    spec = record.plan.spec
    dirs: dict[str, dict] = {}
    reg_dirs: dict[str, dict] = {}
    for subset, count in record.subsets:
        # A later folder with the same name overwrites the earlier one, as in sd-scripts.
        (reg_dirs if subset.is_reg else dirs)[_subset_name(subset)] = {"n_repeats": subset.num_repeats,
                                                                        "img_count": count}
    min_reso, max_reso = _bucket_reso_range(spec)
    batch_size = config.get("train_batch_size")
    return {
        "ss_batch_size_per_device": batch_size,
        "ss_total_batch_size": batch_size * (config.get("gradient_accumulation_steps") or 1),  # one process
        "ss_resolution": _number_tuple(config.get("resolution"), int, square=True),
        "ss_color_aug": bool(config.get("color_aug")),
        "ss_flip_aug": bool(config.get("flip_aug")),
        "ss_random_crop": bool(config.get("random_crop")),
        "ss_shuffle_caption": bool(config.get("shuffle_caption")),
        "ss_enable_bucket": bool(spec.enable_bucket),
        "ss_bucket_no_upscale": bool(spec.enable_bucket and spec.bucket_no_upscale),
        "ss_min_bucket_reso": min_reso,
        "ss_max_bucket_reso": max_reso,
        "ss_keep_tokens": config.get("keep_tokens"),
        "ss_dataset_dirs": json.dumps(dirs),
        "ss_reg_dataset_dirs": json.dumps(reg_dirs),
        "ss_tag_frequency": json.dumps(record.tag_frequency),
        "ss_bucket_info": json.dumps(_bucket_info(record.plan)),
    }


def _datasets_keys(records: list[_DatasetRecord]) -> dict[str, str]:
    """The keys written with --dataset_config: every dataset and subset in `ss_datasets`, plus merged summaries."""
    datasets, frequency, dirs = [], {}, {}
    for record in records:
        datasets.append(_dataset_entry(record))
        for subset, count in record.subsets:
            name = None if subset.is_reg else _subset_name(subset)  # reg folders are not listed
            if name is not None:
                unique, n = name, 2
                while unique in dirs:  # a folder used by several datasets: "name (2)", "name (3)", ...
                    unique, n = f"{name} ({n})", n + 1
                dirs[unique] = {"n_repeats": subset.num_repeats, "img_count": count}
        for name, counts in record.tag_frequency.items():
            frequency.setdefault(name, counts)  # a folder in several datasets is counted once
    return {"ss_datasets": json.dumps(datasets), "ss_tag_frequency": json.dumps(frequency),
            "ss_dataset_dirs": json.dumps(dirs)}


def _dataset_entry(record: _DatasetRecord) -> dict[str, Any]:
    spec = record.plan.spec
    min_reso, max_reso = _bucket_reso_range(spec)
    return {
        "is_dreambooth": not spec.is_fine_tuning,
        "batch_size_per_device": spec.batch_size,
        "num_train_images": record.num_train_images,
        "num_reg_images": record.num_reg_images,
        "resolution": list(spec.resolution),
        "enable_bucket": bool(spec.enable_bucket),
        "min_bucket_reso": min_reso,
        "max_bucket_reso": max_reso,
        "tag_frequency": record.tag_frequency,
        "bucket_info": _bucket_info(record.plan),
        "resize_interpolation": spec.resize_interpolation,
        "subsets": [_subset_entry(subset, count, not spec.is_fine_tuning) for subset, count in record.subsets],
    }


def _subset_entry(subset: "SubsetSpec", count: int, is_dreambooth: bool) -> dict[str, Any]:
    entry = {
        "img_count": count,
        "num_repeats": subset.num_repeats,
        "color_aug": bool(subset.color_aug),
        "flip_aug": bool(subset.flip_aug),
        "random_crop": bool(subset.random_crop),
        "shuffle_caption": bool(subset.shuffle_caption),
        "keep_tokens": subset.keep_tokens,
        "keep_tokens_separator": subset.keep_tokens_separator,
        "secondary_separator": subset.secondary_separator,
        "enable_wildcard": bool(subset.enable_wildcard),
        "caption_prefix": subset.caption_prefix,
        "caption_suffix": subset.caption_suffix,
        "resize_interpolation": subset.resize_interpolation,
    }
    if subset.image_dir:
        entry["image_dir"] = os.path.basename(subset.image_dir)
    if is_dreambooth:
        entry["class_tokens"] = subset.class_tokens
        entry["is_reg"] = subset.is_reg
    else:
        entry["metadata_file"] = os.path.basename(subset.metadata_file)
    return entry


def _dataset_record(dataset: "DatasetPlan", listed_reg: Sequence["ImageEntry"] | None) -> _DatasetRecord:
    """Which subsets sd-scripts registers, how many images each lists, and the tag counts it records."""
    reg_entries = dataset.reg if listed_reg is None else list(listed_reg)
    subsets, frequency, totals = [], {}, {False: 0, True: 0}
    for subset in dataset.spec.subsets:
        if subset.num_repeats < 1:
            continue  # skipped before its folder is read: no tag counts either
        entries = [e for e in (reg_entries if subset.is_reg else dataset.train) if e.subset is subset]
        if subset.is_fine_tuning:
            if not entries:
                continue
            _add_tag_counts(frequency, _subset_name(subset), [e.tags for e in entries if e.tags is not None])
        else:
            # The folder's captions are counted before its image count is checked: an empty folder gets {}.
            _add_tag_counts(frequency, _subset_name(subset), [e.caption for e in entries])
            if not entries:
                continue
        subsets.append((subset, len(entries)))
        totals[subset.is_reg] += subset.num_repeats * len(entries)
    return _DatasetRecord(dataset, subsets, frequency, totals[False], totals[True])


def _add_tag_counts(frequency: dict[str, dict[str, int]], name: str, captions: Iterable[str]) -> None:
    counts = frequency.setdefault(name, {})
    # set_tag_frequency always splits on ",", whatever caption_separator is.
    for tag, n in tag_frequency(captions).items():
        counts[tag] = counts.get(tag, 0) + n


def _subset_name(subset: "SubsetSpec") -> str:
    return os.path.basename(subset.metadata_file if subset.is_fine_tuning else subset.image_dir)


def _bucket_info(dataset: "DatasetPlan") -> dict | None:
    # sd-scripts fills bucket_info only when bucketing is on; otherwise it stays None and is written "null".
    return dataset.assignment.bucket_info() if dataset.spec.enable_bucket else None


def _bucket_reso_range(spec: "DatasetSpec") -> tuple[int | None, int | None]:
    if not spec.enable_bucket:
        return None, None  # the dataset keeps None without bucketing
    return adjust_bucket_reso_range(spec.resolution, spec.min_bucket_reso, spec.max_bucket_reso,
                                    spec.bucket_reso_steps)


def network_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """--network_args as train_network.py hands them to create_network (and writes them to ss_network_args)."""
    kwargs: dict[str, Any] = {}
    for item in config.get("network_args") or ():
        key, sep, value = str(item).partition("=")
        if not sep:
            raise UserError(f"--network_args {item!r}: write key=value, e.g. conv_dim=4")
        kwargs[key] = value  # split at the first "=", nothing stripped, as sd-scripts does
    if not config.get("dim_from_weights") and "dropout" not in kwargs:
        kwargs["dropout"] = config.get("network_dropout")  # sd-scripts' LyCORIS workaround, null when unset
    return kwargs


def optimizer_description(optimizer: type | str, kwargs: Mapping[str, Any] | None = None) -> str:
    """ss_optimizer: `module.Class(k=v,k=v)`, or `module.Class` without keyword arguments (get_optimizer's format)."""
    name = optimizer if isinstance(optimizer, str) else f"{optimizer.__module__}.{optimizer.__name__}"
    arguments = ",".join(f"{key}={value}" for key, value in (kwargs or {}).items())
    return name + (f"({arguments})" if arguments else "")


def _model_file_keys(config: Mapping[str, Any], sd_model_hashes: tuple[str, str] | None,
                     vae_hashes: tuple[str, str] | None) -> dict[str, str]:
    values: dict[str, str] = {}
    for option, prefix, hashes in (("pretrained_model_name_or_path", "sd_model", sd_model_hashes),
                                   ("vae", "vae", vae_hashes)):
        name = config.get(option)
        if name is None:
            continue
        if hashes is not None:
            # A local file or folder: its hashes and only its base name (no local paths in shared files).
            values[f"ss_{prefix}_hash"], values[f"ss_new_{prefix}_hash"] = hashes
            name = os.path.basename(name)
        values[f"ss_{prefix}_name"] = name
    return values


def _text_encoder_lr(value: Any) -> Any:
    # networks.lora takes one text-encoder lr: the first of --text_encoder_lr's list (a TOML scalar as is).
    if isinstance(value, (list, tuple)):
        return value[0] if value else None
    return value


def _number_tuple(value: Any, kind: type, *, square: bool = False) -> tuple | None:
    """prepare_dataset_args' parsing of "512" / "512,768" (square: one size means width = height)."""
    if value is None:
        return None
    numbers = tuple(kind(part) for part in str(value).split(","))
    return numbers * 2 if square and len(numbers) == 1 else numbers


def _as_sd_scripts_parsed(config: Mapping[str, Any], name: str) -> Any:
    value = config.get(name)
    literal = _ARGPARSE_INT_DEFAULTS[name]
    is_set = config.is_set(name) if hasattr(config, "is_set") else value != literal
    return literal if not is_set and value == literal else value


# ---- per save: time keys and --no_metadata ----------------------------------------------------------------------

def save_time_metadata(metadata: Mapping[str, str], *, steps: int, epoch: int, finished_at: float) -> dict[str, str]:
    """`metadata` plus the keys train_network.py's save_model sets before each save (a new dict)."""
    return {**metadata, "ss_training_finished_at": str(finished_at), "ss_steps": str(steps), "ss_epoch": str(epoch)}


def minimal_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """What --no_metadata keeps: the MINIMUM_KEYS present, plus any `modelspec.*` keys (written in either case).

    `sshs_*` hashes are dropped: they cover the ss_* keys of the file, so they are computed again at save.
    """
    kept = {key: metadata[key] for key in MINIMUM_KEYS if key in metadata}
    return kept | {key: value for key, value in metadata.items() if key.startswith("modelspec.")}


def saved_metadata(training: Mapping[str, str], *, steps: int, epoch: int, finished_at: float,
                   modelspec: Mapping[str, str], no_metadata: bool = False) -> dict[str, str]:
    """The metadata of one saved LoRA before its sshs_* hashes (which `model_hashes` adds over these keys)."""
    metadata = save_time_metadata(training, steps=steps, epoch=epoch, finished_at=finished_at)
    return (minimal_metadata(metadata) if no_metadata else metadata) | dict(modelspec)


# ---- hashes -----------------------------------------------------------------------------------------------------

def model_hashes(tensors: dict[str, "torch.Tensor"], metadata: Mapping[str, str] | None) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as train_util.precalculate_safetensors_hashes computes them.

    The tensors are serialised with only the `ss_*` metadata (user-editable keys must not change the hash);
    the model hash covers the bytes after the header, the legacy hash the 64 KiB at 1 MiB of the whole file
    (sha256 of nothing, "e3b0c442", for a file shorter than 1 MiB).
    """
    kept = {key: value for key, value in (metadata or {}).items() if key.startswith("ss_")}
    data = safetensors.torch.save(tensors, kept)
    header_length = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_length:]).hexdigest()
    legacy = hashlib.sha256(data[LEGACY_HASH_OFFSET:LEGACY_HASH_OFFSET + LEGACY_HASH_LENGTH]).hexdigest()[:8]
    return model_hash, legacy


def file_hashes(path: str | os.PathLike | None) -> tuple[str, str] | None:
    """(ss_sd_model_hash, ss_new_sd_model_hash) of a base model or VAE as train_util.model_hash / calculate_sha256.

    None when `path` does not exist (a hub id: sd-scripts writes no hashes then); a diffusers folder gives
    "IsADirectory" for both, as sd-scripts' error fallback writes.
    """
    if path is None or not os.path.exists(path):
        return None
    if os.path.isdir(path):
        return "IsADirectory", "IsADirectory"
    with open(path, "rb") as handle:
        handle.seek(LEGACY_HASH_OFFSET)
        legacy = hashlib.sha256(handle.read(LEGACY_HASH_LENGTH)).hexdigest()[:8]
        handle.seek(0)
        full = hashlib.file_digest(handle, "sha256").hexdigest()
    return legacy, full


# ---- modelspec.* ------------------------------------------------------------------------------------------------

def network_modelspec(family: "ModelFamily", *, v_parameterization: bool, timestamp: float, title: str | None = None,
                      resolution: Any = None, author: str | None = None, description: str | None = None,
                      license: str | None = None, tags: str | None = None, timesteps: tuple[int, int] | None = None,
                      clip_skip: int | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The `modelspec.*` keys sd-scripts writes into a SD 1.x/2.x LoRA (sai_model_spec.build_metadata, lora=True).

    `timestamp` is the save time (`time.time()`): the title falls back to "LoRA@<timestamp>" and the date is its
    local time to the second. `resolution` is "512" / "512,768" / an int / (width, height); None means 512x512
    (the family's default: 768x768 for SD 2.x with v-parameterization). `extra` holds further fields by name
    (usage_hint, thumbnail, ...).
    """
    spec = {
        "modelspec.architecture": family.modelspec_architecture(v_parameterization, "lora"),
        "modelspec.implementation": family.lora_modelspec_implementation,  # sd-scripts: diffusers, SGM URL for SDXL
        "modelspec.title": title if title is not None else f"LoRA@{timestamp}",
        "modelspec.resolution": _modelspec_resolution(resolution, family.default_resolution(v_parameterization)),
        "modelspec.date": datetime.datetime.fromtimestamp(int(timestamp)).isoformat(),
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.prediction_type": "v" if v_parameterization else "epsilon",
    }
    optional = {"description": description, "author": author, "license": license, "tags": tags,
                "timestep_range": None if timesteps is None else f"{timesteps[0]},{timesteps[1]}",
                "encoder_layer": None if clip_skip is None else str(clip_skip), **(extra or {})}
    spec |= {key if key.startswith("modelspec.") else f"modelspec.{key}": value
             for key, value in optional.items() if value is not None}
    spec.setdefault("modelspec.implementation_version", TRAINER_VERSION)  # sd-scripts: "sd-scripts/<commit>"
    return spec


def modelspec_from_config(config: Mapping[str, Any], *, timestamp: float,
                          family: "ModelFamily | None" = None) -> dict[str, str]:
    """network_modelspec filled from the run's options, as train_util.get_sai_model_spec reads them.

    Title: --metadata_title, else --output_name. Timestep range: only when --min_timestep or --max_timestep is
    given (0 and 1000 fill the other). A --metadata_thumbnail file is embedded as a data: URL.
    """
    minimum, maximum = config.get("min_timestep"), config.get("max_timestep")
    timesteps = None
    if minimum is not None or maximum is not None:
        timesteps = (0 if minimum is None else minimum, 1000 if maximum is None else maximum)
    extra = {name[len("metadata_"):]: value for name, value in sorted(config.items())
             if name.startswith("metadata_") and value is not None and name[len("metadata_"):] not in _MODELSPEC_NAMED}
    if "thumbnail" in extra:
        extra["thumbnail"] = _thumbnail_url(extra["thumbnail"])
    title = config.get("metadata_title")
    return network_modelspec(
        family or family_from_flags(config), v_parameterization=bool(config.get("v_parameterization")),
        timestamp=timestamp,
        title=title if title is not None else config.get("output_name"), resolution=config.get("resolution"),
        author=config.get("metadata_author"), description=config.get("metadata_description"),
        license=config.get("metadata_license"), tags=config.get("metadata_tags"), timesteps=timesteps,
        clip_skip=config.get("clip_skip"), extra=extra)


def _modelspec_resolution(resolution: Any, default_side: int) -> str:
    if resolution is None:
        width, height = default_side, default_side
    elif isinstance(resolution, (tuple, list)):
        width, height = (resolution[0], resolution[-1])
    else:
        width, height = _number_tuple(resolution, int, square=True)
    return f"{width}x{height}"


def _thumbnail_url(value: str) -> str:
    if not value or value.startswith("data:"):
        return value
    path = Path(value)
    if not path.is_file():
        # sd-scripts drops the thumbnail with a warning; a flag the user gave should not vanish silently.
        raise UserError(f"--metadata_thumbnail '{value}' is not a file: give an image file or a data: URL")
    mime = mimetypes.guess_type(value)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"
