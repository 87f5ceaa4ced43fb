"""Listing a subset's images and raw captions as sd-scripts does, and its reg-image balancing numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from library.data.images import IMAGE_EXTENSIONS
from library.data.specs import SubsetSpec
from library.data.subsets import ImageEntry, balance_regularisation, caption_candidates, list_subset_images
from library.errors import UserError


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(path)
    return path


def _subset(folder: Path, **kwargs) -> SubsetSpec:
    return SubsetSpec(image_dir=str(folder), **{"caption_extension": ".txt", **kwargs})


# ---- DreamBooth folders

def test_folder_images_and_captions(image_folder):
    folder = image_folder(repeats=10, class_tokens="sks dog", count=3)
    (folder / "notes.md").write_text("not an image")
    _image(folder / ".hidden.png")
    _image(folder / "nested" / "deep.png")  # sd-scripts does not look into subfolders
    subset = _subset(folder, num_repeats=10, class_tokens="sks dog")
    entries, problems = list_subset_images(subset)
    assert [e.path for e in entries] == [folder / f"img00{i}.png" for i in range(3)]
    assert [e.caption for e in entries] == [(folder / f"img00{i}.txt").read_text() for i in range(3)]
    assert entries[0] == ImageEntry(folder / "img000.png", entries[0].caption, subset, False, 10)
    assert problems == []


def test_missing_caption_falls_back_to_class_tokens(image_folder):
    folder = image_folder(count=3)
    (folder / "img001.txt").unlink()
    entries, problems = list_subset_images(_subset(folder, num_repeats=10, class_tokens="sks dog"))
    assert entries[1].caption == "sks dog"
    assert problems == [f"no caption file (.txt) for 1 of 3 images in '{folder}' (e.g. img001.png): using class "
                        "tokens 'sks dog'"]
    entries, problems = list_subset_images(_subset(folder))
    assert entries[1].caption == ""
    assert problems[0].endswith("(e.g. img001.png): their caption is empty")


def test_default_caption_extension_is_dot_caption(image_folder):
    folder = image_folder(count=1)
    (folder / "img000.caption").write_text("from .caption")
    entries, _ = list_subset_images(SubsetSpec(image_dir=str(folder)))
    assert entries[0].caption == "from .caption"


def test_face_crop_names_fall_back_to_the_base_caption(tmp_path):
    image = _image(tmp_path / "portrait_10_20_30_40.png")
    assert caption_candidates(image, ".txt") == [tmp_path / "portrait_10_20_30_40.txt", tmp_path / "portrait.txt"]
    assert caption_candidates(tmp_path / "a_b_c_d.png", ".txt") == [tmp_path / "a_b_c_d.txt"]  # 4 parts: no rule
    (tmp_path / "portrait.txt").write_text("base caption")
    entries, _ = list_subset_images(_subset(tmp_path))
    assert entries[0].caption == "base caption"
    (tmp_path / "portrait_10_20_30_40.txt").write_text("own caption")
    entries, _ = list_subset_images(_subset(tmp_path))
    assert entries[0].caption == "own caption"


def test_first_line_or_all_lines_with_wildcards(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("  first line \r\n\nsecond, {x|y}\n", newline="")
    entries, _ = list_subset_images(_subset(tmp_path))
    assert entries[0].caption == "first line"
    entries, _ = list_subset_images(_subset(tmp_path, enable_wildcard=True))
    assert entries[0].caption == "first line\nsecond, {x|y}"
    # sd-scripts takes the first line even when it is blank (an empty caption, not the class tokens).
    (tmp_path / "a.txt").write_text("\nsecond\n")
    entries, _ = list_subset_images(_subset(tmp_path, class_tokens="sks"))
    assert entries[0].caption == ""


def test_utf8_bom_is_not_part_of_the_caption(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("\ufeffsks dog".encode("utf-8"))
    entries, _ = list_subset_images(_subset(tmp_path))
    assert entries[0].caption == "sks dog"


def test_empty_or_non_utf8_caption_files_keep_their_image_and_are_named(tmp_path):
    for name in ("a", "b", "c", "d"):
        _image(tmp_path / f"{name}.png")
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 latin-1, red\r\nsecond line")
    (tmp_path / "b.txt").write_text("")
    (tmp_path / "c.txt").write_text("fine")
    (tmp_path / "d.txt").write_text(" \n\n")
    entries, problems = list_subset_images(_subset(tmp_path, class_tokens="sks dog"))
    # every image trains: the empty file with the empty caption (not the class tokens), the Latin-1 one with the
    # text that could be read
    assert [(e.path.name, e.caption) for e in entries] == [("a.png", "caf latin-1, red"), ("b.png", ""),
                                                           ("c.png", "fine"), ("d.png", "")]
    assert problems == [
        f"caption file {tmp_path / 'a.txt'} is not UTF-8 text (bad byte at offset 3): a.png trains with the text "
        "that could be read ('caf latin-1, red'); save the file as UTF-8",
        f"caption file {tmp_path / 'b.txt'} is empty: b.png trains with an empty caption; write a caption, or "
        "delete the file to use the class tokens",
        f"caption file {tmp_path / 'd.txt'} is empty: d.png trains with an empty caption; write a caption, or "
        "delete the file to use the class tokens",
    ]


def test_non_utf8_caption_lines_split_as_a_text_file_reads_them(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(b"\xff one\rtwo\r\n\r\nthree\n")
    entries, _ = list_subset_images(_subset(tmp_path, enable_wildcard=True))
    assert entries[0].caption == "one\ntwo\nthree"


def test_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"^image_dir '.*nope' does not exist: check the path"):
        list_subset_images(_subset(tmp_path / "nope"))


def test_empty_folder_and_zero_repeats_are_problems(tmp_path):
    entries, problems = list_subset_images(_subset(tmp_path))
    assert entries == []
    kinds = ", ".join(dict.fromkeys(e.lower() for e in IMAGE_EXTENSIONS))  # .avif too where Pillow decodes it
    assert kinds.startswith(".png, .jpg, .jpeg, .webp, .bmp")
    assert problems == [f"no images in '{tmp_path}' (looked for {kinds}): subset ignored"]
    _image(tmp_path / "a.png")
    entries, problems = list_subset_images(_subset(tmp_path, num_repeats=0))
    assert entries == []
    assert problems == [f"subset '{tmp_path}' ignored: num_repeats is 0, it must be at least 1"]


def test_reg_subset_entries_are_marked(image_folder):
    folder = image_folder(repeats=1, class_tokens="dog", count=2)
    entries, _ = list_subset_images(_subset(folder, is_reg=True))
    assert [e.is_reg for e in entries] == [True, True]


# ---- fine-tuning metadata

def _metadata_subset(meta: Path, image_dir: Path | None, **kwargs) -> SubsetSpec:
    return SubsetSpec(metadata_file=str(meta), image_dir=None if image_dir is None else str(image_dir), **kwargs)


def test_metadata_json_captions_tags_sizes_and_paths(tmp_path):
    images = tmp_path / "images"
    absolute = _image(tmp_path / "elsewhere" / "abs.png")
    _image(images / "noext.jpg")
    _image(images / "plain.png")
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({
        str(absolute): {"caption": "a frog", "tags": "open mouth, simple background", "train_resolution": [512, 768]},
        "noext": {"tags": "only tags"},
        "plain.png": {"caption": "plain", "image_size": [640, 480]},
        "gone.png": {"caption": "missing image"},
    }))
    subset = _metadata_subset(meta, images, num_repeats=2)
    entries, problems = list_subset_images(subset)
    assert entries == [
        ImageEntry(absolute, "a frog,open mouth, simple background", subset, False, 2, train_resolution=(512, 768),
                   tags="open mouth, simple background"),
        ImageEntry(images / "noext.jpg", "only tags", subset, False, 2),
        ImageEntry(images / "plain.png", "plain", subset, False, 2, image_size=(640, 480)),
    ]
    assert problems == [f"1 images listed in '{meta}' were not found in '{images}' (e.g. 'gone.png'): skipped"]


def test_metadata_tags_follow_every_caption_line_with_wildcards(tmp_path):
    _image(tmp_path / "a.png")
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"a.png": {"caption": "line one\n\nline two", "tags": "t1\nt2"}}))
    entries, _ = list_subset_images(_metadata_subset(meta, tmp_path, enable_wildcard=True))
    assert entries[0].caption == "line one,t1,t2\nline two,t1,t2"


def test_metadata_jsonl(tmp_path):
    _image(tmp_path / "a.png")
    _image(tmp_path / "b.png")
    meta = tmp_path / "meta.jsonl"
    meta.write_text('{"image_path": "a.png", "caption": "cap a", "tags": "x, y", "width": 64, "height": 32}\n\n'
                    '{"image_path": "b", "image_size": [10, 20]}\n')
    subset = _metadata_subset(meta, tmp_path)
    entries, problems = list_subset_images(subset)
    assert entries == [ImageEntry(tmp_path / "a.png", "cap a,x, y", subset, False, 1, image_size=(64, 32), tags="x, y"),
                       ImageEntry(tmp_path / "b.png", "", subset, False, 1, image_size=(10, 20))]
    assert problems == []


@pytest.mark.parametrize("name, text, message", [
    ("meta.json", '{"a.png": {"caption": "x",}}', "{meta}:1:27: JSON syntax error: Expecting property name"),
    ("meta.json", '["a.png"]', '{meta}: a metadata file must be a JSON object'),
    ("meta.json", '{"a.png": {"caption": 3}}', "{meta}: \"caption\" of 'a.png' must be a string, got 3"),
    ("meta.json", '{"a.png": {"train_resolution": "512"}}',
     "{meta}: \"train_resolution\" of 'a.png' must be [width, height], got '512'"),
    ("meta.jsonl", '{"caption": "no path"}\n', '{meta}:1: each line must be a JSON object with "image_path"'),
    ("meta.jsonl", '{"image_path": "a.png"}\n{oops\n', "{meta}:2:2: JSON syntax error"),
])
def test_metadata_mistakes_are_user_errors(tmp_path, name, text, message):
    _image(tmp_path / "a.png")
    meta = tmp_path / name
    meta.write_text(text)
    with pytest.raises(UserError) as info:
        list_subset_images(_metadata_subset(meta, tmp_path))
    assert str(info.value).startswith(message.format(meta=meta))


def test_relative_metadata_paths_need_image_dir(tmp_path):
    meta = tmp_path / "meta.json"
    meta.write_text('{"a.png": {"caption": "x"}}')
    with pytest.raises(UserError, match="image path 'a.png' is relative, so the subset needs image_dir"):
        list_subset_images(_metadata_subset(meta, None))


def test_missing_metadata_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"^metadata_file '.*meta.json' does not exist"):
        list_subset_images(_metadata_subset(tmp_path / "meta.json", tmp_path))


# ---- regularisation balancing

def _entries(count: int, repeats: int, is_reg: bool) -> list[ImageEntry]:
    subset = SubsetSpec(image_dir="reg" if is_reg else "train", is_reg=is_reg, num_repeats=repeats)
    return [ImageEntry(Path(f"{subset.image_dir}/{i}.png"), "", subset, is_reg, repeats) for i in range(count)]


@pytest.mark.parametrize("train, reg, expected", [
    # 30 train steps, 7 reg images: one pass registers 7, then whole passes add 1 each (28), then #0 and #1 (30).
    ((3, 10), (7, 1), [5, 5, 4, 4, 4, 4, 4]),
    # More reg than train: images are taken in order until the count is reached; the rest are not used.
    ((2, 1), (5, 1), [1, 1]),
    ((1, 5), (4, 2), [2, 2, 2]),
    # Reg repeats count from the start: 6 after one pass, then 8, then 10.
    ((1, 10), (2, 3), [5, 5]),
    ((0, 1), (3, 1), []),
    ((3, 1), (0, 1), []),
])
def test_reg_balancing_matches_sd_scripts(train, reg, expected):
    train_entries, reg_entries = _entries(*train, False), _entries(*reg, True)
    balanced = balance_regularisation(train_entries, reg_entries)
    assert [e.num_repeats for e in balanced] == expected
    assert [e.path for e in balanced] == [e.path for e in reg_entries[:len(expected)]]
    if expected:
        assert sum(expected) >= sum(e.num_repeats for e in train_entries)
    assert all(e.num_repeats == reg[1] for e in reg_entries)  # the inputs are left as they were
