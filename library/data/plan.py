"""The plan of a run — datasets, images, buckets, steps and every problem found — built without loading any weights."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping

from library.config.dataset_config import DatasetSupport, dataset_specs_from_dirs, load_dataset_config
from library.data.bucketing import BucketAssignment, Buckets, assign_buckets, make_buckets, rounding_notes
from library.data.cache_rules import check_cache_options
from library.data.images import CorruptImageError, image_size, verify_image
from library.data.specs import DatasetSpec
from library.data.subsets import ImageEntry, balance_regularisation, list_subset_images
from library.errors import UserError

# What each entry script's datasets may hold (sd-scripts' ConfigSanitizer flags per script).
SUPPORT = {"network": DatasetSupport(), "db": DatasetSupport(fine_tuning=True),
           "ti": DatasetSupport(caption_dropout=False), "hypernetwork": DatasetSupport()}


@dataclass
class DatasetPlan:
    spec: DatasetSpec
    entries: list[ImageEntry]  # usable images, train then (balanced) reg
    sizes: dict[Path, tuple[int, int]]
    assignment: BucketAssignment

    @property
    def train(self) -> list[ImageEntry]:
        return [e for e in self.entries if not e.is_reg]

    @property
    def reg(self) -> list[ImageEntry]:
        return [e for e in self.entries if e.is_reg]

    @property
    def batches(self) -> int:
        return sum(math.ceil(len(keys) / self.spec.batch_size) for keys in self.assignment.entries.values())


@dataclass
class RunPlan:
    datasets: list[DatasetPlan]
    problems: list[str] = field(default_factory=list)
    gradient_accumulation_steps: int = 1
    max_train_steps: int = 0
    max_train_epochs: int | None = None
    strict: bool = False  # --strict: an image that fails to decode during training stops the run too
    # Images held out for the validation loss (validation_split, is_val subsets): one plan per dataset that has any,
    # each image once (no repeats, no reg images); they never train.
    validation: list[DatasetPlan] = field(default_factory=list)

    @property
    def validation_images(self) -> int:
        return sum(len(d.entries) for d in self.validation)

    @property
    def batches_per_epoch(self) -> int:
        return sum(d.batches for d in self.datasets)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch on one process, as sd-scripts counts them."""
        return math.ceil(self.batches_per_epoch / self.gradient_accumulation_steps)

    @property
    def total_steps(self) -> int:
        return self.max_train_epochs * self.steps_per_epoch if self.max_train_epochs else self.max_train_steps

    @property
    def epochs(self) -> int:
        return self.max_train_epochs or math.ceil(self.total_steps / max(1, self.steps_per_epoch))


def plan_run(options: Mapping, *, script: str = "network", verify: bool = False) -> RunPlan:
    """Resolve the datasets, list and size every image (headers only, or fully checked with `verify`), bucket them."""
    script = getattr(options, "script", script)
    problems: list[str] = []
    if options.get("dataset_config"):
        specs = load_dataset_config(options["dataset_config"], options, support=SUPPORT[script], problems=problems)
    else:
        specs = dataset_specs_from_dirs(options, problems=problems)
    check_cache_options({**options, "text_encoder_trained": text_encoder_trained(options, script)},
                        [subset for spec in specs for subset in spec.subsets])
    _check_masks(options, [subset for spec in specs for subset in spec.subsets], problems)
    _check_token_padding(options)
    strict = bool(options.get("strict"))
    # The step the script's model family requires (sd-scripts: 64 for SD 1.x/2.x, 32 for SDXL).
    families = options.get("model_families") or ()
    required_step = _required_bucket_step(families)
    # The split's shuffle: --validation_seed (or the dataset's), else --seed, else 0: the same images every time
    # the plan is made, in every process (sd-scripts draws from the global RNG without a validation_seed, twice).
    split_seed = options.get("seed") or 0
    planned = [_plan_dataset(spec, problems, strict, verify, required_step, split_seed) for spec in specs]
    datasets = [train for train, _ in planned]
    if not any(d.train for d in datasets):
        details = "; ".join(problems[:3]) or "no subset holds images"
        raise UserError(f"no usable training images ({details})")
    return RunPlan(datasets, problems, options.get("gradient_accumulation_steps") or 1,
                   options.get("max_train_steps") or 0, options.get("max_train_epochs"), strict,
                   validation=[val for _, val in planned if val is not None])


