"""Option declarations: one record per option (name, type, default, help, section); everything else derives from them."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

# Entry scripts an option can belong to.
NETWORK, DB, TI, HYPERNETWORK = "network", "db", "ti", "hypernetwork"
ALL_SCRIPTS = frozenset({NETWORK, DB, TI, HYPERNETWORK})


class IntOrFloat:
    """Type marker for sd-scripts' int-or-float options (e.g. lr_warmup_steps: a count, a ratio below 1, or '10%')."""


# What a string option names (Option.path): the checks its value gets before a run starts (library/config/checks.py).
INPUT_PATH = "input path"  # a file, folder or hub id that is read: every component at most 255 bytes
OUTPUT_DIR = "output folder"  # a folder that is written: also neither a file nor under one
FILE_NAME = "file name"  # one file name, no folders: also not empty, no '/' or '\\'


@dataclass(frozen=True)
class Numbers:
    """A string option that holds comma-separated numbers ('512,768'): their type and how many (counts)."""

    type: type  # int or float
    counts: tuple[int, ...]
    ascending: bool = False  # each number at least the one before (e.g. 'min,max')


@dataclass(frozen=True)
class Option:
    name: str
    type: type  # bool, int, float, str, or IntOrFloat
    default: Any
    help: str
    section: str
    choices: tuple | None = None
    nargs: str | None = None  # "*" or "+": a list of `type` values (e.g. network_args, optimizer_args)
    scripts: frozenset = ALL_SCRIPTS
    # None: implemented. An issue number: declared so sd-scripts configs parse, but setting it is refused until then.
    later: int | None = None
    # Shown instead of the generic "not supported yet" message (e.g. "SDXL is out of scope for now").
    note: str | None = None
    # Defaults that differ per entry script, as sd-scripts' parsers differ: ((script, default), ...).
    per_script: tuple = ()
    # Notes for some entry scripts only (an option refused in one trainer, supported in another): ((script, note), ...).
    note_per_script: tuple = ()
    # Constraints on the value, checked by resolve for flags and --config_file alike and by the dataset config for
    # its keys (library/config/checks.py). For a list (nargs) or Numbers option they apply to every number.
    minimum: float | None = None  # value >= minimum
    maximum: float | None = None  # value <= maximum
    above: float | None = None  # value > above
    below: float | None = None  # value < below
    allow_inf: bool = False  # a float may be inf (when that means "no limit"); nan is never a value
    numbers: Numbers | None = None  # a str option that holds numbers, each checked like an int/float option
    path: str | None = None  # INPUT_PATH, OUTPUT_DIR or FILE_NAME
    max_bytes: int | None = None  # most UTF-8 bytes a str value may have (a name other names are built from)
    pattern: tuple[str, str] | None = None  # (regex the whole str value matches, what it looks like in words)
    # Rules with another option: (name, value) when this one is set (not None/False): that option must have the
    # value (None: must be given at all); not_above: this value may not exceed that option's value when both are set.
    requires: tuple[str, Any] | None = None
    not_above: str | None = None
    # Values a config file may hold that mean "leave it at the default" (GUIs write max_token_length = 75 and
    # dynamo_backend = "no"); empty strings, false and out-of-range zeros count too (config_file.is_off).
    off: tuple = ()
    # (option, values) this one acts only with: that option set (values None) or set to one of `values`. Without it
    # a value here changes nothing, so it is accepted even where the option itself is not supported (GUIs write
    # huggingface_repo_type = "model" with an empty huggingface_repo_id).
    inert_without: tuple[str, tuple | None] | None = None

    def for_script(self, script: str) -> "Option":
        """This option as `script` declares it (its own default, if it has one)."""
        defaults, notes = dict(self.per_script), dict(self.note_per_script)
        changes = {"default": defaults[script]} if script in defaults else {}
        if script in notes:
            changes["note"] = notes[script]
        return replace(self, **changes) if changes else self
