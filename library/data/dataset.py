"""Training batches: one bucket per batch, repeats as entries, per-epoch shuffles, augmentations, captions, latents.

Index i of an epoch is one whole batch (sd-scripts' DataLoader runs with batch_size=1 over batches). Randomness
comes from a Random seeded by (seed, epoch, batch index) — not the global stream sd-scripts draws from — so data
loader workers and a resumed run see exactly the batches an uninterrupted single-process run sees.

An image that cannot be decoded gives its slot to another image of its bucket (see `_fill`), so every batch keeps
its size: batches per epoch, optimizer steps and resume positions are those of the plan whatever fails.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from library.data.bucketing import make_batches
from library.data.caption_variants import CaptionVariants, fixed_caption
from library.data.captions import process_caption
from library.data.decode_failures import DataLoadingError, DecodeFailures, nothing_decodes_message
from library.data.images import (CorruptImageError, color_aug, crop_ltrb, flip_horizontal, load_image,
                                 resize_and_crop, should_flip)
from library.data.latent_cache import LatentCache, LatentRequest, pixels_to_tensor
from library.data.plan import DatasetPlan, RunPlan
from library.data.subsets import ImageEntry
from library.models.family import ImageConditioning


@dataclass
class Batch:
    captions: list[str]
    is_reg: torch.Tensor  # bool (B,)
    network_multipliers: torch.Tensor  # float (B,)
    images: torch.Tensor | None  # float (B, 3, H, W) in [-1, 1]; None when latents come from the cache
    latents: torch.Tensor | None  # float (B, 4, h, w), unscaled (× family.latent_scale in training); None uncached
    alpha_masks: torch.Tensor | None  # float (B, H, W) in [0, 1] when a subset has alpha_mask
    image_paths: list[str]
    skipped: list[str]  # images of this batch that could not be decoded (reported; other images took their slots)
    # Per image: original size, crop and target size, for families whose UNet takes them (SDXL); SD 1.x/2.x ignore it.
    conditioning: list[ImageConditioning] = field(default_factory=list)


@dataclass(frozen=True)
class _Item:
    dataset: int
    entry: ImageEntry
    bucket: tuple[int, int]
    resized: tuple[int, int]


def fixed_captions(plan: RunPlan, *, max_train_steps: int | None = 0,
                   caption_transform: Callable[[str, ImageEntry, random.Random], str] | None = None,
                   ) -> list[tuple[str, str]]:
    """(image path, final caption) of every image, once, as the first epoch's batches would caption them, held-out
    (validation) images after the training ones: what a text-encoder cache encodes before the first step. Only
    meaningful when captions never change (no shuffling, dropout, warm-up or wildcards)."""
    pairs = [(str(entry.path), fixed_caption(entry, max_train_steps=max_train_steps,
                                             caption_transform=caption_transform))
             for dataset in [*plan.datasets, *plan.validation] for entry in dataset.entries]
    return list(dict.fromkeys(pairs))


class TrainingDataset(torch.utils.data.Dataset):
    def __init__(self, plan: RunPlan, *, seed: int, max_train_steps: int = 0, latent_cache: LatentCache | None = None,
                 caption_transform: Callable[[str, ImageEntry, random.Random], str] | None = None,
                 caption_variants: CaptionVariants | None = None):
        self.plan = plan
        # --caption_variants (a text-encoder cache with captions that vary): an image listed there takes one of its
        # cached captions each step instead of a freshly drawn one.
        self.caption_variants = caption_variants
        # Textual inversion / hypernetworks: caption templates ([name], [filewords]) applied after the usual processing.
        self.caption_transform = caption_transform
        self.seed = seed
        self.max_train_steps = max_train_steps
        self.latent_cache = latent_cache
        self.epoch = 0
        self.step = 0
        self._batches = self._epoch_batches(0)
        self._pools = _bucket_pools(plan)
        known = latent_cache.failed if latent_cache is not None else None
        self.failures = DecodeFailures((e.path for d in plan.datasets for e in d.entries), strict=plan.strict,
                                       known=known)

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
        items = self._batches[index]
        examples = [self._try_example(item, rng) for item in items]
        skipped = [str(item.entry.path) for item, example in zip(items, examples) if example is None]
        if skipped:
            examples = self._fill(items, examples, random.Random(f"{self.seed}/{self.epoch}/{index}/fill"))
        return _collate(examples, skipped)

    def _try_example(self, item: _Item, rng: random.Random) -> dict | None:
        """The item's example, or None when its image cannot be decoded (named once; --strict stops the run)."""
        if item.entry.path in self.failures:
            return None
        try:
            return self._example(item, rng)
        except CorruptImageError as err:
            self.failures.record(err)
            return None

    def _fill(self, items: list[_Item], examples: list[dict | None], rng: random.Random) -> list[dict]:
        """Give each failed slot another image of the batch's bucket, so the batch keeps its size and shape.

        When no image of that bucket decodes, the whole batch is made of another bucket's images (a batch holds one
        bucket; the next in an order drawn from `rng` that has a readable image). Everything depends only on the
        batch's seed and on which files are broken, so workers, DDP ranks and resumed runs build the same batch.
        """
        first = items[0]
        home = (first.dataset, first.bucket)
        filled = self._fill_from(self._pools[home], items, examples, rng)
        if filled is not None:
            return filled
        others = [key for key in self._pools if key != home]
        rng.shuffle(others)
        for key in others:
            filled = self._fill_from(self._pools[key], items, [None] * len(items), rng)
            if filled is not None:
                return filled
        count = sum(len(pool) for pool in self._pools.values())
        raise DataLoadingError(nothing_decodes_message("images of the run", count, self.failures.example()))

    def _fill_from(self, pool: list[_Item], items: list[_Item], examples: list[dict | None],
                   rng: random.Random) -> list[dict] | None:
        """`examples` with each None replaced from `pool`: an image of the same kind (training or regularisation)
        first, the one used least in this batch, in an order drawn from `rng`; None when no image of `pool` decodes."""
        order = list(pool)
        rng.shuffle(order)
        used = {str(item.entry.path): 1 for item, example in zip(items, examples) if example is not None}
        out = list(examples)
        for slot, item in enumerate(items):
            if out[slot] is not None:
                continue
            ranked = sorted(order, key=lambda c: (c.entry.is_reg != item.entry.is_reg, used.get(str(c.entry.path), 0)))
            for candidate in ranked:
                out[slot] = self._try_example(candidate, rng)
                if out[slot] is not None:
                    used[str(candidate.entry.path)] = used.get(str(candidate.entry.path), 0) + 1
                    break
            else:
                return None
        return out

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
        # Decoded (or read from the cache) before the first random draw: an image that fails draws nothing, so the
        # batch comes out the same whether or not this process already knew the image was broken.
        if self.latent_cache is not None:
            original = self.plan.datasets[item.dataset].sizes[item.entry.path]
            cached = self.latent_cache.get(latent_request(item.entry, item.bucket, item.resized, original))
        else:
            image = load_entry_image(item.entry)
        # sd-scripts' draw order: flip first, then crop, colour, caption.
        flip = subset.flip_aug and should_flip(rng)
        example = {"path": str(item.entry.path), "is_reg": item.entry.is_reg,
                   "multiplier": self.plan.datasets[item.dataset].spec.network_multiplier,
                   "conditioning": image_conditioning(self.plan.datasets[item.dataset].sizes[item.entry.path],
                                                      item.bucket, flipped=flip)}
        if self.latent_cache is not None:
            example["latents"] = cached.flipped if flip else cached.latents
            alpha = cached.alpha_mask
            # The mask is cached unflipped (sd-scripts' layout); it follows a flipped image, as there.
            example["alpha"] = alpha.flip(-1) if flip and alpha is not None else alpha
        else:
            pixels = crop_into_bucket(image, item.entry, item.bucket, item.resized, rng)
            if subset.color_aug:
                pixels[..., :3] = color_aug(np.ascontiguousarray(pixels[..., :3]), rng)
            if flip:
                pixels = flip_horizontal(pixels)
            example["image"] = pixels_to_tensor(pixels[..., :3])
            example["alpha"] = torch.from_numpy(pixels[..., 3] / 255.0).float() if item.entry.has_mask else None
        if self.caption_variants is not None and item.entry in self.caption_variants:
            example["caption"] = self.caption_variants.pick(item.entry, rng, epoch=self.epoch)
            return example
        example["caption"] = process_caption(item.entry.caption, subset, rng, epoch=self.epoch, step=self.step,
                                             max_train_steps=self.max_train_steps)
        if self.caption_transform is not None:
            example["caption"] = self.caption_transform(example["caption"], item.entry, rng)
        return example


