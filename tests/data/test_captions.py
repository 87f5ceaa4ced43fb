"""Caption pipeline: expectations worked out by hand from sd-scripts' `process_caption` and friends."""

from __future__ import annotations

import random


from library.data.captions import (
    caption_from_lines,
    fallback_caption,
    metadata_caption,
    process_caption,
    resolve_warmup_steps,
    split_tags,
    tag_frequency,
)
from library.data.specs import SubsetSpec

SEEDS = range(20)


def run(caption: str, seed: int = 0, **kwargs) -> str:
    """Process `caption` with a subset built from the caption keyword arguments."""
    options = {key: kwargs.pop(key) for key in ("epoch", "step", "max_train_steps", "replacements") if key in kwargs}
    return process_caption(caption, SubsetSpec(**kwargs), random.Random(seed), **options)


def tags_of(caption: str) -> list[str]:
    return caption.split(", ")


# --- keep_tokens / keep_tokens_separator / shuffle -------------------------------------------------


def test_keep_tokens_with_shuffle_keeps_first_tag_and_permutes_rest():
    orders = set()
    for seed in SEEDS:
        tags = tags_of(run("a, b, c, d, e", seed, shuffle_caption=True, keep_tokens=1))
        assert tags[0] == "a"
        assert sorted(tags[1:]) == ["b", "c", "d", "e"]
        orders.add(tuple(tags[1:]))
    assert len(orders) > 5  # really shuffled, not a fixed order


def test_keep_tokens_alone_leaves_caption_untouched():
    # keep_tokens only matters inside shuffle/warmup/tag-dropout; nothing is split or stripped otherwise.
    assert run("  a ,b,,c  ", keep_tokens=1) == "  a ,b,,c  "


def test_split_on_keep_tokens_strips_but_keeps_empty_tags():
    parts = split_tags("  a ,b,,c  ", SubsetSpec(keep_tokens=2))
    assert parts == (["a", "b"], ["", "c"], [])
    # shuffling two tags where one is empty: the joined text shows the empty tag either way
    results = {run("a,b,,c", seed, shuffle_caption=True, keep_tokens=2) for seed in SEEDS}
    assert results == {"a, b, , c", "a, b, c, "}


def test_keep_tokens_separator_with_fixed_suffix():
    middles = set()
    for seed in SEEDS:
        result = run("a, b ||| c, d ||| e, f", seed, shuffle_caption=True, keep_tokens_separator="|||")
        assert result.startswith("a, b, ") and result.endswith(", e, f")
        middle = result[len("a, b, ") : -len(", e, f")]
        assert middle in {"c, d", "d, c"}
        middles.add(middle)
    assert middles == {"c, d", "d, c"}


def test_keep_tokens_separator_drops_empty_tags_and_ignores_keep_tokens():
    subset = SubsetSpec(keep_tokens=5, keep_tokens_separator="|||")
    assert split_tags(" a,, ||| b,, c , ", subset) == (["a"], ["b", "c"], [])
    # a third separator stays inside the suffix text
    assert split_tags("a|||b|||c|||d", subset) == (["a"], ["b"], ["c|||d"])


def test_keep_tokens_separator_absent_falls_back_to_keep_tokens():
    assert split_tags("a, b, c", SubsetSpec(keep_tokens=1, keep_tokens_separator="|||")) == (["a"], ["b", "c"], [])


def test_other_caption_separator_still_joins_with_comma_space():
    assert run("a;b ; c", shuffle_caption=True, keep_tokens=3, caption_separator=";") == "a, b, c"


# --- prefix / suffix ----------------------------------------------------------------------------------


