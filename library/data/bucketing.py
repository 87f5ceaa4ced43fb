"""Aspect-ratio bucketing and bucket-pure batching, identical to sd-scripts' BucketManager and shuffle_buckets."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Hashable, Iterable, NamedTuple, Sequence

import numpy as np

from library.errors import UserError

Reso = tuple[int, int]  # (width, height), sd-scripts' order everywhere


class BucketChoice(NamedTuple):
    """Where one image goes: its bucket, the size it is resized to before the crop, and the signed AR error."""

    reso: Reso
    resized_size: Reso
    ar_error: float


def make_bucket_resolutions(max_reso: Reso, min_size: int = 256, max_size: int = 1024,
                            divisible: int = 64) -> list[Reso]:
    """The predefined bucket set of sd-scripts' model_util.make_bucket_resolutions, in the same (sorted) order."""
    max_width, max_height = max_reso
    max_area = max_width * max_height
    # The square bucket is floored from sqrt(area), so a non-square resolution still gets one.
    side = int(math.sqrt(max_area) // divisible) * divisible
    resos = {(side, side)}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


def adjust_bucket_reso_range(resolution: Reso, min_bucket_reso: int, max_bucket_reso: int,
                             bucket_reso_steps: int) -> tuple[int, int]:
    """min/max bucket sizes as sd-scripts' adjust_min_max_bucket_reso_by_steps makes them (min floored, max ceiled).

    The caller may warn when the returned values differ from the ones given, as sd-scripts does.
    """
    if bucket_reso_steps <= 0:
        raise UserError(f"bucket_reso_steps must be a positive integer, got {bucket_reso_steps}")
    if min_bucket_reso < bucket_reso_steps:
        # rounding it down to a multiple of the step would give 0, a bucket with no pixels
        raise UserError(f"min_bucket_reso {min_bucket_reso} is smaller than bucket_reso_steps {bucket_reso_steps}; "
                        f"raise min_bucket_reso to {bucket_reso_steps} or lower bucket_reso_steps")
    if min_bucket_reso % bucket_reso_steps:
        min_bucket_reso -= min_bucket_reso % bucket_reso_steps
    if max_bucket_reso % bucket_reso_steps:
        max_bucket_reso += bucket_reso_steps - max_bucket_reso % bucket_reso_steps
    if min(resolution) < min_bucket_reso:
        raise UserError(f"min_bucket_reso {min_bucket_reso} is larger than the resolution "
                        f"{resolution[0]}x{resolution[1]}; lower min_bucket_reso or raise the resolution")
    if max(resolution) > max_bucket_reso:
        raise UserError(f"max_bucket_reso {max_bucket_reso} is smaller than the resolution "
                        f"{resolution[0]}x{resolution[1]}; raise max_bucket_reso or lower the resolution")
    return min_bucket_reso, max_bucket_reso


@dataclass(frozen=True)
class Buckets:
    """Bucket selection rules of one dataset (sd-scripts' BucketManager without its mutable image lists).

    Build it with `make_buckets`. With `no_upscale` every image gets its own bucket computed from its size;
    otherwise it goes to the predefined bucket with the least aspect-ratio error.
    """

    resolution: Reso
    no_upscale: bool
    reso_steps: int | None
    predefined: tuple[Reso, ...]
    metadata: bool = False  # buckets read from fine-tuning metadata (train_resolution): each image's is given
    _predefined_set: frozenset = field(init=False, repr=False, compare=False)
    _predefined_ars: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_predefined_set", frozenset(self.predefined))
        # float64 numpy array exactly like BucketManager.set_predefined_resos, so argmin ties resolve the same way.
        object.__setattr__(self, "_predefined_ars", np.array([w / h for w, h in self.predefined], dtype=np.float64))

    def select_bucket(self, image_width: int, image_height: int) -> BucketChoice:
        """sd-scripts' BucketManager.select_bucket for an image of this (orientation-corrected) size."""
        aspect_ratio = image_width / image_height
        if not self.no_upscale:
            reso, resized = self._select_predefined(image_width, image_height, aspect_ratio)
        else:
            reso, resized = self._select_no_upscale(image_width, image_height, aspect_ratio)
        return BucketChoice(reso, resized, (reso[0] / reso[1]) - aspect_ratio)

    def _select_predefined(self, width: int, height: int, aspect_ratio: float) -> tuple[Reso, Reso]:
        reso = (width, height)
        # An image already at a bucket size keeps it even if another bucket has the same aspect ratio.
        if reso not in self._predefined_set:
            # np.argmin returns the first minimum: ties go to the smaller (w, h) in sorted order.
            reso = self.predefined[int(np.abs(self._predefined_ars - aspect_ratio).argmin())]
        return reso, cover_size(width, height, reso)

    def fit(self, image_width: int, image_height: int, reso: Reso) -> BucketChoice:
        """The image in a bucket decided beforehand (fine-tuning metadata's train_resolution), scaled to cover it."""
        return BucketChoice(tuple(reso), cover_size(image_width, image_height, reso),
                            (reso[0] / reso[1]) - image_width / image_height)

    def _select_no_upscale(self, width: int, height: int, aspect_ratio: float) -> tuple[Reso, Reso]:
        steps = self.reso_steps
        max_area = self.resolution[0] * self.resolution[1]
        if width * height > max_area:
            resized = self._shrink_to_area(aspect_ratio, max_area)
        else:
            resized = (width, height)
        # The bucket is the resized size floored to steps: the image is cropped, never padded.
        reso = (resized[0] - resized[0] % steps, resized[1] - resized[1] % steps)
        if reso[0] == 0 or reso[1] == 0:
            # sd-scripts dies here with ZeroDivisionError; say what is wrong instead.
            raise UserError(f"an image of {width}x{height} is smaller than bucket_reso_steps ({steps}) on one side "
                            "after bucket_no_upscale sizing; remove it or disable bucket_no_upscale")
        return reso, resized

    def _shrink_to_area(self, aspect_ratio: float, max_area: int) -> Reso:
        # Same arithmetic as BucketManager: round one side to steps, derive the other, keep the smaller AR error.
        resized_width = math.sqrt(max_area * aspect_ratio)
        resized_height = max_area / resized_width
        width_rounded = self._round_to_steps(resized_width)
        height_in_wr = self._round_to_steps(width_rounded / aspect_ratio)
        height_rounded = self._round_to_steps(resized_height)
        width_in_hr = self._round_to_steps(height_rounded * aspect_ratio)
        if height_in_wr == 0 or height_rounded == 0:
            raise UserError(f"an image with aspect ratio {aspect_ratio:.3f} is too extreme for bucket_no_upscale at "
                            f"{self.resolution[0]}x{self.resolution[1]}; crop it or disable bucket_no_upscale")
        ar_width_rounded = width_rounded / height_in_wr
        ar_height_rounded = width_in_hr / height_rounded
        if abs(ar_width_rounded - aspect_ratio) < abs(ar_height_rounded - aspect_ratio):
            return width_rounded, int(width_rounded / aspect_ratio + 0.5)
        return int(height_rounded * aspect_ratio + 0.5), height_rounded

    def _round_to_steps(self, x: float) -> int:
        x = int(x + 0.5)
        return x - x % self.reso_steps


def cover_size(width: int, height: int, reso: Reso) -> Reso:
    """The image scaled so that it covers the bucket: the side that would otherwise fall short matches it."""
    if width / height > reso[0] / reso[1]:
        scale = reso[1] / height
    else:
        scale = reso[0] / width
    return int(width * scale + 0.5), int(height * scale + 0.5)


def make_buckets(resolution: Reso, *, enable_bucket: bool, min_bucket_reso: int = 256, max_bucket_reso: int = 1024,
                 bucket_reso_steps: int = 64, bucket_no_upscale: bool = False) -> Buckets:
    """The Buckets a sd-scripts dataset builds from its settings (its __init__ and make_buckets)."""
    if not enable_bucket:
        # One fixed bucket; sd-scripts ignores min/max/steps and no_upscale here.
        return Buckets(tuple(resolution), False, None, (tuple(resolution),))
    min_bucket_reso, max_bucket_reso = adjust_bucket_reso_range(resolution, min_bucket_reso, max_bucket_reso,
                                                                bucket_reso_steps)
    if bucket_no_upscale:
        # sd-scripts warns that min/max are ignored: buckets come from each image's size.
        return Buckets(tuple(resolution), True, bucket_reso_steps, ())
    return Buckets(tuple(resolution), False, bucket_reso_steps,
                   tuple(make_bucket_resolutions(resolution, min_bucket_reso, max_bucket_reso, bucket_reso_steps)))


# SD's VAE downscale: a latent is (side // 8) wide, the VAE rounding down.
VAE_STRIDE = 8
# sd-scripts' SD 1.x/2.x scripts call verify_bucket_reso_steps(64): an AssertionError for other steps.
SD_SCRIPTS_STEPS = 64


def rounding_notes(resolution: Reso, *, enable_bucket: bool, min_bucket_reso: int = 256, max_bucket_reso: int = 1024,
                   bucket_reso_steps: int = 64, bucket_no_upscale: bool = False,
                   required_step: int = SD_SCRIPTS_STEPS) -> list[str]:
    """One warning line per setting that is not a multiple of what it steps by, saying what is done instead.

    sd-scripts rounds silently (resolution, no_upscale buckets), warns (min/max_bucket_reso) or asserts
    (bucket_reso_steps % 64); we do the same rounding and say so. Call after `make_buckets` accepted the settings.
    """
    width, height = resolution
    steps = bucket_reso_steps
    if not enable_bucket:
        # sd-scripts ignores the bucket settings here and trains at exactly this size; only the VAE rounds.
        if width % VAE_STRIDE or height % VAE_STRIDE:
            return [f"resolution {width}x{height} is not a multiple of {VAE_STRIDE}: used as is (as in sd-scripts), "
                    f"images are cropped to {width}x{height} and the VAE rounds their latents down to "
                    f"{width // VAE_STRIDE}x{height // VAE_STRIDE}"]
        return []
    notes = []
    if width % steps or height % steps:
        if bucket_no_upscale:
            notes.append(f"resolution {width}x{height} is not a multiple of bucket_reso_steps {steps}: with "
                         f"bucket_no_upscale only its area ({width * height} px) is used and every bucket side is "
                         f"rounded down to a multiple of {steps}, the image cropped (as in sd-scripts); a {width}x"
                         f"{height} image gets the {width - width % steps}x{height - height % steps} bucket")
        else:
            side = int(math.sqrt(width * height) // steps) * steps
            notes.append(f"resolution {width}x{height} is not a multiple of bucket_reso_steps {steps}: the buckets "
                         f"keep its area ({width * height} px) with every side rounded down to a multiple of {steps} "
                         f"(as in sd-scripts); the square bucket is {side}x{side}")
    if not bucket_no_upscale:  # with it min/max are not used (sd-scripts says so too)
        low, high = adjust_bucket_reso_range(resolution, min_bucket_reso, max_bucket_reso, steps)
        if low != min_bucket_reso:
            notes.append(f"min_bucket_reso {min_bucket_reso} is not a multiple of bucket_reso_steps {steps}: "
                         f"rounded down to {low} (as in sd-scripts)")
        if high != max_bucket_reso:
            notes.append(f"max_bucket_reso {max_bucket_reso} is not a multiple of bucket_reso_steps {steps}: "
                         f"rounded up to {high} (as in sd-scripts)")
    if steps % required_step and required_step == SD_SCRIPTS_STEPS:
        notes.append(f"bucket_reso_steps {steps} is not a multiple of {SD_SCRIPTS_STEPS}: sd-scripts refuses it for "
                     "SD 1.x/2.x; accepted here, as the UNet takes latent sides that are not a multiple of 8")
    return notes


@dataclass
class BucketAssignment:
    """Images assigned to buckets: per-image choices and, per bucket (sorted by resolution), the entries.

    `entries[reso]` lists each image key `repeats` times in a row, in the order the images were given,
    which is how sd-scripts fills BucketManager.buckets before its first shuffle.
    """

    choices: dict[Hashable, BucketChoice]
    entries: dict[Reso, list[Hashable]]

    def bucket_info(self) -> dict:
        """The dict sd-scripts stores as `ss_bucket_info` (it writes it only when bucketing is enabled).

        Bucket indices count every bucket in sorted order; empty buckets are left out but keep their index.
        `mean_img_ar_error` averages |AR error| over images, not over repeats; 0 when there are none.
        """
        buckets = {i: {"resolution": list(reso), "count": len(keys)}
                   for i, (reso, keys) in enumerate(self.entries.items()) if keys}
        errors = [abs(choice.ar_error) for choice in self.choices.values()]
        mean = float(np.mean(np.abs(np.array(errors)))) if errors else 0
        return {"buckets": buckets, "mean_img_ar_error": mean}


def assign_buckets(buckets: Buckets, images: Iterable[tuple[Hashable, Reso, int]],
                   fixed: dict[Hashable, Reso] | None = None) -> BucketAssignment:
    """Assign (key, (width, height), repeats) images to buckets as sd-scripts' BaseDataset.make_buckets does; an image
    in `fixed` goes to the bucket given there (fine-tuning metadata's train_resolution)."""
    choices: dict[Hashable, BucketChoice] = {}
    repeats: dict[Hashable, int] = {}
    for key, (width, height), num_repeats in images:
        if key in choices:
            raise ValueError(f"image key {key!r} given twice")
        choices[key] = (buckets.fit(width, height, fixed[key]) if fixed and key in fixed
                        else buckets.select_bucket(width, height))
        repeats[key] = num_repeats
    entries: dict[Reso, list[Hashable]] = {reso: [] for reso in sorted({c.reso for c in choices.values()})}
    for key, choice in choices.items():
        entries[choice.reso].extend([key] * repeats[key])
    return BucketAssignment(choices, entries)


def make_batches(bucket_to_entries: dict[Reso, Sequence[Hashable]], batch_size: int, seed: int, epoch: int,
                 *, initial_seed: int = 0) -> list[list[Hashable]]:
    """The batches of `epoch` in sd-scripts' order; a batch never mixes buckets, the last one of a bucket may be short.

    sd-scripts shuffles in place and cumulatively: make_buckets runs shuffle_buckets once with the dataset's
    default seed 0 (set_seed comes after it), then every epoch increment e = 1, 2, ... reseeds with seed + e
    and shuffles the already-shuffled lists again. Each shuffle permutes the batch index list first, then
    each bucket's entries in bucket order. Epoch 0 is the order right after make_buckets; training epoch N
    (sd-scripts' set_current_epoch(N)) is `epoch=N`. Entries must be sorted by resolution as from assign_buckets.
    (sd-scripts' DataLoader then draws these batches with shuffle=True, a separate torch permutation.)
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    buckets = [list(entries) for entries in bucket_to_entries.values()]
    batch_index = [(b, i) for b, entries in enumerate(buckets) for i in range(math.ceil(len(entries) / batch_size))]
    for e in range(epoch + 1):
        rng = random.Random(initial_seed if e == 0 else seed + e)
        rng.shuffle(batch_index)
        for entries in buckets:
            rng.shuffle(entries)
    return [buckets[b][i * batch_size:(i + 1) * batch_size] for b, i in batch_index]
