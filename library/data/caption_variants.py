"""--caption_variants: caption augmentation with cached text-encoder outputs (ours; sd-scripts refuses the pair).

sd-scripts makes users choose between --cache_text_encoder_outputs and caption shuffling, tag dropout, wildcards
and caption dropout. Here each image whose caption varies gets N captions drawn up front, by the very rules a
step applies (process_caption, then a method's caption template), each from its own seeded generator; the text
encoder encodes every distinct one once, before the first step; each step then picks one per image.

How the distribution differs from encoding every step (docs/troubleshooting.md quotes this):
- Caption dropout (caption_dropout_rate, caption_dropout_every_n_epochs) is exact: the same draw, at the same
  place in the batch's random stream, decides it, and a dropped caption is the cached empty caption (or, with a
  caption template, one of N templates drawn around an empty caption).
- Everything else a caption varies by (shuffle_caption, caption_tag_dropout_rate, enable_wildcard, templates) is
  sampled N times per image instead of once per step: each step sees one of those N, uniformly. A 10-tag caption
  has 3.6 million orders; a run sees at most N of them per image. Duplicates among the N are kept, so a caption
  with few possible forms is still sampled at its true frequencies (approximately, for small N).
- token_warmup_step grows captions with the step, which no fixed set can show; it stays refused with the cache.
- The images' other random choices (flip, crop) come from the same per-batch stream as without the cache, but a
  pick takes one draw where shuffling and tag dropout took several, so later images of a batch see other flips.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from library.data.captions import caption_dropped, process_caption
from library.data.subsets import ImageEntry

# Subset settings that make a step's caption differ from the last one's.
CAPTION_RANDOMNESS = ("shuffle_caption", "caption_dropout_rate", "caption_dropout_every_n_epochs",
                      "caption_tag_dropout_rate", "token_warmup_step", "enable_wildcard")
# What the default (auto) number of variants may take: the cache of the varying images stays within this.
BUDGET_BYTES = 1 << 30
MOST_AUTO = 16

CaptionTransform = Callable[[str, ImageEntry, random.Random], str]


def varies(subset) -> bool:
    return any(getattr(subset, name) for name in CAPTION_RANDOMNESS)


def can_drop(subset) -> bool:
    return subset.caption_dropout_rate > 0 or subset.caption_dropout_every_n_epochs > 0


def entry_key(entry: ImageEntry) -> tuple[str, str, str]:
    """An image of a subset, the same in every process (entries are copied into data-loader workers, and subsets,
    which hold a dict, do not hash)."""
    return str(entry.path), entry.caption, repr(entry.subset)


@dataclass(frozen=True)
class CaptionVariants:
    """Per image whose caption varies: the captions a step may see when kept, and when dropped (empty when its
    subset never drops)."""

    count: int
    kept: dict[tuple, tuple[str, ...]]  # by entry_key
    dropped: dict[tuple, tuple[str, ...]]

    def __contains__(self, entry: ImageEntry) -> bool:
        return entry_key(entry) in self.kept

    def pick(self, entry: ImageEntry, rng: random.Random, *, epoch: int) -> str:
        """This step's caption of `entry`: dropped or not by process_caption's own first draw, then one variant."""
        key = entry_key(entry)
        pool = self.dropped[key] if caption_dropped(entry.subset, rng, epoch) else self.kept[key]
        return pool[rng.randrange(len(pool))] if len(pool) > 1 else pool[0]

    def captions(self) -> list[str]:
        """Every distinct caption a step may see, in a stable order: what the cache encodes."""
        out: dict[str, None] = {}
        for table in (self.kept, self.dropped):
            for pool in table.values():
                out.update(dict.fromkeys(pool))
        return list(out)


def draw_variants(entries: Iterable[ImageEntry], count: int, *, seed: int,
                  caption_transform: CaptionTransform | None = None) -> CaptionVariants:
    """`count` captions per entry whose caption varies (or that a caption template rewrites), each drawn by
    process_caption (dropout off: a pick decides that) and the template from generator (seed, image, k)."""
    if count < 1:
        raise ValueError(f"caption variants must be 1 or more, not {count}")
    kept: dict[tuple, tuple[str, ...]] = {}
    dropped: dict[tuple, tuple[str, ...]] = {}
    for entry in entries:
        key = entry_key(entry)
        if key in kept or not (varies(entry.subset) or caption_transform is not None):
            continue
        undropped = dataclasses.replace(entry.subset, caption_dropout_rate=0.0, caption_dropout_every_n_epochs=0)
        pool = []
        for k in range(count):
            rng = random.Random(f"{seed}/caption-variant/{entry.path}/{k}")
            caption = process_caption(entry.caption, undropped, rng)
            pool.append(caption if caption_transform is None else caption_transform(caption, entry, rng))
        kept[key] = tuple(pool)
        if can_drop(entry.subset):
            dropped[key] = ("",) if caption_transform is None else tuple(
                caption_transform("", entry, random.Random(f"{seed}/caption-variant/{entry.path}/dropped/{k}"))
                for k in range(count))
    return CaptionVariants(count, kept, dropped)


def fixed_caption(entry: ImageEntry, *, max_train_steps: int | None = 0,
                  caption_transform: CaptionTransform | None = None) -> str:
    """The caption of an image whose caption never changes, as every step makes it."""
    caption = process_caption(entry.caption, entry.subset, random.Random(0), epoch=0, step=0,
                              max_train_steps=max_train_steps)
    return caption if caption_transform is None else caption_transform(caption, entry, random.Random(0))


@dataclass(frozen=True)
class TextCachePlan:
    """What a text-encoder cache holds for a run: the variants of the captions that vary (None when none vary),
    the other images' fixed captions, and the bytes one cached caption takes."""

    variants: CaptionVariants | None
    fixed: list[str]
    per_caption: int
    option: int | None

    def captions(self) -> list[str]:
        """Every caption to encode before the first step."""
        return [*(self.variants.captions() if self.variants is not None else ()), *self.fixed]

    def describe(self) -> str:
        """The dry run's (and the run's) line about the cache."""
        if self.variants is None:
            return (f"text-encoder cache: {len(self.fixed)} captions; "
                    f"{len(self.fixed) * self.per_caption / 2**20:.1f} MiB")
        distinct = len(self.variants.captions())  # already distinct
        how = "--caption_variants" if self.option is not None else f"auto: within {BUDGET_BYTES >> 20} MiB"
        total = (distinct + len(self.fixed)) * self.per_caption
        return (f"text-encoder cache: {self.variants.count} caption variants per image ({how}) for "
                f"{len(self.variants.kept)} images whose captions vary: {distinct} distinct captions, plus "
                f"{len(self.fixed)} fixed; {total / 2**20:.1f} MiB")


