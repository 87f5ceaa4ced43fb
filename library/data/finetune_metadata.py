"""sd-scripts' fine-tuning metadata (`finetune/*.py`): image keys, caption/tag files merged into one JSON, its tag and
caption cleaning rules, and the `<key>.npz` latents file that finetune/prepare_buckets_latents.py writes and its
FineTuningDataset reads. Pure logic and small file helpers; the tools in tools/ are thin command lines over it.

The metadata file is `{image key: {"caption": str, "tags": str, "train_resolution": [w, h]}, ...}`; the key is the
image's stem, or with --full_path the image's path as listed (extension included), exactly as sd-scripts writes it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from library.data.prep import read_json, sidecar
from library.errors import UserError
from library.safe_write import atomic_file

# ---------------------------------------------------------------- keys and files


def image_key(image: Path, *, full_path: bool) -> str:
    """The image's key in the metadata: its stem, or (--full_path) `str(path)` with its extension, as sd-scripts'
    merge_*_to_metadata.py and prepare_buckets_latents.py key it (a relative folder gives relative keys)."""
    return str(image) if full_path else image.stem


def check_unique_keys(images: Iterable[Path], *, full_path: bool) -> dict[str, Path]:
    """key -> image; two images with one key (a.png and a.jpg, or one stem in two folders with --recursive) would
    overwrite each other's entry and latents file, which sd-scripts does silently: refuse it instead."""
    keys: dict[str, Path] = {}
    for image in images:
        key = image_key(image, full_path=full_path)
        if key in keys:
            raise UserError(f"{keys[key]} and {image} both have the metadata key '{key}': rename one, or add "
                            "--full_path to key the images by their paths")
        keys[key] = image
    return keys


def read_metadata(path: str | os.PathLike, *, flag: str = "in_json") -> dict:
    """An existing metadata file (a missing one is a UserError here, unlike prep.read_json); every entry an object."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such metadata file; check the path (merge_captions_to_metadata.py "
                        "writes one)")
    metadata = read_json(path, what=flag)
    for key, entry in metadata.items():
        if not isinstance(entry, dict):
            raise UserError(f"{flag} {path}: the entry of '{key}' is a JSON {type(entry).__name__}, not an object "
                            '{"caption": ..., "tags": ...}; fix or remove it')
    return metadata


def read_text_file(path: Path) -> str | None:
    """A caption or tag file's text, stripped (sd-scripts' read_text().strip()); None when it does not exist. A
    leading BOM is dropped as our training reads captions (sd-scripts keeps it in the first tag)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return raw.decode("utf-8-sig").strip()
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text (bad byte at offset {err.start}); save it as UTF-8") from None


@dataclass
class MergeResult:
    """What merging caption or tag files into metadata did."""

    merged: list[str] = field(default_factory=list)  # keys whose field was set
    added: list[str] = field(default_factory=list)  # keys that had no entry before
    missing: list[Path] = field(default_factory=list)  # images without a file of the extension (skipped)


def merge_text_files(metadata: dict, images: Iterable[Path], *, field_name: str, extension: str,
                     full_path: bool, on_text=None) -> MergeResult:
    """Set `metadata[key][field_name]` to each image's `<stem><extension>` text (in place), as sd-scripts'
    merge_captions_to_metadata.py ("caption") and merge_dd_tags_to_metadata.py ("tags") do: an existing entry keeps
    its other fields, a new image gets a new entry. An image without the file is skipped (sd-scripts stops there)."""
    result = MergeResult()
    for image in images:
        text = read_text_file(sidecar(image, extension))
        if text is None:
            result.missing.append(image)
            continue
        key = image_key(image, full_path=full_path)
        if key not in metadata:
            metadata[key] = {}
            result.added.append(key)
        metadata[key][field_name] = text
        result.merged.append(key)
        if on_text is not None:
            on_text(key, text)
    return result


# ---------------------------------------------------------------- cleaning (finetune/clean_captions_and_tags.py)

_HAIR_LENGTH = re.compile(r", (long|short|medium) hair, ")
_HAIR_CUT = re.compile(r", (bob|hime) cut, ")
_HAIR = re.compile(r", ([\w\-]+) hair, ")
_WORD = re.compile(r", ([\w\-]+|hair ornament), ")
# With several people in the image, a per-person attribute tagged twice (two eye colours...) cannot be attributed
# to anyone, so sd-scripts drops every tag of that kind.
_REMOVE_IN_MULTI = (
    _HAIR_LENGTH,
    _HAIR_CUT,
    re.compile(r", [\w\-]+ eyes, "),
    re.compile(r", ([\w\-]+ sleeves|sleeveless), "),
    re.compile(r", (ponytail|braid|ahoge|twintails|[\w\-]+ bun|single hair bun|single side bun|two side up|"
               r"two tails|[\w\-]+ braid|sidelocks), "),
)
_PLACEHOLDER = ", @@@, "

