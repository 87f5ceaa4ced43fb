"""Up-front checks of the cache options against the subsets: refuse combinations whose effect the cache would erase."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from library.data.specs import SubsetSpec
from library.errors import UserError

# Subset settings that change the pixels every epoch, which latents encoded once cannot show. sd-scripts'
# is_latent_cacheable refuses color_aug and random_crop; it silently skips face_crop_aug_range on cached latents,
# which we refuse too rather than let an augmentation do nothing.
_PIXEL_AUGMENTATIONS = {
    "color_aug": "changes the colours every epoch",
    "random_crop": "picks a new crop every epoch",
    "face_crop_aug_range": "picks a new crop around the face every epoch",
}

# Subset settings that change the caption per step, which outputs encoded once cannot show. sd-scripts'
# is_text_encoder_output_cacheable lists caption_dropout_rate, shuffle_caption, token_warmup_step and
# caption_tag_dropout_rate; the other two vary the caption just as much.
_CAPTION_AUGMENTATIONS = {
    "shuffle_caption": "reorders the tags every step",
    "caption_dropout_rate": "drops the whole caption at random",
    "caption_dropout_every_n_epochs": "drops the caption every n epochs",
    "caption_tag_dropout_rate": "drops tags at random",
    "token_warmup_step": "grows the caption during warm-up",
    "enable_wildcard": "picks a new {a|b} alternative every step",
}

_GROWING_CAPTIONS = {"token_warmup_step": _CAPTION_AUGMENTATIONS["token_warmup_step"]}
# What --caption_variants keeps working with an in-memory cache.
_VARIANT_AUGMENTATIONS = set(_CAPTION_AUGMENTATIONS) - set(_GROWING_CAPTIONS)
_VARIANTS_HINT = (" (--cache_text_encoder_outputs alone, in memory, keeps it: --caption_variants caches a few "
                  "variants of each caption)")


def normalize_cache_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """A copy where the *_to_disk flags imply their in-memory flag, as sd-scripts' verify_training_args sets
    cache_latents for cache_latents_to_disk (and the SDXL checks cache_text_encoder_outputs for its _to_disk)."""
    out = dict(options)
    if out.get("cache_latents_to_disk"):
        out["cache_latents"] = True
    if out.get("cache_text_encoder_outputs_to_disk"):
        out["cache_text_encoder_outputs"] = True
    return out


def check_cache_options(options: Mapping[str, Any], subsets: Iterable[SubsetSpec]) -> None:
    """Raise UserError, naming the subset and the option to drop, for a cache that would erase a setting's effect.

    `options` holds cache_latents, cache_latents_to_disk, cache_text_encoder_outputs,
    cache_text_encoder_outputs_to_disk, vae_batch_size and text_encoder_trained (True when the text encoder or an
    adapter on it is trained, e.g. LoRA without network_train_unet_only); missing keys count as off.
    """
    flags = normalize_cache_options(options)
    if flags.get("vae_batch_size") is not None and flags["vae_batch_size"] < 1:
        raise UserError(f"vae_batch_size is {flags['vae_batch_size']}; set it to 1 or more")
    subsets = list(subsets)
    if flags.get("cache_latents"):
        latent_flag = _set_flags(options, "cache_latents", "cache_latents_to_disk")
        _refuse(subsets, latent_flag, _PIXEL_AUGMENTATIONS, "latents are encoded once")
    if flags.get("cache_text_encoder_outputs"):
        te_flag = _set_flags(options, "cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk")
        if flags.get("text_encoder_trained"):
            raise UserError(f"{te_flag} cannot be used while the text encoder is trained: cached outputs would never "
                            "see its updates; set network_train_unet_only (or stop training the text encoder), "
                            f"or turn off {te_flag}")
        if flags.get("cache_text_encoder_outputs_to_disk") or flags.get("caption_variants") == 0:
            _refuse(subsets, te_flag, _CAPTION_AUGMENTATIONS, "text-encoder outputs are encoded once per caption",
                    hint=_VARIANTS_HINT if flags.get("caption_variants") != 0 else "")
        else:  # --caption_variants: a bounded set of each varying caption is cached; only warm-up cannot be
            _refuse(subsets, te_flag, _GROWING_CAPTIONS, "text-encoder outputs are cached for a fixed set of captions")


def _refuse(subsets: list[SubsetSpec], flag: str, settings: dict[str, str], why: str, hint: str = "") -> None:
    for subset in subsets:
        for name, effect in settings.items():
            if _is_on(getattr(subset, name)):
                raise UserError(f"{flag} cannot be used with {name} in subset {_where(subset)}: {name} {effect} but "
                                f"{why}; drop {name} from that subset or turn off {flag}"
                                + (hint if name in _VARIANT_AUGMENTATIONS else ""))


def _is_on(value: Any) -> bool:
    """True for a setting that does something: a true flag, a positive rate or count, a face-crop range."""
    if isinstance(value, bool) or value is None:
        return bool(value)
    if isinstance(value, (int, float)):
        return value > 0
    return True


def _where(subset: SubsetSpec) -> str:
    if subset.image_dir is not None:
        return f"image_dir = {subset.image_dir!r}"
    return f"metadata_file = {subset.metadata_file!r}"


def _set_flags(options: Mapping[str, Any], memory_flag: str, disk_flag: str) -> str:
    """The flag(s) the user actually set, so the message names what to turn off."""
    named = [flag for flag in (memory_flag, disk_flag) if options.get(flag)]
    return " and ".join(named) or memory_flag
