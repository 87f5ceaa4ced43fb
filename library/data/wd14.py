"""The WD14 tagger's logic without onnxruntime (tools/tag_images_by_wd14_tagger.py runs the model): reading
selected_tags.csv, renaming tags (--character_tag_expand, --remove_underscore, --tag_replacement), the image
preprocessing the model expects, choosing and ordering tags from its scores, and merging with existing captions.

Behaviour follows sd-scripts' finetune/tag_images_by_wd14_tagger.py; where we differ it is said at the spot.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from library.data.images import resize_image
from library.errors import UserError

MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"
DEFAULT_REPO_ID = "SmilingWolf/wd-v1-4-convnext-tagger-v2"  # sd-scripts' default --repo_id
DEFAULT_IMAGE_SIZE = 448  # every released WD tagger; used only when the model's input shape leaves it open

CATEGORY_GENERAL, CATEGORY_CHARACTER, CATEGORY_RATING = 0, 4, 9

# Underscores in these are part of the face, not word separators. sd-scripts keeps every tag of at most 3 characters
# as it is (which covers "^_^", ">_<", "o_o", ...); the longer ones come from the list the tagger's authors
# use (toriato's stable-diffusion-webui-wd14-tagger), which sd-scripts would turn into e.g. "(o) (o)".
KAOMOJIS = frozenset({
    "0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o", "@_@", "^_^",
    "o_o", "u_u", "x_x", "|_|", "||_||",
})


@dataclass(frozen=True)
class TagTable:
    """selected_tags.csv: `names[i]` and `categories[i]` belong to the model's output i."""

    names: tuple[str, ...]
    categories: tuple[int, ...]

    def indices(self, category: int) -> list[int]:
        return [i for i, c in enumerate(self.categories) if c == category]

    def renamed(self, rename) -> TagTable:
        """A copy with `rename(name, category)` applied to every tag."""
        return TagTable(tuple(rename(n, c) for n, c in zip(self.names, self.categories)), self.categories)


def read_tag_table(path: Path) -> TagTable:
    """selected_tags.csv (header tag_id,name,category,count): one row per model output, in output order."""
    try:
        with open(path, encoding="utf-8", newline="") as file:
            rows = list(csv.reader(file))
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot be read ({err}); put the tagger's {TAGS_FILE} there") from None
    if not rows or [h.strip() for h in rows[0][:3]] != ["tag_id", "name", "category"]:
        header = ",".join(rows[0]) if rows else "an empty file"
        raise UserError(f"{path}: header is {header!r}, not the WD14 tagger's tag_id,name,category,count; "
                        f"use the {TAGS_FILE} that came with model.onnx")
    names, categories = [], []
    for line, row in enumerate(rows[1:], start=2):
        try:
            names.append(row[1])
            categories.append(int(row[2]))
        except (IndexError, ValueError):
            raise UserError(f"{path} line {line}: {','.join(row)!r} has no tag name and numeric category") from None
    if not names:
        raise UserError(f"{path}: lists no tags; use the {TAGS_FILE} that came with model.onnx")
    return TagTable(tuple(names), tuple(categories))


def expand_character_tag(tag: str, separator: str) -> str:
    """--character_tag_expand: "name_(series)" -> "name<sep>series"; "name_(costume)_(series)" keeps the costume."""
    if not tag.endswith(")") or "(" not in tag:
        return tag
    head, _, series = tag.rpartition("(")
    return head.removesuffix("_") + separator + series.replace(")", "")


def underscores_to_spaces(tag: str) -> str:
    """--remove_underscore, kaomoji kept (see KAOMOJIS)."""
    return tag if len(tag) <= 3 or tag in KAOMOJIS else tag.replace("_", " ")


