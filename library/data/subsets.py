"""A subset's images and raw captions (DreamBooth folder or fine-tuning metadata), and sd-scripts' reg balancing."""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from library.data.captions import caption_from_lines, fallback_caption, metadata_caption
from library.data.images import IMAGE_EXTENSIONS
from library.data.specs import SubsetSpec
from library.config.config_text import TOO_DEEP
from library.errors import UserError


@dataclass(frozen=True)
class ImageEntry:
    """One image of a subset before repeats are expanded: what sd-scripts registers as an `ImageInfo`."""

    path: Path
    # As read: the first line of the caption file, or all its non-blank lines ("\n"-joined) when the subset has
    # enable_wildcard; fine-tuning tags already appended. captions.process_caption makes each step's text.
    caption: str
    subset: SubsetSpec
    is_reg: bool
    num_repeats: int
    train_resolution: tuple[int, int] | None = None  # fine-tuning metadata (prepare_buckets_latents writes it)
    image_size: tuple[int, int] | None = None  # fine-tuning metadata: the original (width, height)
    tags: str | None = None  # fine-tuning tags that sd-scripts counts for ss_tag_frequency
    own_caption: bool = True  # False when the caption is the folder's class tokens (no caption file)
    mask_path: Path | None = None  # --masked_loss: the image of the same name in the subset's conditioning_data_dir

    @property
    def has_mask(self) -> bool:
        """Whether training weights this image's loss by a mask (its conditioning image, or its alpha channel)."""
        return self.mask_path is not None or self.subset.alpha_mask


def list_subset_images(subset: SubsetSpec) -> tuple[list[ImageEntry], list[str]]:
    """The subset's images in sd-scripts' order, and problems to show the user (the entries exclude those images).

    A missing folder or metadata file is a UserError; a subset with num_repeats < 1 or no images is a problem
    (sd-scripts ignores it with a warning). Call balance_regularisation afterwards for reg subsets.
    """
    if subset.num_repeats < 1:
        name = subset.metadata_file if subset.is_fine_tuning else subset.image_dir
        return [], [f"subset '{name}' ignored: num_repeats is {subset.num_repeats}, it must be at least 1"]
    return _list_metadata(subset) if subset.is_fine_tuning else _list_folder(subset)


def find_images(folder: Path) -> list[Path]:
    """Images directly in `folder` (not in subfolders), sorted by path like sd-scripts' `glob_images(dir, "*")`."""
    # glob's "*" skips names starting with "."; a folder named "x.png" is not an image.
    found = [p for p in folder.iterdir() if p.name.endswith(IMAGE_EXTENSIONS) and not p.name.startswith(".")]
    return sorted((p for p in found if p.is_file()), key=str)


def caption_candidates(image: Path, caption_extension: str) -> list[Path]:
    """`<stem><ext>`, then for face-crop outputs like `name_x_y_w_h.png` also `name<ext>` (sd-scripts' read_caption)."""
    stem = os.path.splitext(image.name)[0]
    names = [stem + caption_extension]
    parts = stem.split("_")
    # sd-scripts splits the whole path, so underscores in folder names count too; we split the file name only.
    if len(parts) >= 5:
        names.append("_".join(parts[:-4]) + caption_extension)
    return [image.parent / name for name in names]


def read_caption(image: Path, caption_extension: str, enable_wildcard: bool) -> tuple[str | None, str | None]:
    """The image's caption file text (see captions.caption_from_lines), or None when it has no caption file; and a
    problem to report, or None.

    A caption file never drops its image: an empty one gives the empty caption, and one that is not UTF-8 gives
    what can be read of it (the bytes that are not UTF-8 are left out), each with a problem naming the file.
    sd-scripts stops the whole run at either file; we train the image, as its users expect.
    """
    for candidate in caption_candidates(image, caption_extension):
        if not candidate.is_file():
            continue
        raw = candidate.read_bytes()
        # Decoded as a text-mode file reads (universal newlines), so lines split exactly as readlines() splits them;
        # utf-8-sig: a BOM from Windows editors would otherwise start the first tag (sd-scripts keeps it).
        lines = io.StringIO(raw.decode("utf-8-sig", errors="ignore"), newline=None).readlines()
        caption = caption_from_lines(lines, enable_wildcard)
        problem = None
        try:
            raw.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            problem = (f"caption file {candidate} is not UTF-8 text (bad byte at offset {err.start}): {image.name} "
                       f"trains with the text that could be read ({caption!r}); save the file as UTF-8")
        if problem is None and not "".join(lines).strip():
            problem = (f"caption file {candidate} is empty: {image.name} trains with an empty caption; write a "
                       "caption, or delete the file to use the class tokens")
        return caption, problem
    return None, None


