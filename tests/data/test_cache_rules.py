"""Cache option checks: each impossible combination is refused up front, naming the subset, the option and why."""

from __future__ import annotations

import pytest

from library.data.cache_rules import check_cache_options, normalize_cache_options
from library.data.specs import SubsetSpec
from library.errors import UserError

PLAIN = SubsetSpec(image_dir="/data/10_sks dog")

PIXEL_CASES = [
    ({"color_aug": True}, "color_aug", "colours"),
    ({"random_crop": True}, "random_crop", "new crop"),
    ({"face_crop_aug_range": (2.0, 4.0)}, "face_crop_aug_range", "around the face"),
]
CAPTION_CASES = [
    ({"shuffle_caption": True}, "shuffle_caption", "reorders"),
    ({"caption_dropout_rate": 0.1}, "caption_dropout_rate", "drops the whole caption"),
    ({"caption_dropout_every_n_epochs": 3}, "caption_dropout_every_n_epochs", "every n epochs"),
    ({"caption_tag_dropout_rate": 0.2}, "caption_tag_dropout_rate", "drops tags"),
    ({"token_warmup_step": 0.5}, "token_warmup_step", "warm-up"),
    ({"enable_wildcard": True}, "enable_wildcard", "alternative"),
]


@pytest.mark.parametrize("flag", ["cache_latents", "cache_latents_to_disk"])
@pytest.mark.parametrize("setting, name, reason", PIXEL_CASES)
def test_latent_cache_refuses_pixel_augmentations(flag, setting, name, reason):
    subset = SubsetSpec(image_dir="/data/10_sks dog", **setting)
    with pytest.raises(UserError) as err:
        check_cache_options({flag: True}, [PLAIN, subset])
    message = str(err.value)
    assert f"{flag} cannot be used with {name}" in message
    assert "image_dir = '/data/10_sks dog'" in message and reason in message
    assert f"drop {name} from that subset or turn off {flag}" in message and "\n" not in message
    check_cache_options({flag: False}, [subset])  # fine without the cache


@pytest.mark.parametrize("options", [{"cache_text_encoder_outputs_to_disk": True},
                                     {"cache_text_encoder_outputs": True, "caption_variants": 0}],
                         ids=["to_disk", "variants_0"])
@pytest.mark.parametrize("setting, name, reason", CAPTION_CASES)
def test_text_cache_refuses_changing_captions(options, setting, name, reason):
    """On disk (one file per image) or with --caption_variants 0, every caption augmentation is refused, as in
    sd-scripts; the disk message points at the in-memory cache, which keeps all but token warm-up."""
    flag = next(iter(options))
    subset = SubsetSpec(metadata_file="/data/meta.json", **setting)
    with pytest.raises(UserError) as err:
        check_cache_options(options, [subset])
    message = str(err.value)
    assert f"{flag} cannot be used with {name}" in message
    assert "metadata_file = '/data/meta.json'" in message and reason in message
    assert f"drop {name} from that subset" in message
    assert ("--caption_variants" in message) == (flag.endswith("to_disk") and name != "token_warmup_step")
    check_cache_options({"cache_latents": True}, [subset])  # captions do not matter to the latent cache


@pytest.mark.parametrize("setting, name, reason", CAPTION_CASES)
def test_in_memory_text_cache_keeps_caption_augmentations_as_variants(setting, name, reason):
    """--cache_text_encoder_outputs in memory (caption_variants unset or N) accepts every augmentation a fixed set
    of drawn captions can show; token warm-up grows captions with the step and stays refused."""
    subset = SubsetSpec(metadata_file="/data/meta.json", **setting)
    for variants in (None, 4):
        options = {"cache_text_encoder_outputs": True, "caption_variants": variants}
        if name == "token_warmup_step":
            with pytest.raises(UserError, match=f"cannot be used with {name}.*{reason}"):
                check_cache_options(options, [subset])
        else:
            check_cache_options(options, [subset])


def test_text_cache_refuses_a_trained_text_encoder():
    with pytest.raises(UserError, match="text encoder is trained.*network_train_unet_only"):
        check_cache_options({"cache_text_encoder_outputs": True, "text_encoder_trained": True}, [PLAIN])
    check_cache_options({"cache_text_encoder_outputs": True, "text_encoder_trained": False}, [PLAIN])


def test_both_flags_set_are_both_named():
    subset = SubsetSpec(image_dir="/x", color_aug=True)
    with pytest.raises(UserError, match="^cache_latents and cache_latents_to_disk cannot be used with color_aug"):
        check_cache_options({"cache_latents": True, "cache_latents_to_disk": True}, [subset])


def test_settings_that_do_nothing_are_accepted():
    quiet = SubsetSpec(image_dir="/x", flip_aug=True, alpha_mask=True, keep_tokens=2, caption_dropout_rate=0.0,
                       token_warmup_step=0.0, caption_prefix="photo of")
    check_cache_options({"cache_latents": True, "cache_text_encoder_outputs": True}, [quiet])
    check_cache_options({}, [SubsetSpec(image_dir="/x", color_aug=True, shuffle_caption=True)])


def test_vae_batch_size_must_be_positive():
    with pytest.raises(UserError, match="vae_batch_size is 0"):
        check_cache_options({"cache_latents": True, "vae_batch_size": 0}, [PLAIN])


def test_to_disk_implies_in_memory_flag_like_sd_scripts():
    options = {"cache_latents_to_disk": True, "cache_text_encoder_outputs_to_disk": True, "other": 1}
    assert normalize_cache_options(options) == {**options, "cache_latents": True, "cache_text_encoder_outputs": True}
    assert "cache_latents" not in options  # the caller's mapping is left alone
    assert normalize_cache_options({"cache_latents": False}) == {"cache_latents": False}