def parse_tag_replacement(spec: str) -> list[tuple[str, str]]:
    """sd-scripts' --tag_replacement "src,dst;src2,dst2", where "\\," and "\\;" stand for a literal , and ;."""
    comma, semicolon = "\0c", "\0s"  # placeholders no tag holds
    escaped = spec.replace("\\,", comma).replace("\\;", semicolon)
    pairs = []
    for entry in escaped.split(";"):
        parts = entry.split(",")
        if len(parts) != 2:
            raise UserError(f"--tag_replacement {spec!r}: each entry must be `source,target` (entries separated by "
                            f"`;`; write \\, or \\; for a literal comma or semicolon)")
        source, target = (p.replace(comma, ",").replace(semicolon, ";") for p in parts)
        pairs.append((source, target))
    return pairs


def rename_tags(table: TagTable, *, separator: str = ", ", character_tag_expand: bool = False,
                remove_underscore: bool = False, replacements: Sequence[tuple[str, str]] = ()) -> TagTable:
    """The names written to captions, in sd-scripts' order: expand, then underscores, then replacements (so a
    replacement's source is written as the tag appears after the first two)."""
    if character_tag_expand:
        table = table.renamed(lambda n, c: expand_character_tag(n, separator) if c == CATEGORY_CHARACTER else n)
    if remove_underscore:
        table = table.renamed(lambda n, c: underscores_to_spaces(n))
    names = list(table.names)
    for source, target in replacements:
        # sd-scripts replaces the first match only, looking at general tags, then characters, then ratings.
        for category in (CATEGORY_GENERAL, CATEGORY_CHARACTER, CATEGORY_RATING):
            hit = next((i for i in table.indices(category) if names[i] == source), None)
            if hit is not None:
                names[hit] = target
                break
    return TagTable(tuple(names), table.categories)


def split_tags(text: str, separator: str = ", ") -> list[str]:
    """Tags in a flag or caption, split on the separator without its spaces (sd-scripts' rule); a separator of
    spaces alone splits on commas (sd-scripts would crash on it)."""
    return [tag.strip() for tag in text.split(separator.strip() or ",") if tag.strip()]


@dataclass
class TagOptions:
    general_threshold: float = 0.35
    character_threshold: float = 0.35
    use_rating_tags: bool = False
    use_rating_tags_as_last_tag: bool = False
    character_tags_first: bool = False
    always_first_tags: Sequence[str] = ()
    undesired_tags: frozenset[str] = frozenset()


@dataclass
class ImageTags:
    """One image's tags: `tags` in caption order, and by category for --debug."""

    tags: list[str] = field(default_factory=list)
    rating: str | None = None
    characters: list[str] = field(default_factory=list)
    general: list[str] = field(default_factory=list)


def choose_tags(scores: np.ndarray, table: TagTable, options: TagOptions) -> ImageTags:
    """Tags for one image from the model's scores, ordered as sd-scripts orders them.

    General tags at or above --general_threshold and character tags at or above --character_threshold, in csv
    order; undesired ones dropped. --character_tags_first puts each character tag at the front as it comes (so
    several end up in reverse csv order, as in sd-scripts). The rating (the highest of the rating scores) goes
    first with --use_rating_tags, last with --use_rating_tags_as_last_tag. Then each --always_first_tags tag
    present is moved to the front in turn, so the list's last tag ends up first (sd-scripts again).
    sd-scripts maps scores to tags by position (4 ratings, then general, then character tags); we map each score
    to its csv row, which is the same for the released csv files and right for any other order.
    """
    if len(scores) != len(table.names):
        raise ValueError(f"{len(scores)} scores for {len(table.names)} tags")
    out = ImageTags()
    for i, (name, category) in enumerate(zip(table.names, table.categories)):
        if name in options.undesired_tags:
            continue
        if category == CATEGORY_GENERAL and scores[i] >= options.general_threshold:
            out.general.append(name)
            out.tags.append(name)
        elif category == CATEGORY_CHARACTER and scores[i] >= options.character_threshold:
            out.characters.append(name)
            if options.character_tags_first:
                out.tags.insert(0, name)
            else:
                out.tags.append(name)
    ratings = table.indices(CATEGORY_RATING)
    if (options.use_rating_tags or options.use_rating_tags_as_last_tag) and ratings:
        best = table.names[max(ratings, key=lambda i: scores[i])]  # the first of equal scores, like argmax
        if best not in options.undesired_tags:
            out.rating = best
            if options.use_rating_tags:
                out.tags.insert(0, best)
            else:
                out.tags.append(best)
    for tag in options.always_first_tags:
        if tag in out.tags:
            out.tags.remove(tag)
            out.tags.insert(0, tag)
    return out