def test_prefix_is_space_joined_before_keep_tokens_counts():
    # "sks" + " " + "dog, cat, tree": the prefix merges into the first tag, which keep_tokens=1 keeps.
    for seed in SEEDS:
        tags = tags_of(run("dog, cat, tree", seed, shuffle_caption=True, keep_tokens=1, caption_prefix="sks"))
        assert tags[0] == "sks dog"
        assert sorted(tags[1:]) == ["cat", "tree"]
    # with its own separator the prefix is a tag of its own and takes the kept slot
    for seed in SEEDS:
        tags = tags_of(run("dog, cat, tree", seed, shuffle_caption=True, keep_tokens=1, caption_prefix="sks,"))
        assert tags[0] == "sks"
        assert sorted(tags[1:]) == ["cat", "dog", "tree"]


def test_prefix_and_suffix_without_tag_processing():
    assert run("dog", caption_prefix="photo of", caption_suffix="best quality") == "photo of dog best quality"
    # nothing strips the space next to an empty caption
    assert run("", caption_prefix="sks") == "sks "


def test_suffix_carrying_keep_tokens_separator_becomes_fixed_suffix():
    suffixes = set()
    for seed in SEEDS:
        result = run(
            "sks ||| red, blue, green",
            seed,
            shuffle_caption=True,
            keep_tokens_separator="|||",
            caption_suffix="||| masterpiece",
        )
        tags = tags_of(result)
        assert tags[0] == "sks" and tags[-1] == "masterpiece"
        assert sorted(tags[1:-1]) == ["blue", "green", "red"]
        suffixes.add(tuple(tags[1:-1]))
    assert len(suffixes) > 1


# --- caption dropout ----------------------------------------------------------------------------------


def test_caption_dropout_every_n_epochs_drops_exactly_multiples():
    dropped = [epoch for epoch in range(1, 10) if run("a, b", epoch=epoch, caption_dropout_every_n_epochs=3) == ""]
    assert dropped == [3, 6, 9]
    # sd-scripts' epochs are 1-based during training; its pre-training value 0 is also a multiple
    assert run("a, b", epoch=0, caption_dropout_every_n_epochs=3) == ""


def test_caption_dropout_rate_one_drops_everything_before_any_other_step():
    for seed in SEEDS:
        assert run("{x|y}, b", seed, caption_dropout_rate=1.0, caption_prefix="p", secondary_separator=",") == ""
    assert run("a", caption_dropout_rate=0.0) == "a"


def test_caption_dropout_rate_half_drops_some():
    results = [run("a", seed, caption_dropout_rate=0.5) for seed in range(40)]
    assert 5 < results.count("") < 35 and set(results) == {"", "a"}


def test_zero_dropout_rate_does_not_draw():
    rng = random.Random(7)
    process_caption("a, b", SubsetSpec(caption_dropout_every_n_epochs=2), rng, epoch=1)
    assert rng.random() == random.Random(7).random()


def test_dropout_rate_draws_even_when_epoch_rule_drops():
    # sd-scripts evaluates the rate draw first, so the stream advances by one either way
    rng = random.Random(7)
    subset = SubsetSpec(caption_dropout_rate=0.1, caption_dropout_every_n_epochs=2)
    assert process_caption("a, b", subset, rng, epoch=2) == ""
    mirror = random.Random(7)
    mirror.random()
    assert rng.random() == mirror.random()


# --- tag dropout --------------------------------------------------------------------------------------


def test_tag_dropout_keeps_fixed_tags():
    for seed in SEEDS:
        tags = tags_of(run("a, b, c, d, e, f", seed, keep_tokens=2, caption_tag_dropout_rate=0.5))
        assert tags[:2] == ["a", "b"]
        assert set(tags[2:]) <= {"c", "d", "e", "f"}
    assert run("a, b, c, d", keep_tokens=2, caption_tag_dropout_rate=1.0) == "a, b"
    assert run("a ||| b, c ||| d", keep_tokens_separator="|||", caption_tag_dropout_rate=1.0) == "a, d"
    assert run("a, b, c", caption_tag_dropout_rate=1.0) == ""


def test_tag_dropout_drops_some_flexible_tags():
    lengths = {len(tags_of(run("a, b, c, d, e, f", seed, caption_tag_dropout_rate=0.5))) for seed in SEEDS}
    assert len(lengths) > 2