def _check_masks(options: Mapping, subsets: list, problems: list[str]) -> None:
    """conditioning_data_dir is read only with --masked_loss (sd-scripts' dataset schema allows it only then)."""
    with_dir = [s for s in subsets if s.conditioning_data_dir is not None]
    if with_dir and not options.get("masked_loss"):
        raise UserError(f"subset '{with_dir[0].image_dir}' has conditioning_data_dir '{with_dir[0].conditioning_data_dir}'"
                        ", whose masks are used only with --masked_loss: add --masked_loss (masked_loss = true), or "
                        "remove conditioning_data_dir")
    if options.get("masked_loss") and not with_dir and not any(s.alpha_mask for s in subsets):
        problems.append("--masked_loss: no subset has conditioning_data_dir or alpha_mask, so no image has a mask and "
                        "the loss is not masked")


def _check_token_padding(options: Mapping) -> None:
    """--no_token_padding encodes each batch padded to its own longest caption: no fixed-length outputs to cache, and
    sd-scripts' weighted captions never honoured it."""
    if not options.get("no_token_padding"):
        return
    for other in ("weighted_captions", "cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk"):
        if options.get(other):
            raise UserError(f"--no_token_padding cannot be used with --{other}: the batch is padded to its longest "
                            f"caption each step; drop one of them")


def text_encoder_trained(options: Mapping, script: str) -> bool:
    """Whether the run trains the text encoder (then its outputs cannot be cached), per sd-scripts' rules."""
    if script == "network":  # its text-encoder adapters, or new token embeddings (--train_embeddings)
        return not options.get("network_train_unet_only") or bool(options.get("train_embeddings"))
    if script == "db":  # train_db trains it unless stop_text_encoder_training is negative; sdxl_train.py on request
        from library.models.family import family_named

        families = options.get("model_families") or ("sd1",)
        return any(rate is not None for rate in family_named(families[0]).full_tune_text_encoders(options))
    return script == "ti"


def _required_bucket_step(families) -> int:
    from library.models.family import family_named

    steps = {family_named(name).bucket_step for name in families}
    return steps.pop() if len(steps) == 1 else 64


