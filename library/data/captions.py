"""Caption text as sd-scripts builds it: reading, fallbacks, per-step processing and tag statistics (pure)."""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

from library.data.specs import SubsetSpec

# `{a|b|c}`; like sd-scripts' pattern the body may contain "{" but not "}".
_WILDCARD = re.compile(r"\{([^}]+)\}")
_ESCAPE_OPEN = "⦅"
_ESCAPE_CLOSE = "⦆"

Replacement = str | Sequence[str]


class TagParts(NamedTuple):
    """A caption split for keep_tokens: `fixed` and `fixed_suffix` never move or drop, `flexible` may."""

    fixed: list[str]
    flexible: list[str]
    fixed_suffix: list[str]


def process_caption(
    caption: str,
    subset: SubsetSpec,
    rng: random.Random,
    *,
    epoch: int = 0,
    step: int = 0,
    max_train_steps: int = 0,
    replacements: Mapping[str, Replacement] | None = None,
) -> str:
    """Return the caption one training step sees, as sd-scripts' `BaseDataset.process_caption` builds it.

    Order: prefix/suffix → caption dropout → wildcards or first line → (when shuffle, token warmup or tag
    dropout is on) split into fixed/flexible/fixed-suffix tags, warmup, shuffle, tag dropout, join with ", "
    → secondary_separator replaced by caption_separator → textual-inversion `replacements` (none of these
    after a drop: a dropped caption is "" as in sd-scripts).

    `epoch` is sd-scripts' 1-based training epoch (its loop sets `current_epoch.value = epoch + 1`; 0 is the
    value before training starts, and `0 % n == 0` drops it). `step` is the global optimizer step.

    Randomness: sd-scripts draws from the global `random` module, in this order and only when the feature
    is on: `random.random()` for caption dropout (only if caption_dropout_rate > 0, and even when the
    epoch rule would drop anyway); `random.choice` of a line of a multi-line caption (enable_wildcard);
    `random.choice` per `{…}` group, left to right; `random.shuffle(flexible tags)`; `random.random()` per
    flexible tag for tag dropout; `random.choice` for a list replacement. We make exactly those calls on
    `rng` in that order, so `random.Random(s)` gives what sd-scripts gives after `random.seed(s)` when
    nothing else draws in between (sd-scripts' image augmentations share that global stream).
    """
    caption = _add_prefix_suffix(caption, subset)
    if caption_dropped(subset, rng, epoch):
        return ""
    if subset.enable_wildcard:
        caption = _expand_wildcards(caption, rng)
    else:
        caption = caption.split("\n")[0]

    warmup_steps = resolve_warmup_steps(subset.token_warmup_step, max_train_steps)
    if subset.shuffle_caption or warmup_steps > 0 or subset.caption_tag_dropout_rate > 0:
        caption = _rearrange_tags(caption, subset, rng, step, warmup_steps)

    if subset.secondary_separator:
        caption = caption.replace(subset.secondary_separator, subset.caption_separator)
    if replacements:
        caption = _apply_replacements(caption, replacements, rng)
    return caption


def _add_prefix_suffix(caption: str, subset: SubsetSpec) -> str:
    # Space-joined, not separator-joined: "sks" + "dog, cat" is the single first tag "sks dog".
    if subset.caption_prefix:
        caption = subset.caption_prefix + " " + caption
    if subset.caption_suffix:
        caption = caption + " " + subset.caption_suffix
    return caption


def caption_dropped(subset: SubsetSpec, rng: random.Random, epoch: int) -> bool:
    """Whether this step's caption is dropped (caption_dropout_rate, caption_dropout_every_n_epochs): the first draw
    process_caption makes, made only when the rate is on."""
    # The rate draw comes first and happens whenever the rate is on, so the stream matches sd-scripts.
    dropped = subset.caption_dropout_rate > 0 and rng.random() < subset.caption_dropout_rate
    every_n = subset.caption_dropout_every_n_epochs
    return dropped or (every_n > 0 and epoch % every_n == 0)


def _escape_markers(caption: str) -> tuple[str, str]:
    # sd-scripts' rule (grow both markers until neither occurs); kept so odd captions escape identically.
    opener, closer = _ESCAPE_OPEN, _ESCAPE_CLOSE
    while opener in caption or closer in caption:
        opener += _ESCAPE_OPEN
        closer += _ESCAPE_CLOSE
    return opener, closer


def _expand_wildcards(caption: str, rng: random.Random) -> str:
    """Pick one line of a multi-line caption, then one option of each `{a|b}`; `{{`/`}}` are literal braces."""
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    opener, closer = _escape_markers(caption)
    caption = caption.replace("{{", opener).replace("}}", closer)
    caption = _WILDCARD.sub(lambda match: rng.choice(match.group(1).split("|")), caption)
    return caption.replace(opener, "{").replace(closer, "}")