# --- token warmup -------------------------------------------------------------------------------------

TEN = "k, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10"


def test_token_warmup_integer_steps():
    # flexible = t1..t10, min 1, over 9 steps: floor(step * (10 - 1) / 9) + 1 tags
    warm = {"keep_tokens": 1, "token_warmup_min": 1, "token_warmup_step": 9}
    assert run(TEN, step=0, **warm) == "k, t1"
    assert run(TEN, step=3, **warm) == "k, t1, t2, t3, t4"
    assert run(TEN, step=8, **warm) == "k, t1, t2, t3, t4, t5, t6, t7, t8, t9"
    assert run(TEN, step=9, **warm) == TEN


def test_token_warmup_fractional_step_is_share_of_max_train_steps():
    # 0.5 of 20 steps = 10 warmup steps: at step 5, floor(5 * 9 / 10) + 1 = 5 flexible tags
    warm = {"keep_tokens": 1, "token_warmup_min": 1, "token_warmup_step": 0.5, "max_train_steps": 20}
    assert run(TEN, step=0, **warm) == "k, t1"
    assert run(TEN, step=5, **warm) == "k, t1, t2, t3, t4, t5"
    assert run(TEN, step=10, **warm) == TEN
    assert resolve_warmup_steps(0.5, 20) == 10
    assert resolve_warmup_steps(0.01, 50) == 0  # floor(0.5): no warmup at all


def test_token_warmup_min_counts_flexible_tags_and_precedes_shuffle():
    warm = {"keep_tokens": 1, "token_warmup_min": 3, "token_warmup_step": 9, "shuffle_caption": True}
    orders = set()
    for seed in SEEDS:
        tags = tags_of(run(TEN, seed, step=0, **warm))
        assert tags[0] == "k"
        assert sorted(tags[1:]) == ["t1", "t2", "t3"]  # the first three, shuffled, never later ones
        orders.add(tuple(tags[1:]))
    assert len(orders) > 1


def test_warmup_that_resolves_to_zero_does_not_split():
    assert run(" a ,b", token_warmup_step=0.01, max_train_steps=50) == " a ,b"


# --- wildcards ----------------------------------------------------------------------------------------


def test_wildcard_produces_each_option():
    results = {run("a {red|blue} ball", seed, enable_wildcard=True) for seed in SEEDS}
    assert results == {"a red ball", "a blue ball"}


def test_wildcard_disabled_keeps_braces():
    assert run("a {red|blue} ball") == "a {red|blue} ball"


def test_wildcard_double_braces_are_literal():
    assert run("{{x}} {a}", enable_wildcard=True) == "{x} a"
    results = {run("{{ {a|b} }}", seed, enable_wildcard=True) for seed in SEEDS}
    assert results == {"{ a }", "{ b }"}


def test_multiline_caption_picks_a_line_with_wildcard_first_line_without():
    caption = "one\ntwo\nthree"
    assert {run(caption, seed, enable_wildcard=True) for seed in SEEDS} == {"one", "two", "three"}
    assert {run(caption, seed) for seed in SEEDS} == {"one"}


def test_prefix_and_suffix_attach_to_first_and_last_line_only():
    # prefix/suffix are added to the whole text before a line is picked
    results = {run("one\ntwo", seed, enable_wildcard=True, caption_prefix="p", caption_suffix="s") for seed in SEEDS}
    assert results == {"p one", "two s"}


# --- secondary separator ------------------------------------------------------------------------------


def test_secondary_separator_keeps_joined_tags_together_while_shuffling():
    seen = set()
    for seed in SEEDS:
        result = run("a;;;b, c, d", seed, shuffle_caption=True, secondary_separator=";;;")
        assert sorted(tags_of(result)) == ["a,b", "c", "d"]
        seen.add(result)
    assert len(seen) > 2