def _plan_dataset(spec: DatasetSpec, problems: list[str], strict: bool, verify: bool,
                  required_step: int = 64, split_seed: int = 0) -> tuple[DatasetPlan, DatasetPlan | None]:
    train, reg, held_out = [], [], []
    sizes: dict[Path, tuple[int, int]] = {}
    seed = spec.validation_seed if spec.validation_seed is not None else split_seed
    for subset in spec.subsets:
        entries, found = list_subset_images(subset)
        problems.extend(found)
        # Unreadable images leave before reg balancing, which counts the training images that will really be used.
        usable = _readable(entries, sizes, problems, strict, verify)
        if subset.is_reg:
            reg.extend(usable)
            continue
        trained, validated = split_validation(usable, 1.0 if subset.is_val else spec.validation_split, seed)
        train.extend(trained)
        held_out.extend(validated)
    if reg and not train:
        problems.append("regularisation images without training images in one dataset: they are not used")
    entries = train + balance_regularisation(train, reg)
    _check_epoch_size(spec, entries)
    buckets = _metadata_buckets(spec, entries + held_out, problems)
    if buckets is None:
        buckets = make_buckets(spec.resolution, enable_bucket=spec.enable_bucket,
                               min_bucket_reso=spec.min_bucket_reso, max_bucket_reso=spec.max_bucket_reso,
                               bucket_reso_steps=spec.bucket_reso_steps, bucket_no_upscale=spec.bucket_no_upscale)
        for note in rounding_notes(spec.resolution, enable_bucket=spec.enable_bucket,
                                   min_bucket_reso=spec.min_bucket_reso, max_bucket_reso=spec.max_bucket_reso,
                                   bucket_reso_steps=spec.bucket_reso_steps, bucket_no_upscale=spec.bucket_no_upscale,
                                   required_step=required_step):
            # Datasets sharing the settings would repeat the line.
            if note not in problems:
                problems.append(note)

    def assign(listed: list[ImageEntry], repeats=None):
        fixed = {i: tuple(e.train_resolution) for i, e in enumerate(listed) if e.train_resolution}
        return assign_buckets(buckets, ((i, sizes[e.path], repeats or e.num_repeats) for i, e in enumerate(listed)),
                              fixed=fixed if buckets.metadata else None)

    assignment = assign(entries)
    validation = None
    if held_out:
        held_out = [replace(e, num_repeats=1) for e in held_out]
        validation = DatasetPlan(spec, held_out, {e.path: sizes[e.path] for e in held_out}, assign(held_out, 1))
    return DatasetPlan(spec, entries, sizes, assignment), validation


def _metadata_buckets(spec: DatasetSpec, entries: list[ImageEntry], problems: list[str]) -> Buckets | None:
    """Fine-tuning metadata whose every image has a train_resolution (tools/prepare_buckets_latents.py, or
    sd-scripts' own) decides the buckets, as sd-scripts' FineTuningDataset does: bucketing on, one bucket per listed
    resolution, each image in its own; the dataset's bucket settings are not used."""
    if not spec.is_fine_tuning or not entries or not all(e.train_resolution for e in entries):
        return None
    resos = tuple(sorted({tuple(e.train_resolution) for e in entries}))
    note = (f"using the buckets in the metadata (every image's train_resolution: {len(resos)} "
            f"bucket{'s' if len(resos) != 1 else ''}); the dataset's bucket settings are not used")
    if note not in problems:
        problems.append(note)
    return Buckets(tuple(spec.resolution), False, spec.bucket_reso_steps, resos, metadata=True)


def split_validation(entries: list[ImageEntry], split: float, seed: int) -> tuple[list[ImageEntry], list[ImageEntry]]:
    """(train, validation) of one subset's images, as sd-scripts' split_train_val: shuffled with `seed`, the first
    ceil(n * (1 - split)) train and the rest validate. Unlike sd-scripts (which counts the validation part as
    round(n * split), so both parts can hold one image), the parts never overlap."""
    if split <= 0 or not entries:
        return entries, []
    order = list(entries)
    random.Random(seed).shuffle(order)
    cut = math.ceil(len(order) * (1 - split) - 1e-9)  # 1e-9: 10 * (1 - 0.7) is 3.0000000000000004, not 4 images
    return order[:cut], order[cut:]


# One epoch lists every image once per repeat; past this the plan alone would need gigabytes of memory.
MOST_EPOCH_ENTRIES = 50_000_000


def _check_epoch_size(spec: DatasetSpec, entries: list[ImageEntry]) -> None:
    total = sum(e.num_repeats for e in entries)
    if total > MOST_EPOCH_ENTRIES:
        raise UserError(f"{len(entries)} images with their num_repeats make {total:,} images per epoch, more than "
                        f"{MOST_EPOCH_ENTRIES:,} (the plan alone would not fit in memory); lower num_repeats "
                        "(folder prefix or dataset config) and use --max_train_epochs for longer training")