def _list_folder(subset: SubsetSpec) -> tuple[list[ImageEntry], list[str]]:
    folder = Path(subset.image_dir)
    if not folder.is_dir():
        state = "is not a folder" if folder.exists() else "does not exist"
        raise UserError(f"image_dir '{folder}' {state}: check the path (dataset config image_dir or --train_data_dir)")
    images = find_images(folder)
    if not images:
        kinds = ", ".join(dict.fromkeys(e.lower() for e in IMAGE_EXTENSIONS))
        return [], [f"no images in '{folder}' (looked for {kinds}): subset ignored"]
    entries, problems, missing = [], [], []
    for image in images:
        caption, problem = read_caption(image, subset.caption_extension, subset.enable_wildcard)
        if problem is not None:
            problems.append(problem)
        if caption is None:
            missing.append(image.name)
        entries.append(ImageEntry(image, fallback_caption(caption, subset), subset, subset.is_reg, subset.num_repeats,
                                  own_caption=caption is not None))
    if missing:
        used = f"using class tokens '{subset.class_tokens}'" if subset.class_tokens else "their caption is empty"
        problems.append(f"no caption file ({subset.caption_extension}) for {len(missing)} of {len(images)} images in "
                        f"'{folder}' (e.g. {missing[0]}): {used}")
    if subset.conditioning_data_dir is not None:
        entries = _with_masks(entries, Path(subset.conditioning_data_dir), folder, problems)
    return entries, problems


def _with_masks(entries: list[ImageEntry], mask_dir: Path, folder: Path, problems: list[str]) -> list[ImageEntry]:
    """Each image's mask: the image of the same stem in `mask_dir` (sd-scripts' glob_images(dir, stem)). A missing
    mask stops the run, as in sd-scripts; masks that no image uses are reported."""
    if not mask_dir.is_dir():
        state = "is not a folder" if mask_dir.exists() else "does not exist"
        raise UserError(f"conditioning_data_dir '{mask_dir}' {state}: check the path (dataset config "
                        "conditioning_data_dir or --conditioning_data_dir)")
    masks = {}
    for mask in find_images(mask_dir):
        masks.setdefault(os.path.splitext(mask.name)[0], mask)
    without = [e.path.name for e in entries if os.path.splitext(e.path.name)[0] not in masks]
    if without:
        raise UserError(f"conditioning_data_dir '{mask_dir}' has no mask for {len(without)} of {len(entries)} images "
                        f"in '{folder}' (e.g. {', '.join(without[:3])}): add an image of the same name (any image "
                        "extension; white = train, black = ignore) for each")
    used = {os.path.splitext(e.path.name)[0] for e in entries}
    extra = sorted(name for stem, name in ((k, v.name) for k, v in masks.items()) if stem not in used)
    if extra:
        problems.append(f"{len(extra)} images in conditioning_data_dir '{mask_dir}' match no image in '{folder}' "
                        f"(e.g. {extra[0]}): not used")
    return [replace(e, mask_path=masks[os.path.splitext(e.path.name)[0]]) for e in entries]


def _list_metadata(subset: SubsetSpec) -> tuple[list[ImageEntry], list[str]]:
    file = Path(subset.metadata_file)
    if not file.is_file():
        raise UserError(f"metadata_file '{file}' does not exist: check the path (dataset config metadata_file or "
                        "--in_json)")
    records, problems = _read_jsonl(file) if file.suffix.lower() == ".jsonl" else _read_json(file)
    if not records:
        return [], problems + [f"metadata file '{file}' has no image entries: subset ignored"]
    entries, missing = [], []
    for key, record in records.items():
        image = _metadata_image(key, subset.image_dir, file)
        if image is None:
            missing.append(key)
            continue
        caption, tags = metadata_caption(_text(record, "caption", file, key), _text(record, "tags", file, key), subset)
        entries.append(ImageEntry(image, caption, subset, False, subset.num_repeats,
                                  _size(record, "train_resolution", file, key), _size(record, "image_size", file, key),
                                  tags))
    if missing:
        folder = f"'{subset.image_dir}'" if subset.image_dir else "the paths as written"
        problems.append(f"{len(missing)} images listed in '{file}' were not found in {folder} (e.g. '{missing[0]}'): "
                        "skipped")
    return entries, problems