def plan_text_cache(entries: Iterable[ImageEntry], *, family, max_token_length: int | None, element_bytes: int,
                    option: int | None, seed: int, max_train_steps: int | None = 0,
                    caption_transform: CaptionTransform | None = None) -> TextCachePlan:
    """The cache for `entries` (training and held-out images): variants drawn as the run draws them (the number:
    --caption_variants, or what fits the budget), fixed captions as every step makes them."""
    entries = list({entry_key(e): e for e in entries}.values())
    per_caption = caption_bytes(family, max_token_length=max_token_length, element_bytes=element_bytes)
    varying = [e for e in entries if varies(e.subset) or caption_transform is not None]
    fixed = list(dict.fromkeys(fixed_caption(e, max_train_steps=max_train_steps)
                               for e in entries if not (varies(e.subset) or caption_transform is not None)))
    variants = None
    if varying:
        count = variant_count(option, len(varying), per_caption)
        variants = draw_variants(entries, count, seed=seed, caption_transform=caption_transform)
    return TextCachePlan(variants, fixed, per_caption, option)


def caption_bytes(family, *, max_token_length: int | None, element_bytes: int) -> int:
    """Bytes one cached caption takes for `family`'s full-size model: hidden states of every token, plus the
    pooled output where the family has one."""
    width, pooled = family.text_cache_widths()
    tokens = (max_token_length or 75) + 2  # 75-token chunks between one BOS and one EOS, as the encoders see them
    return (tokens * width + pooled) * element_bytes


def variant_count(option: int | None, varying_images: int, per_caption: int) -> int:
    """--caption_variants, or (not given) as many as keep the varying images' cache within BUDGET_BYTES, 1 to
    MOST_AUTO."""
    if option is not None:
        return option
    fits = BUDGET_BYTES // max(1, varying_images * per_caption)
    return max(1, min(MOST_AUTO, fits))