def test_secondary_separator_applies_without_shuffle():
    assert run("a;;;b, c", secondary_separator=";;;") == "a,b, c"
    assert run("a;;;b; c", secondary_separator=";;;", caption_separator=";") == "a;b; c"


# --- reproducibility and draw order -------------------------------------------------------------------


def test_same_seed_same_result_different_seeds_differ():
    options = {"shuffle_caption": True, "caption_tag_dropout_rate": 0.2, "enable_wildcard": True}
    caption = "{x|y}, a, b, c, d, e, f"
    assert run(caption, 123, **options) == run(caption, 123, **options)
    assert len({run(caption, seed, **options) for seed in range(30)}) > 20


def test_draws_follow_sd_scripts_order():
    # The sd-scripts compatibility contract: dropout draw, line choice, group choice, shuffle, tag drops.
    subset = SubsetSpec(
        caption_dropout_rate=0.01, enable_wildcard=True, shuffle_caption=True, caption_tag_dropout_rate=0.3
    )
    for seed in SEEDS:
        mirror = random.Random(seed)
        dropped = mirror.random() < 0.01
        line = mirror.choice(["{p|q}, a, b, c", "{p|q}, d, e, f"])
        tags = [mirror.choice(["p", "q"])] + line.split(", ")[1:]
        mirror.shuffle(tags)
        tags = [tag for tag in tags if mirror.random() >= 0.3]
        expected = "" if dropped else ", ".join(tags)
        assert process_caption("{p|q}, a, b, c\n{p|q}, d, e, f", subset, random.Random(seed)) == expected


def test_replacements_apply_after_processing_and_not_to_dropped_captions():
    replacements = {"sks": "sks sks1"}
    assert run("sks, dog", replacements=replacements) == "sks sks1, dog"
    templates = {"": ["a photo of sks", "a rendering of sks"]}
    assert {run("ignored", seed, replacements=templates) for seed in SEEDS} == set(templates[""])
    assert run("sks", replacements=templates, caption_dropout_rate=1.0) == ""


# --- reading, fallback, metadata, tag frequency ---------------------------------------------------------


def test_caption_from_lines():
    assert caption_from_lines([" a, b \n", "c\n"], enable_wildcard=False) == "a, b"
    assert caption_from_lines(["  \n", "c\n"], enable_wildcard=False) == ""
    assert caption_from_lines([" a \n", "\n", " b\n"], enable_wildcard=True) == "a\nb"
    # an empty caption file trains with the empty caption (sd-scripts stops the run; the reader names the file)
    assert caption_from_lines([], enable_wildcard=False) == ""
    assert caption_from_lines([], enable_wildcard=True) == ""


def test_fallback_caption():
    assert fallback_caption(None, SubsetSpec(class_tokens="sks dog")) == "sks dog"
    assert fallback_caption(None, SubsetSpec()) == ""
    assert fallback_caption("a cat", SubsetSpec(class_tokens="sks dog")) == "a cat"
    # sd-scripts keeps an empty caption read from a file; only a missing file falls back
    assert fallback_caption("", SubsetSpec(class_tokens="sks dog")) == ""


def test_metadata_caption():
    plain = SubsetSpec()
    assert metadata_caption("a cat", "red, fluffy", plain) == ("a cat,red, fluffy", "red, fluffy")
    assert metadata_caption(None, "red, fluffy", plain) == ("red, fluffy", None)
    assert metadata_caption("a cat", "", plain) == ("a cat", None)
    assert metadata_caption(None, None, plain) == ("", None)
    wild = SubsetSpec(enable_wildcard=True)
    assert metadata_caption("one\n\ntwo", "x\ny", wild) == ("one,x,y\ntwo,x,y", None)


def test_tag_frequency():
    counts = tag_frequency(["Red, blue ,, RED", "blue", ""])
    assert counts == {"red": 2, "blue": 2}
    assert list(counts) == ["red", "blue"]
    assert tag_frequency(["a;b", "A"], separator=";") == {"a": 2, "b": 1}
