"""Caption templates: sd-scripts' built-in lists, A1 template files, [name] and [filewords] filling."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from library.data.caption_templates import (
    OBJECT_TEMPLATES,
    STYLE_TEMPLATES,
    CaptionTemplates,
    filename_words,
    read_template_file,
)
from library.errors import UserError


@dataclass
class Entry:
    path: str
    caption: str


def test_builtin_lists_match_sd_scripts():
    assert len(OBJECT_TEMPLATES) == 27
    assert len(STYLE_TEMPLATES) == 19  # the original list repeats two lines
    assert OBJECT_TEMPLATES[:2] == ("a photo of a {}", "a rendering of a {}")
    assert OBJECT_TEMPLATES[-1] == "a photo of a small {}"
    assert STYLE_TEMPLATES[0] == "a painting in the style of {}"
    assert STYLE_TEMPLATES[-1] == "a large painting in the style of {}"
    assert STYLE_TEMPLATES.count("a cropped painting in the style of {}") == 2
    assert all(line.count("{}") == 1 for line in OBJECT_TEMPLATES + STYLE_TEMPLATES)


@pytest.mark.parametrize("kind, source", [("object", OBJECT_TEMPLATES), ("style", STYLE_TEMPLATES)])
def test_builtin_fills_the_name(kind, source):
    templates = CaptionTemplates.builtin(kind, name="mytok")
    assert templates.uses_name()
    rng = random.Random(0)
    for _ in range(50):
        caption = templates("ignored caption", Entry("a.png", "ignored caption"), rng)
        assert caption in {line.format("mytok") for line in source}


def test_builtin_rejects_unknown_kind():
    with pytest.raises(ValueError):
        CaptionTemplates.builtin("person", name="x")


def _write(tmp_path, text, name="t.txt", encoding="utf-8"):
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


def test_template_file_fills_from_the_caption(tmp_path):
    lines = read_template_file(_write(tmp_path, "[name], [filewords]\n\n  [filewords] by [name]  \n"))
    assert lines == ["[name], [filewords]", "[filewords] by [name]"]
    templates = CaptionTemplates(lines, name="tok")
    seen = {templates("a red dog", Entry("/d/00012-a_red_dog.png", "a red dog"), random.Random(seed))
            for seed in range(20)}
    assert seen == {"tok, a red dog", "a red dog by tok"}


def test_empty_raw_caption_falls_back_to_the_file_name():
    templates = CaptionTemplates(["[name], [filewords]"], name="tok")
    # the processed caption is ignored when the raw one is empty
    caption = templates("class tokens", Entry("/d/00012-a_red_dog.png", "  "), random.Random(0))
    assert caption == "tok, a_red_dog"


def test_file_name_words_with_a_regex():
    templates = CaptionTemplates(["[filewords]"], name="tok", word_regex=r"[a-z]+", join_string=" ")
    assert templates("", Entry("/d/00012-a_red_dog.png", ""), random.Random(0)) == "a red dog"


@pytest.mark.parametrize("name, regex, join, words", [
    ("00012-a_red_dog.png", None, " ", "a_red_dog"),
    ("00012-a_red_dog.png", r"[a-z]+", " ", "a red dog"),
    ("00012-a_red_dog.png", r"[a-z]+", "+", "a+red+dog"),
    ("12-34  spaced name.jpg", None, " ", "spaced name"),
    ("dog 1.png", None, " ", "dog 1"),  # only leading digits go
    ("00012-cat-7.png", r"([a-z]+)-\d", " ", "cat"),
])
def test_filename_words(name, regex, join, words):
    assert filename_words(f"/data/{name}", word_regex=regex, join_string=join) == words


def test_same_seed_same_choices():
    templates = CaptionTemplates([f"[name] {i}" for i in range(10)], name="tok")
    entry = Entry("x.png", "c")

    def draw(seed):
        rng = random.Random(seed)
        return [templates("c", entry, rng) for _ in range(30)]

    assert draw(5) == draw(5)
    assert len(set(draw(5))) > 1


def test_uses_name():
    assert not CaptionTemplates(["[filewords]"], name="tok").uses_name()
    assert CaptionTemplates(["[filewords]", "a [name]"], name="tok").uses_name()


def test_bom_is_not_part_of_the_first_prompt(tmp_path):
    assert read_template_file(_write(tmp_path, "\ufeff[name]\n")) == ["[name]"]


@pytest.mark.parametrize("make", [
    lambda tmp: tmp / "missing.txt",
    lambda tmp: tmp,
    lambda tmp: _write(tmp, ""),
    lambda tmp: _write(tmp, "\n   \n\t\n"),
    lambda tmp: _write(tmp, "caf\xe9 [name]\n", encoding="latin-1"),
], ids=["missing", "folder", "empty", "blank-lines", "not-utf8"])
def test_read_template_file_errors(tmp_path, make):
    path = make(tmp_path)
    with pytest.raises(UserError) as err:
        read_template_file(path)
    message = str(err.value)
    assert str(path) in message
    assert "\n" not in message


@pytest.mark.parametrize("regex", [r"[a-z", r"(a)(b)"])
def test_bad_regex(regex):
    with pytest.raises(UserError, match="--ti_filename_word_regex"):
        filename_words("x.png", word_regex=regex)
    with pytest.raises(UserError, match="--ti_filename_word_regex"):
        CaptionTemplates(["[filewords]"], name="tok", word_regex=regex)