def _items(number: int, dataset: DatasetPlan) -> dict[int, _Item]:
    choices = dataset.assignment.choices
    return {key: _Item(number, entry, choices[key].reso, choices[key].resized_size)
            for key, entry in enumerate(dataset.entries)}


def _bucket_pools(plan: RunPlan) -> dict[tuple[int, tuple[int, int]], list[_Item]]:
    """(dataset, bucket) -> each image of that bucket once: the images that may fill a broken image's slot."""
    pools = {}
    for number, dataset in enumerate(plan.datasets):
        items = _items(number, dataset)
        for bucket, keys in dataset.assignment.entries.items():
            if keys:
                pools[(number, tuple(bucket))] = [items[key] for key in dict.fromkeys(keys)]
    return pools


def prepare_pixels(entry: ImageEntry, bucket, resized, rng: random.Random | None = None) -> np.ndarray:
    """The image resized and cropped into its bucket (uint8 HxWxC; a 4th channel, the mask, when it has one)."""
    return crop_into_bucket(load_entry_image(entry), entry, bucket, resized, rng)


def load_entry_image(entry: ImageEntry):
    """The image as training reads it: RGB, or RGBA when it has a loss mask, whose alpha is the mask: its own alpha
    channel (alpha_mask), or the red channel of its conditioning image (--masked_loss with conditioning_data_dir,
    which wins over alpha_mask, as in sd-scripts). So the mask is resized, cropped and flipped with the pixels."""
    if entry.mask_path is None:
        return load_image(entry.path, alpha=entry.subset.alpha_mask)
    image = load_image(entry.path)
    try:
        mask = load_image(entry.mask_path)
    except CorruptImageError as err:  # skipped (or, --strict, stopping the run) as its image, which it belongs to
        raise CorruptImageError(entry.path, f"its mask {err}") from None
    image.putalpha(mask.getchannel("R"))
    return image