def merge_tags(existing_text: str, new_tags: Iterable[str], separator: str = ", ") -> str:
    """--append_tags: the existing caption's tags, then the new ones it lacks.

    New tags are split on the separator first (an expanded "name, series" counts as two), so merging twice adds
    nothing the second time; sd-scripts compares the joined pair and would append it again.
    """
    existing = split_tags(existing_text.strip("\n"), separator)
    merged = list(existing)
    for tag in new_tags:
        for part in split_tags(tag, separator) or [tag]:
            if part not in merged:
                merged.append(part)
    return separator.join(merged)


def on_white(image: Image.Image) -> Image.Image:
    """RGB with transparent parts laid on white, as the tagger was trained (sd-scripts' plain convert("RGB")
    instead keeps whatever colour transparent pixels store, often black)."""
    if image.mode == "RGB":
        return image
    rgba = image.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def preprocess(image: Image.Image, size: int) -> np.ndarray:
    """The model's input for one image: size x size x 3, BGR, float32 0..255 (the batch makes it NHWC).

    Transparency on white, padded to a centred square with white, then resized as sd-scripts does: area
    averaging when shrinking, Lanczos when enlarging.
    """
    rgb = np.asarray(on_white(image))
    height, width = rgb.shape[:2]
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    square = np.pad(rgb, ((top, side - height - top), (left, side - width - left), (0, 0)), constant_values=255)
    if side != size:
        square = resize_image(Image.fromarray(square), (size, size))
    return np.ascontiguousarray(square[:, :, ::-1], dtype=np.float32)


def input_size(shape: Sequence) -> int:
    """The square image size from the model's NHWC input shape; symbolic sizes give DEFAULT_IMAGE_SIZE."""
    if len(shape) != 4 or (isinstance(shape[3], int) and shape[3] != 3):
        raise UserError(f"model.onnx takes input of shape {list(shape)}, not the WD14 tagger's "
                        f"[batch, height, width, 3]; use a WD14 tagger's model.onnx")
    height, width = shape[1], shape[2]
    if isinstance(height, int) and isinstance(width, int) and height != width:
        raise UserError(f"model.onnx takes {width}x{height} images; the WD14 tagger's input is square")
    fixed = [s for s in (height, width) if isinstance(s, int) and s > 0]
    return fixed[0] if fixed else DEFAULT_IMAGE_SIZE


def fixed_batch_size(shape: Sequence) -> int | None:
    """The model's batch size when its input fixes one (some re-exported models do), else None."""
    return shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else None


def choose_providers(device: str, providers: str | None, available: Sequence[str]) -> list[str]:
    """onnxruntime execution providers for --providers (a comma list) or --device (auto, cpu, cuda).

    auto is sd-scripts' choice (CUDA, else ROCm, else CPU; its OpenVINO default is left to --providers).
    """
    if providers:
        wanted = [p.strip() for p in providers.split(",") if p.strip()]
        missing = [p for p in wanted if p not in available]
        if missing or not wanted:
            raise UserError(f"--providers {providers}: {', '.join(missing) or 'none named'} not in this "
                            f"onnxruntime's providers ({', '.join(available)})")
        return wanted
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise UserError(f"--device cuda: this onnxruntime has no CUDAExecutionProvider (it has "
                            f"{', '.join(available)}); pip install onnxruntime-gpu, or use --device cpu")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device != "auto":
        raise UserError(f"--device {device}: use auto, cpu or cuda (or name providers with --providers)")
    for gpu in ("CUDAExecutionProvider", "ROCMExecutionProvider"):
        if gpu in available:
            return [gpu, "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]
