"""Caption templates for textual inversion and hypernetworks: sd-scripts' built-in lists and AUTOMATIC1111 template files."""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Protocol, Sequence

from library.errors import UserError

# imagenet_templates_small of the textual-inversion paper's code, as sd-scripts' --use_object_template uses it
OBJECT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)

# imagenet_style_templates_small, for --use_style_template. The two repeated lines are in the original list too;
# they are kept so a random choice weighs the entries exactly as sd-scripts does.
STYLE_TEMPLATES: tuple[str, ...] = (
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a cropped painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
)

_BUILTIN = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}

# A1 drops the leading number (and dashes) its image tools put in front of saved file names
_LEADING_NUMBER = re.compile(r"^[-\d]+\s*")

_REGEX_OPTION = "--ti_filename_word_regex"


class _Entry(Protocol):
    path: str | os.PathLike
    caption: str


def _template_error(path: Path, what: str) -> UserError:
    return UserError(f"template file {path}: {what}; give a UTF-8 text file with one prompt per line, "
                     f"using [name] and [filewords]")


def _read_text(path: Path) -> str:
    if not path.exists():
        raise _template_error(path, "does not exist")
    if path.is_dir():
        raise _template_error(path, "is a folder, not a file")
    try:
        # utf-8-sig so a file saved with a BOM by Windows editors does not start its first prompt with one
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise _template_error(path, "is not UTF-8 text") from None
    except OSError as err:
        raise _template_error(path, f"cannot be read ({err.strerror})") from None


def read_template_file(path: str | os.PathLike) -> list[str]:
    """The file's prompt lines, stripped, blank ones left out; UserError when there are none or it cannot be read."""
    path = Path(path)
    lines = [line.strip() for line in _read_text(path).splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise _template_error(path, "has no prompt lines")
    return lines


def _compile_word_regex(word_regex: str | None) -> re.Pattern[str] | None:
    if not word_regex:
        return None  # A1 treats an empty regex option as none
    try:
        pattern = re.compile(word_regex)
    except re.error as err:
        raise UserError(f"{_REGEX_OPTION} '{word_regex}' is not a valid regular expression ({err}); "
                        f"fix it or leave the option out") from None
    # findall gives tuples for several groups, which cannot be joined into words
    if pattern.groups > 1:
        raise UserError(f"{_REGEX_OPTION} '{word_regex}' has {pattern.groups} groups; use at most one, "
                        f"writing the others as (?:...)")
    return pattern


def _words_of(path: str | os.PathLike, pattern: re.Pattern[str] | None, join_string: str) -> str:
    stem = _LEADING_NUMBER.sub("", Path(path).stem)
    return stem if pattern is None else join_string.join(pattern.findall(stem))


def filename_words(path: str | os.PathLike, *, word_regex: str | None = None, join_string: str = " ") -> str:
    """A1's [filewords] for an image without a caption: the file stem less its leading number, optionally
    reduced to the regex's matches joined by `join_string`."""
    return _words_of(path, _compile_word_regex(word_regex), join_string)


class CaptionTemplates:
    """Replaces each training caption by a random template line, with [name] and [filewords] filled in."""

    def __init__(self, lines: Sequence[str], *, name: str, word_regex: str | None = None,
                 join_string: str = " ") -> None:
        if not lines:
            raise ValueError("CaptionTemplates needs at least one template line")
        self.lines = tuple(lines)
        self.name = name
        self.join_string = join_string
        self._pattern = _compile_word_regex(word_regex)

    @classmethod
    def builtin(cls, kind: str, *, name: str) -> CaptionTemplates:
        """sd-scripts' object or style list, its "{}" placeholder turned into [name]."""
        if kind not in _BUILTIN:
            raise ValueError(f"template kind must be one of {sorted(_BUILTIN)}, got {kind!r}")
        return cls([line.replace("{}", "[name]") for line in _BUILTIN[kind]], name=name)

    def _filewords(self, caption: str, entry: _Entry) -> str:
        # A1111: the caption file's text, else the file name's words. An image whose caption is only its folder's
        # class tokens has no caption file; the raw caption (not the processed one) decides, so an image whose
        # processing left nothing still counts as captioned.
        if getattr(entry, "own_caption", True) and entry.caption.strip():
            return caption
        return _words_of(entry.path, self._pattern, self.join_string)

    def __call__(self, caption: str, entry: _Entry, rng: random.Random) -> str:
        line = rng.choice(self.lines)
        # [filewords] first, as A1 does, so a caption written with [name] in it gets the name too
        line = line.replace("[filewords]", self._filewords(caption, entry))
        return line.replace("[name]", self.name)

    def uses_name(self) -> bool:
        """Whether any line has [name]; without it the trained token never appears in a caption."""
        return any("[name]" in line for line in self.lines)