def crop_into_bucket(image, entry: ImageEntry, bucket, resized, rng: random.Random | None = None) -> np.ndarray:
    pixels, _, _ = resize_and_crop(image, bucket, resized, random_crop=entry.subset.random_crop,
                                   rng=rng or random.Random(0), interpolation=entry.subset.resize_interpolation)
    return pixels


def image_conditioning(original_size, bucket, *, flipped: bool) -> ImageConditioning:
    """An image's size/crop conditioning as sd-scripts' BaseDataset.__getitem__ computes it: the original (w, h) of the
    file, the crop of the image fitted inside its bucket (`crop_ltrb`, not the random crop), mirrored when the image
    is flipped, and the bucket as target; all stored (height, width) / (top, left)."""
    width, height = original_size
    bucket_w, bucket_h = bucket
    left, top, right, _ = crop_ltrb(tuple(bucket), tuple(original_size))
    if flipped:
        left = bucket_w - right
    return ImageConditioning(original_size=(height, width), crop_top_left=(top, left), target_size=(bucket_h, bucket_w))


def latent_request(entry: ImageEntry, bucket, resized, original) -> LatentRequest:
    return LatentRequest(image_path=Path(entry.path), bucket_reso=tuple(bucket), original_size=original,
                         crop_ltrb=crop_ltrb(tuple(bucket), original),
                         load_pixels=lambda: prepare_pixels(entry, bucket, resized),
                         flip_aug=entry.subset.flip_aug, alpha_mask=entry.has_mask, mask_path=entry.mask_path)


def latent_requests(plan: RunPlan) -> list[LatentRequest]:
    """Every image of the run at its bucket, once (repeats share one cache entry); validation images too."""
    requests = []
    for dataset in [*plan.datasets, *plan.validation]:
        for key, entry in enumerate(dataset.entries):
            choice = dataset.assignment.choices[key]
            requests.append(latent_request(entry, choice.reso, choice.resized_size, dataset.sizes[entry.path]))
    return requests


def _collate(examples: list[dict], skipped: list[str]) -> Batch:
    def stack(name):
        values = [e[name] for e in examples]
        return torch.stack(values) if values and all(v is not None for v in values) else None

    def masks():
        """Loss masks when any image of the batch has one; the others weigh 1 everywhere (sd-scripts fills them)."""
        values = [e["alpha"] for e in examples]
        present = next((v for v in values if v is not None), None)
        if present is None:
            return None
        return torch.stack([torch.ones_like(present) if v is None else v for v in values])

    return Batch(
        captions=[e["caption"] for e in examples],
        is_reg=torch.tensor([e["is_reg"] for e in examples], dtype=torch.bool),
        network_multipliers=torch.tensor([e["multiplier"] for e in examples], dtype=torch.float32),
        images=stack("image") if examples and "image" in examples[0] else None,
        latents=stack("latents") if examples and "latents" in examples[0] else None,
        alpha_masks=masks(),
        image_paths=[e["path"] for e in examples],
        skipped=skipped,
        conditioning=[e["conditioning"] for e in examples],
    )