def _read_json(file: Path) -> tuple[dict[str, dict], list[str]]:
    data = _decode_json(file, _read_text(file))
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise UserError(f"{file}: a metadata file must be a JSON object "
                        '{"image key": {"caption": "...", "tags": "..."}, ...} (or .jsonl, one image per line)')
    return data, []


def _read_jsonl(file: Path) -> tuple[dict[str, dict], list[str]]:
    """sd-scripts' JSONL layout: one {"image_path", "caption", "tags", "image_size" or "width"/"height"} per line."""
    records: dict[str, dict] = {}
    problems = []
    for number, line in enumerate(_read_text(file).splitlines(), 1):
        if not line.strip():
            continue
        record = _decode_json(file, line, number)
        if not isinstance(record, dict) or not isinstance(record.get("image_path"), str):
            raise UserError(f'{file}:{number}: each line must be a JSON object with "image_path" '
                            '(and "caption", "tags", "image_size")')
        key = record["image_path"]
        if key in records:
            problems.append(f"{file}:{number}: '{key}' is listed again; this later line wins, as in sd-scripts")
        entry = {name: record[name] for name in ("caption", "tags", "image_size") if name in record}
        if "width" in record and "height" in record:
            entry["image_size"] = [record["width"], record["height"]]
        records[key] = entry
    return records, problems


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{file}: not UTF-8 text; save it as UTF-8") from None


def _decode_json(file: Path, text: str, line: int | None = None) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        position = f"{line}:{err.colno}" if line else f"{err.lineno}:{err.colno}"
        raise UserError(f"{file}:{position}: JSON syntax error: {err.msg}") from None
    except RecursionError:
        raise UserError(f"{file}: {TOO_DEEP}") from None


def _metadata_image(key: str, image_dir: str | None, file: Path) -> Path | None:
    """The image a metadata key names: absolute, or relative to image_dir; without a usable extension, searched."""
    if os.path.isabs(key):
        path = Path(key)
    elif Path(key).is_file():  # a --full_path key relative to where the tools ran (sd-scripts tries it first)
        path = Path(key)
    elif image_dir is None:
        raise UserError(f"{file}: image path '{key}' is relative, so the subset needs image_dir (the folder it is "
                        "relative to): set image_dir in its [[datasets.subsets]], or --train_data_dir with --in_json")
    else:
        path = Path(image_dir) / key
    if path.suffix and path.is_file():
        return path
    # sd-scripts' glob_images(dirname, basename): `<key><ext>` for each image extension, first in sorted order.
    found = sorted((path.parent / (path.name + ext) for ext in IMAGE_EXTENSIONS), key=str)
    return next((p for p in found if p.is_file()), None)


def _text(record: dict, field: str, file: Path, key: str) -> str | None:
    value = record.get(field)
    if value is not None and not isinstance(value, str):
        raise UserError(f'{file}: "{field}" of \'{key}\' must be a string, got {value!r}')
    return value


def _size(record: dict, field: str, file: Path, key: str) -> tuple[int, int] | None:
    value = record.get(field)
    if value is None:
        return None
    if (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        return int(value[0]), int(value[1])
    raise UserError(f'{file}: "{field}" of \'{key}\' must be [width, height], got {value!r}')


def balance_regularisation(train_entries: Sequence[ImageEntry], reg_entries: Sequence[ImageEntry]) -> list[ImageEntry]:
    """The reg images one dataset trains with, repeats adjusted as sd-scripts' `DreamBoothDataset` does.

    Reg images are taken in order until their repeats add up to the train count (train images × repeats); any
    left over are not used. While the reg count is still short, each image in turn gets one more repeat,
    starting from the first, until the counts are equal. No train images means no reg images.
    """
    target = sum(entry.num_repeats for entry in train_entries)
    if not reg_entries:
        return []
    repeats: list[int] = []
    count = 0
    for entry in reg_entries:
        if count >= target:
            break
        repeats.append(entry.num_repeats)
        count += entry.num_repeats
    index = 0
    while count < target:
        repeats[index % len(repeats)] += 1
        count += 1
        index += 1
    return [replace(entry, num_repeats=n) for entry, n in zip(reg_entries, repeats)]
