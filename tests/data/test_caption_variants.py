"""--caption_variants: captions that vary (shuffle, tag and caption dropout, wildcards, templates) with a cached text
encoder: N drawn per image up front, one picked per step (library/data/caption_variants.py)."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

import train_network
from library.data.caption_variants import (BUDGET_BYTES, MOST_AUTO, caption_bytes, draw_variants, entry_key,
                                           plan_text_cache, variant_count)
from library.data.captions import process_caption
from library.data.specs import SubsetSpec
from library.data.subsets import ImageEntry
from library.models.family import family_named
from tests.helpers import make_image_folder, tiny_lora_flags

CAPTION = "sks dog, red collar, grass, sunny, park, running"


def _entry(name="a", caption=CAPTION, **settings) -> ImageEntry:
    subset = SubsetSpec(image_dir="/data/1_dog", **settings)
    return ImageEntry(Path(f"/data/1_dog/{name}.png"), caption, subset, is_reg=False, num_repeats=1)


def test_variants_are_drawn_by_the_caption_rules_and_depend_only_on_the_seed():
    entry = _entry(shuffle_caption=True, keep_tokens=1, caption_tag_dropout_rate=0.2)
    variants = draw_variants([entry], 8, seed=5)
    kept = variants.kept[entry_key(entry)]
    assert len(kept) == 8 and len(set(kept)) > 1  # 5 flexible tags, shuffled and dropped: they differ
    tags = CAPTION.split(", ")
    for caption in kept:
        drawn = caption.split(", ")
        assert drawn[0] == "sks dog"  # keep_tokens holds the first tag in place
        assert set(drawn) <= set(tags) and len(drawn) == len(set(drawn))
    assert draw_variants([entry], 8, seed=5).kept == variants.kept
    assert draw_variants([entry], 8, seed=6).kept != variants.kept
    assert entry_key(entry) not in variants.dropped  # this subset never drops the whole caption
    fixed = _entry(name="b")  # no augmentation: not a variant image (its one caption is cached as before)
    assert fixed not in draw_variants([entry, fixed], 4, seed=5)


def test_caption_dropout_is_decided_by_the_same_draw_as_without_the_cache():
    """Exact, not approximate: for every batch stream the pick drops exactly when process_caption would."""
    entry = _entry(shuffle_caption=True, caption_dropout_rate=0.3)
    variants = draw_variants([entry], 4, seed=0)
    dropped = 0
    for seed in range(400):
        uncached = process_caption(entry.caption, entry.subset, random.Random(seed), epoch=1)
        picked = variants.pick(entry, random.Random(seed), epoch=1)
        assert (uncached == "") == (picked == "")
        assert picked == "" or picked in variants.kept[entry_key(entry)]
        dropped += picked == ""
    assert 80 < dropped < 160  # about 30 % of 400
    every = _entry(caption_dropout_every_n_epochs=2, enable_wildcard=True, caption="{a|b} dog")
    table = draw_variants([every], 4, seed=0)
    assert table.pick(every, random.Random(1), epoch=2) == "" and table.pick(every, random.Random(1), epoch=3) != ""


def test_each_step_picks_one_of_the_variants_uniformly():
    entry = _entry(shuffle_caption=True)
    variants = draw_variants([entry], 4, seed=1)
    counts = Counter(variants.pick(entry, random.Random(i), epoch=1) for i in range(4000))
    expected = Counter(variants.kept[entry_key(entry)])  # duplicates among the draws keep their weight
    assert set(counts) == set(expected)
    for caption, times in expected.items():
        assert abs(counts[caption] / 4000 - times / 4) < 0.04


def test_a_caption_template_is_drawn_per_variant_and_around_a_dropped_caption():
    templates = ["a photo of [name], {}", "art of [name], {}", "[name] by {}"]

    def transform(caption, entry, rng):
        return rng.choice(templates).format(caption)

    entry = _entry(caption="dog", caption_dropout_rate=0.5)
    variants = draw_variants([entry], 6, seed=0, caption_transform=transform)
    assert all(c.endswith(", dog") or c.endswith("by dog") for c in variants.kept[entry_key(entry)])
    assert set(variants.dropped[entry_key(entry)]) <= {t.format("") for t in templates}
    fixed = _entry(name="b", caption="cat")  # a template makes even a fixed caption vary
    assert fixed in draw_variants([fixed], 2, seed=0, caption_transform=transform)


def test_the_default_number_fits_the_budget():
    sd1 = caption_bytes(family_named("sd1"), max_token_length=None, element_bytes=2)
    assert sd1 == 77 * 768 * 2
    assert caption_bytes(family_named("sdxl"), max_token_length=225, element_bytes=4) == (227 * 2048 + 1280) * 4
    assert variant_count(None, 100, sd1) == MOST_AUTO  # 100 images × 16 × 118 KB = 189 MB
    assert variant_count(None, 2000, sd1) == BUDGET_BYTES // (2000 * sd1) == 4
    assert variant_count(None, 10**6, sd1) == 1  # never fewer than one
    assert variant_count(3, 10**6, sd1) == 3  # the user's number wins


def test_the_cache_plan_counts_distinct_captions_and_bytes():
    varying = [_entry(name=str(i), shuffle_caption=True) for i in range(3)]
    plain = [_entry(name=f"p{i}", caption="a cat") for i in range(2)]  # one fixed caption between them
    plan = plan_text_cache([*varying, *plain], family=family_named("sd1"), max_token_length=None, element_bytes=2,
                           option=5, seed=0)
    distinct = set(plan.variants.captions())
    assert plan.fixed == ["a cat"] and set(plan.captions()) == distinct | {"a cat"}
    mib = (len(distinct) + 1) * 77 * 768 * 2 / 2**20
    assert plan.describe() == (f"text-encoder cache: 5 caption variants per image (--caption_variants) for 3 images "
                               f"whose captions vary: {len(distinct)} distinct captions, plus 1 fixed; {mib:.1f} MiB")


def test_a_run_with_shuffled_dropped_captions_trains_from_the_cache_alone(tmp_path, capsys):
    """The text encoders are released (meta) after the cache is filled: any caption a step or a validation batch
    took outside the cache would have to be encoded and would fail. Variants come from the run's seed."""
    data = make_image_folder(tmp_path / "train", count=4, repeats=3).parent
    flags = ["--network_train_unet_only", "--cache_text_encoder_outputs", "--shuffle_caption",
             "--caption_dropout_rate", "0.3", "--caption_variants", "3", "--validation_split", "0.25",
             "--validate_every_n_steps", "3"]
    result = train_network.main(tiny_lora_flags(data, tmp_path / "out", *flags, steps=6, seed=4))
    out = capsys.readouterr().out
    assert "text-encoder cache: 3 caption variants per image (--caption_variants) for 4 images" in out
    assert "text encoders released" in out
    assert all(p.is_meta for te in result.method.parts.text_encoders for p in te.parameters())
    variants = result.method.caption_variants
    assert variants.count == 3 and len(variants.kept) == 4  # three training images and the held-out one
    assert all(caption in result.method._text_cache for caption in variants.captions())
    assert result.final_file.is_file()


