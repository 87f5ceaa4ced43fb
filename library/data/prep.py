"""What the dataset-preparation tools share (tools/tag_images_by_wd14_tagger.py, make_captions.py,
make_captions_by_git.py, clean_captions_and_tags.py, merge_*_to_metadata.py, prepare_buckets_latents.py,
preprocess_images.py): listing images, skipping those already done (resumable runs), reporting and skipping corrupt
files, a progress bar, atomic text and metadata files, and the closing summary.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from library.data.images import IMAGE_EXTENSIONS, CorruptImageError, load_image
from library.errors import UserError
from library.safe_write import atomic_file


def list_images(folder, *, recursive: bool = False, flag: str = "train_data_dir") -> list[Path]:
    """The images in `folder` (and its subfolders with `recursive`), sorted by path; hidden files left out."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{flag} {folder}: no such folder")
    paths = folder.rglob("*") if recursive else folder.iterdir()
    found = [p for p in paths if p.name.endswith(IMAGE_EXTENSIONS) and not p.name.startswith(".") and p.is_file()]
    return sorted(found, key=str)


def sidecar(image: Path, extension: str) -> Path:
    """The file beside an image with its stem and `extension` (".txt", ".caption"): where captions and tags go."""
    if not extension.startswith("."):
        extension = "." + extension
    return image.with_name(image.stem + extension)


def write_text(path: Path, text: str) -> Path:
    """Write a caption or tag file atomically (UTF-8, no trailing newline, as sd-scripts' scripts write them)."""
    with atomic_file(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return path


def read_json(path: Path, *, what: str = "metadata file") -> dict:
    """A metadata JSON as a dict; a missing file is {}, an unreadable one a one-line error."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{what} {path}: cannot be read as JSON ({err}); fix or remove it") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {path}: holds a JSON {type(data).__name__}, not an object of image entries")
    return data


def write_json(path: Path, data: dict) -> Path:
    """Write metadata atomically, indented as sd-scripts' merge scripts write it."""
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    return path


class PrepRun:
    """One tool run over images: which to do, a progress bar, corrupt files reported and skipped, a summary.

    `outputs(image)` names the files the tool writes for an image; an image whose outputs all exist is skipped
    (a resumed run picks up where it stopped) unless `overwrite`.
    """

    def __init__(self, what: str, images: Iterable[Path], *, overwrite: bool = False, outputs=None,
                 quiet: bool = False):
        self.what = what
        self.images = list(images)
        self.skipped_done: list[Path] = []
        self.corrupt: list[tuple[Path, str]] = []
        self.written = 0
        self.quiet = quiet
        todo = []
        for image in self.images:
            done = outputs is not None and not overwrite and all(p.exists() for p in outputs(image))
            (self.skipped_done if done else todo).append(image)
        self.todo = todo

    def load(self, image: Path, *, mode: str = "RGB") -> Image.Image | None:
        """The image decoded (EXIF orientation applied), or None after reporting why it cannot be."""
        try:
            loaded = load_image(image, alpha=mode == "RGBA")
        except CorruptImageError as err:
            self.corrupt.append((image, err.reason))
            tqdm.write(f"skipped unreadable image {image}: {err.reason}", file=sys.stderr)
            return None
        return loaded

    def progress(self, items: Iterable | None = None, *, total: int | None = None) -> Iterator:
        """A progress bar over `items` (default: the images to do)."""
        items = self.todo if items is None else items
        return iter(tqdm(items, total=total, desc=self.what, disable=self.quiet or not self.todo))

    def summary(self, extra: Iterable[str] = (), *, redo: str = "--overwrite") -> str:
        """Counts (written, already done, unreadable) and the tool's own lines; `redo` names the flag that redoes
        what was done already."""
        lines = [f"{self.what}: {self.written} written, {len(self.skipped_done)} already done (skipped; {redo} "
                 f"redoes them), {len(self.corrupt)} unreadable, of {len(self.images)} images"]
        lines += [f"  unreadable: {path} ({reason})" for path, reason in self.corrupt[:10]]
        if len(self.corrupt) > 10:
            lines.append(f"  … and {len(self.corrupt) - 10} more unreadable")
        lines += list(extra)
        return "\n".join(lines)


def tag_counts(texts: Iterable[str | None]) -> Counter:
    """How often each comma-separated tag occurs over `texts` (None and empty tags skipped), for the summaries."""
    counts: Counter = Counter()
    for text in texts:
        if text:
            counts.update(tag for tag in (t.strip() for t in text.split(",")) if tag)
    return counts


def frequency_lines(counts: Counter, *, top: int = 20, what: str = "tags") -> list[str]:
    """The most frequent tags, `top` of them, for a summary."""
    if not counts:
        return []
    shown = ", ".join(f"{tag} ({n})" for tag, n in counts.most_common(top))
    return [f"  {len(counts)} distinct {what}; most frequent: {shown}"]


def batched(items: list, size: int) -> Iterator[list]:
    if size < 1:
        raise UserError(f"--batch_size {size}: give 1 or more")
    for start in range(0, len(items), size):
        yield items[start:start + size]