def _readable(entries: list[ImageEntry], sizes: dict, problems: list[str], strict: bool, verify: bool) -> list[ImageEntry]:
    usable = []
    for entry in entries:
        try:
            sizes[entry.path] = entry.image_size or image_size(entry.path)
            if verify:
                verify_image(entry.path)
            if entry.mask_path is not None:
                _check_mask(entry, sizes[entry.path], verify)
        except CorruptImageError as err:
            if strict:
                raise UserError(f"{err} (--strict: a bad image stops the run; drop --strict to skip it)") from None
            problems.append(f"skipped unreadable image {err}")
            continue
        usable.append(entry)
    return usable


def _check_mask(entry: ImageEntry, size: tuple[int, int], verify: bool) -> None:
    """A conditioning mask is resized and cropped with its image, so it must have the image's size (sd-scripts
    asserts the same); an unreadable mask skips its image, as an unreadable image does."""
    mask_size = image_size(entry.mask_path)
    if verify:
        verify_image(entry.mask_path)
    if tuple(mask_size) != tuple(size):
        raise UserError(f"mask '{entry.mask_path}' is {mask_size[0]}x{mask_size[1]} but its image '{entry.path}' is "
                        f"{size[0]}x{size[1]}: save the mask at the image's size")


def print_plan(plan: RunPlan, *, verbose: bool) -> None:
    """The dry-run report (verbose), or a few lines before a real run."""
    for index, dataset in enumerate(plan.datasets):
        spec = dataset.spec
        train_total = sum(e.num_repeats for e in dataset.train)
        reg_total = sum(e.num_repeats for e in dataset.reg)
        buckets = "on" if spec.enable_bucket else "off"
        if spec.is_fine_tuning and dataset.entries and all(e.train_resolution for e in dataset.entries):
            buckets = "from the metadata"
        print(f"dataset {index}: {'fine-tuning' if spec.is_fine_tuning else 'DreamBooth'}, resolution "
              f"{spec.resolution[0]}x{spec.resolution[1]}, batch size {spec.batch_size}, buckets {buckets}")
        print(f"  {len(dataset.train)} training images ({train_total} with repeats), "
              f"{len(dataset.reg)} regularisation images ({reg_total} with repeats)")
        held_out = next((v for v in plan.validation if v.spec is spec), None)
        if held_out is not None:
            print(f"  {len(held_out.entries)} validation images (held out: they never train)")
        if verbose:
            _print_subsets(dataset)
            _print_buckets(dataset)
    print(f"steps: {plan.batches_per_epoch} batches per epoch, {plan.steps_per_epoch} optimizer steps per epoch "
          f"(gradient accumulation {plan.gradient_accumulation_steps}, 1 process); "
          f"{plan.total_steps} steps = {plan.epochs} epochs")
    if plan.problems:
        print(f"problems ({len(plan.problems)}):")
        for problem in plan.problems:
            print(f"  - {problem}")
    elif verbose:
        print("problems: none")


def _print_subsets(dataset: DatasetPlan) -> None:
    for subset in dataset.spec.subsets:
        rows = [e for e in dataset.entries if e.subset == subset]
        where = subset.metadata_file or subset.image_dir
        kind = "reg" if subset.is_reg else "train"
        empty = sum(1 for e in rows if not e.caption.strip())
        repeats = sorted({e.num_repeats for e in rows}) or [subset.num_repeats]
        shown = str(repeats[0]) if len(repeats) == 1 else f"{repeats[0]}-{repeats[-1]} (balanced)"
        tokens = f", class tokens '{subset.class_tokens}'" if subset.class_tokens else ""
        print(f"    [{kind}] {where}: {len(rows)} images, repeats {shown}{tokens}, {len(rows) - empty} with captions")


def _print_buckets(dataset: DatasetPlan) -> None:
    info = dataset.assignment.bucket_info()
    print(f"  buckets ({len(info['buckets'])}, mean aspect-ratio error {info['mean_img_ar_error']:.4f}):")
    for bucket in info["buckets"].values():
        width, height = bucket["resolution"]
        print(f"    {width:>5} x {height:<5} {bucket['count']:>6} images with repeats")