def test_the_dry_run_shows_the_cache_size(tmp_path, capsys):
    data = make_image_folder(tmp_path / "train", count=3).parent
    train_network.main(["--dry_run", "--train_data_dir", str(data), "--caption_extension", ".txt",
                        "--network_train_unet_only", "--cache_text_encoder_outputs", "--caption_tag_dropout_rate",
                        "0.5", "--mixed_precision", "bf16", "--seed", "1"])
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("text-encoder cache:"))
    assert f"{MOST_AUTO} caption variants per image (auto: within 1024 MiB) for 3 images" in line
    distinct = int(line.split("vary: ")[1].split(" distinct")[0])
    assert 3 <= distinct <= 3 * MOST_AUTO
    assert line.endswith(f"{distinct * 77 * 768 * 2 / 2**20:.1f} MiB")


@pytest.mark.parametrize("flags", [["--cache_text_encoder_outputs_to_disk"],
                                   ["--cache_text_encoder_outputs", "--caption_variants", "0"]])
def test_disk_caches_and_zero_variants_still_refuse_shuffling(tmp_path, flags):
    data = make_image_folder(tmp_path / "train", count=1).parent
    with pytest.raises(SystemExit) as err:
        train_network.main(tiny_lora_flags(data, tmp_path / "out", "--network_train_unet_only", "--shuffle_caption",
                                           *flags, steps=1))
    assert err.value.code == 2