# Applied top to bottom, each until the caption stops changing (BLIP's wording for anime pictures).
CAPTION_REPLACEMENTS: tuple[tuple[str, str], ...] = (
    ("anime anime", "anime"),
    ("young ", ""),
    ("anime girl", "girl"),
    ("cartoon female", "girl"),
    ("cartoon lady", "girl"),
    ("cartoon character", "girl"),
    ("cartoon woman", "girl"),
    ("cartoon women", "girls"),
    ("cartoon girl", "girl"),
    ("anime female", "girl"),
    ("anime lady", "girl"),
    ("anime character", "girl"),
    ("anime woman", "girl"),
    ("anime women", "girls"),
    ("lady", "girl"),
    ("female", "girl"),
    ("woman", "girl"),
    ("women", "girls"),
    ("people", "girls"),
    ("person", "girl"),
    ("a cartoon figure", "a figure"),
    ("a cartoon image", "an image"),
    ("a cartoon picture", "a picture"),
    ("an anime cartoon image", "an image"),
    ("a cartoon anime drawing", "a drawing"),
    ("a cartoon drawing", "a drawing"),
    ("girl girl", "girl"),
)


def rating_count(tags: str) -> int:
    """How many `, rating…` tags DeepDanbooru appended (WD14 writes none); more than one is worth a warning."""
    return len(_underscores_to_spaces(tags).split(", rating")) - 1


def clean_tags(tags: str) -> str:
    """sd-scripts' clean_tags: underscores to spaces (the `^_^` emoticon kept), DeepDanbooru's trailing rating tags
    dropped, per-person attributes dropped when several girls/boys carry conflicting ones, and a tag dropped when a
    longer tag ends with it ("shirt" beside "white shirt")."""
    tags = _underscores_to_spaces(tags)
    tags = tags.split(", rating")[0]
    # Every tag wrapped as ", tag, " (separators doubled) so the patterns can match whole tags.
    tags = ", " + tags.replace(", ", ", , ") + ", "
    if "girls" in tags or "boys" in tags:
        tags = _drop_conflicting(tags)
    for word in _WORD.findall(tags):
        if re.search(rf", ((\w+) )+{re.escape(word)}, ", tags):
            tags = tags.replace(f", {word}, ", "")
    tags = tags.replace(", , ", ", ")
    return tags[2:-2]


def _underscores_to_spaces(tags: str) -> str:
    return tags.replace("^_^", "^@@@^").replace("_", " ").replace("^@@@^", "^_^")


def _drop_conflicting(tags: str) -> str:
    for pattern in _REMOVE_IN_MULTI:
        if len(pattern.findall(tags)) > 1:
            tags = pattern.sub("", tags)
    # A single hair-length tag is shared by everyone: hidden while hair colours are counted, then put back.
    length = _HAIR_LENGTH.search(tags)
    if length:
        tags = _HAIR_LENGTH.sub(_PLACEHOLDER, tags)
    if len(_HAIR.findall(tags)) > 1:
        tags = _HAIR.sub("", tags)
    if length:
        tags = tags.replace(_PLACEHOLDER, length.group())
    return tags


def clean_caption(caption: str) -> str:
    """sd-scripts' clean_caption: CAPTION_REPLACEMENTS in order, each repeated until nothing changes."""
    for old, new in CAPTION_REPLACEMENTS:
        while True:
            replaced = caption.replace(old, new)
            if replaced == caption:
                break
            caption = replaced
    return caption


@dataclass
class CleanResult:
    tags_changed: list[tuple[str, str, str]] = field(default_factory=list)  # (key, before, after)
    captions_changed: list[tuple[str, str, str]] = field(default_factory=list)
    without_tags: list[str] = field(default_factory=list)
    without_caption: list[str] = field(default_factory=list)
    several_ratings: list[str] = field(default_factory=list)