def split_tags(caption: str, subset: SubsetSpec) -> TagParts:
    """Split on caption_separator into fixed / flexible / fixed-suffix tags, as sd-scripts does.

    With keep_tokens_separator present, text before its first occurrence is fixed and text after a second
    occurrence is a fixed suffix; keep_tokens is then ignored and empty tags are dropped. Otherwise the
    first keep_tokens tags are fixed and empty tags are kept (so "a,,b" stays three tags).
    """
    separator = subset.caption_separator
    keep_separator = subset.keep_tokens_separator
    if keep_separator and keep_separator in caption:
        fixed_text, _, flexible_text = caption.partition(keep_separator)
        suffix_text = ""
        if keep_separator in flexible_text:
            flexible_text, _, suffix_text = flexible_text.partition(keep_separator)
        return TagParts(
            _non_empty_tags(fixed_text, separator),
            _non_empty_tags(flexible_text, separator),
            _non_empty_tags(suffix_text, separator),
        )
    tags = [tag.strip() for tag in caption.strip().split(separator)]
    if subset.keep_tokens > 0:
        return TagParts(tags[: subset.keep_tokens], tags[subset.keep_tokens :], [])
    return TagParts([], tags, [])


def _non_empty_tags(text: str, separator: str) -> list[str]:
    return [tag.strip() for tag in text.split(separator) if tag.strip()]


def resolve_warmup_steps(token_warmup_step: float, max_train_steps: int) -> float:
    """Warmup length in steps: a value below 1 is a fraction of max_train_steps, floored (0 = no warmup).

    sd-scripts does this by overwriting `subset.token_warmup_step` on the first caption it processes; we
    compute it each time instead, which equals its value on every later call.
    """
    if token_warmup_step < 1:
        return math.floor(token_warmup_step * max_train_steps)
    return token_warmup_step


def warmup_tags(flexible: list[str], token_warmup_min: int, warmup_steps: float, step: int) -> list[str]:
    """Keep the first tags of `flexible` (before shuffling), growing from token_warmup_min to all over warmup."""
    if not warmup_steps or step >= warmup_steps:
        return flexible
    # Same expression and operation order as sd-scripts so float rounding lands on the same integer.
    count = math.floor(step * ((len(flexible) - token_warmup_min) / warmup_steps)) + token_warmup_min
    return flexible[:count]


def _rearrange_tags(caption: str, subset: SubsetSpec, rng: random.Random, step: int, warmup_steps: float) -> str:
    fixed, flexible, fixed_suffix = split_tags(caption, subset)
    flexible = warmup_tags(flexible, subset.token_warmup_min, warmup_steps, step)
    if subset.shuffle_caption:
        rng.shuffle(flexible)
    rate = subset.caption_tag_dropout_rate
    if rate > 0:
        flexible = [tag for tag in flexible if rng.random() >= rate]
    # Always ", " — sd-scripts does not rejoin with caption_separator.
    return ", ".join(fixed + flexible + fixed_suffix)


def _apply_replacements(caption: str, replacements: Mapping[str, Replacement], rng: random.Random) -> str:
    # Textual inversion: key "" replaces the whole caption (a list: one random template); other keys are
    # substring swaps to a string, in mapping order.
    for old, new in replacements.items():
        if old == "":
            caption = new if isinstance(new, str) else rng.choice(list(new))
        else:
            caption = caption.replace(old, new)
    return caption


def caption_from_lines(lines: Sequence[str], enable_wildcard: bool) -> str:
    """A caption file's text as sd-scripts reads it (`read_caption`), given `f.readlines()` of it.

    Without wildcards: the first line, stripped (a blank first line gives "", not the class tokens).
    With wildcards: every non-blank line, stripped, joined with "\\n" for process_caption to pick from.
    A file with no lines at all gives "" (sd-scripts stops with an assertion; the reader reports it instead).
    """
    if not lines:
        return ""
    if enable_wildcard:
        return "\n".join(line.strip() for line in lines if line.strip() != "")
    return lines[0].strip()


def fallback_caption(caption: str | None, subset: SubsetSpec) -> str:
    """The caption of an image: its own, else class_tokens, else "" (sd-scripts' DreamBooth loader).

    Only a missing caption (`None`) falls back; an empty string is kept, as sd-scripts keeps it.
    """
    if caption is not None:
        return caption
    return subset.class_tokens if subset.class_tokens is not None else ""


def metadata_caption(caption: str | None, tags: str | None, subset: SubsetSpec) -> tuple[str, str | None]:
    """Combine a fine-tuning metadata entry's caption and tags as sd-scripts' `FineTuningDataset` does.

    Returns the caption and the tags string that goes into `ss_tag_frequency` (None when sd-scripts
    records nothing: with wildcards, with empty tags, or when the entry had tags but no caption).
    """
    separator = subset.caption_separator
    if caption is None:
        caption, tags = tags, None
    recorded = None
    if subset.enable_wildcard:
        if tags is not None:
            # Tags become one line, then follow every non-blank caption line so any picked line has them.
            tags = tags.replace("\n", separator)
        if caption is not None and tags is not None:
            lines = [line for line in caption.split("\n") if line.strip() != ""]
            caption = "\n".join(f"{line}{separator}{tags}" for line in lines)
    elif tags:
        caption = caption + separator + tags
        recorded = tags
    return ("" if caption is None else caption), recorded


def tag_frequency(captions: Iterable[str], separator: str = ",") -> dict[str, int]:
    """Lower-cased tag counts in first-seen order, as sd-scripts' `set_tag_frequency` (for `ss_tag_frequency`).

    sd-scripts always splits on "," there, whatever caption_separator is; pass another separator only
    on purpose. Tags are stripped before lower-casing; empty tags are not counted.
    """
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in caption.split(separator):
            tag = tag.strip()
            if tag:
                tag = tag.lower()
                counts[tag] = counts.get(tag, 0) + 1
    return counts
