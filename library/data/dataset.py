"""Training batches: one bucket per batch, repeats as entries, per-epoch shuffles, augmentations, captions, latents.

Index i of an epoch is one whole batch (sd-scripts' DataLoader runs with batch_size=1 over batches). Randomness
comes from a Random seeded by (seed, epoch, batch index) — not the global stream sd-scripts draws from — so data
loader workers and a resumed run see exactly the batches an uninterrupted single-process run sees.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from library.data.bucketing import make_batches
from library.data.captions import process_caption
from library.data.images import (CorruptImageError, color_aug, crop_ltrb, flip_horizontal, load_image,
                                 resize_and_crop, should_flip)
from library.data.latent_cache import LatentCache, LatentRequest, pixels_to_tensor
from library.data.plan import DatasetPlan, RunPlan
from library.data.subsets import ImageEntry


@dataclass
class Batch:
    captions: list[str]
    is_reg: torch.Tensor  # bool (B,)
    network_multipliers: torch.Tensor  # float (B,)
    images: torch.Tensor | None  # float (B, 3, H, W) in [-1, 1]; None when latents come from the cache
    latents: torch.Tensor | None  # float (B, 4, h, w), unscaled (× 0.18215 at train time); None without a cache
    alpha_masks: torch.Tensor | None  # float (B, H, W) in [0, 1] when a subset has alpha_mask
    image_paths: list[str]
    skipped: list[str]  # images that could not be decoded (reported, left out of this batch)


@dataclass(frozen=True)
class _Item:
    dataset: int
    entry: ImageEntry
    bucket: tuple[int, int]
    resized: tuple[int, int]


class TrainingDataset(torch.utils.data.Dataset):
    def __init__(self, plan: RunPlan, *, seed: int, max_train_steps: int = 0, latent_cache: LatentCache | None = None,
                 caption_transform: Callable[[str, ImageEntry, random.Random], str] | None = None):
        self.plan = plan
        # Textual inversion / hypernetworks: caption templates ([name], [filewords]) applied after the usual processing.
        self.caption_transform = caption_transform
        self.seed = seed
        self.max_train_steps = max_train_steps
        self.latent_cache = latent_cache
        self.epoch = 0
        self.step = 0
        self._batches = self._epoch_batches(0)

    def set_epoch(self, epoch: int) -> None:
        """sd-scripts' 1-based training epoch: reshuffles the buckets and drives caption dropout every n epochs."""
        self.epoch = epoch
        self._batches = self._epoch_batches(epoch)

    def set_step(self, step: int) -> None:
        """The global step, for token warm-up."""
        self.step = step

    def __len__(self) -> int:
        return len(self._batches)

    def __getitem__(self, index: int) -> Batch:
        rng = random.Random(f"{self.seed}/{self.epoch}/{index}")
        examples, skipped = [], []
        for item in self._batches[index]:
            try:
                examples.append(self._example(item, rng))
            except CorruptImageError as err:
                skipped.append(str(err))
        return _collate(examples, skipped)

    def _epoch_batches(self, epoch: int) -> list[list[_Item]]:
        batches: list[list[_Item]] = []
        for number, dataset in enumerate(self.plan.datasets):
            items = _items(number, dataset)
            for keys in make_batches(dataset.assignment.entries, dataset.spec.batch_size, self.seed, epoch):
                batches.append([items[key] for key in keys])
        # Datasets are concatenated, then the batch order is shuffled once per epoch (sd-scripts' shuffled DataLoader).
        random.Random(f"{self.seed}/{epoch}/order").shuffle(batches)
        return batches

    def _example(self, item: _Item, rng: random.Random) -> dict:
        subset = item.entry.subset
        # sd-scripts' draw order: flip first, then crop, colour, caption.
        flip = subset.flip_aug and should_flip(rng)
        example = {"path": str(item.entry.path), "is_reg": item.entry.is_reg,
                   "multiplier": self.plan.datasets[item.dataset].spec.network_multiplier}
        if self.latent_cache is not None:
            original = self.plan.datasets[item.dataset].sizes[item.entry.path]
            cached = self.latent_cache.get(latent_request(item.entry, item.bucket, item.resized, original))
            example["latents"] = cached.flipped if flip else cached.latents
            example["alpha"] = cached.alpha_mask
        else:
            pixels = prepare_pixels(item.entry, item.bucket, item.resized, rng)
            if subset.color_aug:
                pixels[..., :3] = color_aug(np.ascontiguousarray(pixels[..., :3]), rng)
            if flip:
                pixels = flip_horizontal(pixels)
            example["image"] = pixels_to_tensor(pixels[..., :3])
            example["alpha"] = torch.from_numpy(pixels[..., 3] / 255.0).float() if subset.alpha_mask else None
        example["caption"] = process_caption(item.entry.caption, subset, rng, epoch=self.epoch, step=self.step,
                                             max_train_steps=self.max_train_steps)
        if self.caption_transform is not None:
            example["caption"] = self.caption_transform(example["caption"], item.entry, rng)
        return example


def _items(number: int, dataset: DatasetPlan) -> dict[int, _Item]:
    choices = dataset.assignment.choices
    return {key: _Item(number, entry, choices[key].reso, choices[key].resized_size)
            for key, entry in enumerate(dataset.entries)}


def prepare_pixels(entry: ImageEntry, bucket, resized, rng: random.Random | None = None) -> np.ndarray:
    """The image resized and cropped into its bucket (uint8 HxWxC; a 4th channel when the subset uses alpha masks)."""
    subset = entry.subset
    image = load_image(entry.path, alpha=subset.alpha_mask)
    pixels, _, _ = resize_and_crop(image, bucket, resized, random_crop=subset.random_crop,
                                   rng=rng or random.Random(0), interpolation=subset.resize_interpolation)
    return pixels


def latent_request(entry: ImageEntry, bucket, resized, original) -> LatentRequest:
    return LatentRequest(image_path=Path(entry.path), bucket_reso=tuple(bucket), original_size=original,
                         crop_ltrb=crop_ltrb(tuple(bucket), original),
                         load_pixels=lambda: prepare_pixels(entry, bucket, resized),
                         flip_aug=entry.subset.flip_aug, alpha_mask=entry.subset.alpha_mask)


def latent_requests(plan: RunPlan) -> list[LatentRequest]:
    """Every image of the run at its bucket, once (repeats share one cache entry)."""
    requests = []
    for dataset in plan.datasets:
        for key, entry in enumerate(dataset.entries):
            choice = dataset.assignment.choices[key]
            requests.append(latent_request(entry, choice.reso, choice.resized_size, dataset.sizes[entry.path]))
    return requests


def _collate(examples: list[dict], skipped: list[str]) -> Batch:
    def stack(name):
        values = [e[name] for e in examples]
        return torch.stack(values) if values and all(v is not None for v in values) else None

    return Batch(
        captions=[e["caption"] for e in examples],
        is_reg=torch.tensor([e["is_reg"] for e in examples], dtype=torch.bool),
        network_multipliers=torch.tensor([e["multiplier"] for e in examples], dtype=torch.float32),
        images=stack("image") if examples and "image" in examples[0] else None,
        latents=stack("latents") if examples and "latents" in examples[0] else None,
        alpha_masks=stack("alpha"),
        image_paths=[e["path"] for e in examples],
        skipped=skipped,
    )