def clean_metadata(metadata: Mapping[str, dict]) -> CleanResult:
    """Clean every entry's "tags" and "caption" in place (entries missing one are listed, as sd-scripts prints)."""
    result = CleanResult()
    for key, entry in metadata.items():
        tags = entry.get("tags")
        if tags is None:
            result.without_tags.append(key)
        else:
            if rating_count(tags) > 1:
                result.several_ratings.append(key)
            entry["tags"] = clean_tags(tags)
            if entry["tags"] != tags:
                result.tags_changed.append((key, tags, entry["tags"]))
        caption = entry.get("caption")
        if caption is None:
            result.without_caption.append(key)
        else:
            entry["caption"] = clean_caption(caption)
            if entry["caption"] != caption:
                result.captions_changed.append((key, caption, entry["caption"]))
    return result


# ---------------------------------------------------------------- latents (finetune/prepare_buckets_latents.py)

SD_SCRIPTS_LATENT_STRIDE = 8  # sd-scripts checks the shapes of SD/SDXL latents with this fixed stride


def train_resolution(bucket: tuple[int, int]) -> list[int]:
    """The `train_resolution` sd-scripts records: the bucket (w, h) floored to the latent grid (multiples of 8)."""
    return [bucket[0] - bucket[0] % 8, bucket[1] - bucket[1] % 8]


def sd_scripts_npz_path(train_data_dir: str | os.PathLike, key: str, *, full_path: bool, recursive: bool) -> Path:
    """Where prepare_buckets_latents.py writes an image's latents (its get_npz_filename), which is where its
    FineTuningDataset looks (image_key_to_npz_file): `<train_data_dir>/<key>.npz`, or with --full_path beside the
    image (`<folder>/<stem>.npz`). Without --full_path even --recursive puts every file in train_data_dir."""
    if not full_path:
        return Path(os.path.join(train_data_dir, key + ".npz"))
    stem = os.path.splitext(os.path.basename(key))[0]
    relative = os.path.relpath(os.path.dirname(key), train_data_dir)
    if recursive and relative:
        return Path(os.path.join(train_data_dir, relative, stem + ".npz"))
    return Path(os.path.join(train_data_dir, stem + ".npz"))


def sd_scripts_npz_valid(path: Path, bucket: tuple[int, int], *, flip_aug: bool, alpha_mask: bool,
                         stride: int = SD_SCRIPTS_LATENT_STRIDE) -> bool:
    """sd-scripts' is_disk_cached_latents_is_expected (what --skip_existing trusts): latents, original_size and
    crop_ltrb present, the latents the bucket's size, flipped latents with flip_aug, and an alpha mask exactly when
    alpha_mask is on. An unreadable file is not valid (sd-scripts stops on it; it is about to be rewritten here)."""
    latent_hw = (bucket[1] // stride, bucket[0] // stride)
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = set(npz.files)
            if not {"latents", "original_size", "crop_ltrb"} <= names or npz["latents"].shape[1:3] != latent_hw:
                return False
            if flip_aug and ("latents_flipped" not in names or npz["latents_flipped"].shape[1:3] != latent_hw):
                return False
            if alpha_mask:
                return "alpha_mask" in names and npz["alpha_mask"].shape == (bucket[1], bucket[0])
            return "alpha_mask" not in names
    except (OSError, ValueError, EOFError):
        return False


def write_sd_scripts_npz(path: Path, *, latents: np.ndarray, original_size, crop_ltrb,
                         latents_flipped: np.ndarray | None = None, alpha_mask: np.ndarray | None = None) -> Path:
    """sd-scripts' save_latents_to_disk layout, unsuffixed keys (its newest loaders fall back to them): `latents`
    float32 (C, h, w), `original_size` (W, H), `crop_ltrb` (L, T, R, B), `latents_flipped` with flip_aug,
    `alpha_mask` float32 (H, W) with alpha_mask. Written atomically: an interrupted run never leaves half a file."""
    arrays = {"latents": np.asarray(latents, dtype=np.float32), "original_size": np.array(original_size),
              "crop_ltrb": np.array(crop_ltrb)}
    if latents_flipped is not None:
        arrays["latents_flipped"] = np.asarray(latents_flipped, dtype=np.float32)
    if alpha_mask is not None:
        arrays["alpha_mask"] = np.asarray(alpha_mask, dtype=np.float32)
    # A file object, not the name: np.savez would append ".npz" to the temporary name.
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return path


def flag_is_on(value: str | bool | None) -> bool:
    """sd-scripts' --alpha_mask is a string (any non-empty value turns it on); we also read false/0/no/off as off."""
    if isinstance(value, bool) or value is None:
        return bool(value)
    return value.strip().lower() not in ("", "0", "false", "no", "off")
