"""Option values checked against their declarations before any weights load: ranges, finiteness, names, paths."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

from library.config.options import FILE_NAME, INPUT_PATH, OUTPUT_DIR, IntOrFloat, Option
from library.errors import UserError

NAME_MAX = 255  # bytes per path component on ext4, NTFS (UTF-16 units), APFS, ...
NUMERIC = (int, float, IntOrFloat)


# --- ranges, in words (messages and the generated docs say the same thing) ---

def range_text(minimum=None, maximum=None, above=None, below=None) -> str:
    """'at least 1', 'between 0 and 1', 'above 0', 'at least 0 and below 1', ... ('' without bounds)."""
    if minimum is not None and maximum is not None:
        return f"between {_num(minimum)} and {_num(maximum)}"
    low = f"at least {_num(minimum)}" if minimum is not None else f"above {_num(above)}" if above is not None else ""
    high = f"at most {_num(maximum)}" if maximum is not None else f"below {_num(below)}" if below is not None else ""
    return " and ".join(part for part in (low, high) if part)


def range_problem(value: int | float, *, minimum=None, maximum=None, above=None, below=None,
                  allow_inf: bool = False) -> str | None:
    """What is wrong with `value` for these bounds ('must be at least 1'), or None when it fits."""
    if isinstance(value, float) and (math.isnan(value) or (math.isinf(value) and not allow_inf)):
        limits = range_text(minimum, maximum, above, below)
        return "must be a finite number" + (f", {limits}" if limits else "")
    fits = ((minimum is None or value >= minimum) and (maximum is None or value <= maximum)
            and (above is None or value > above) and (below is None or value < below))
    return None if fits else f"must be {range_text(minimum, maximum, above, below)}"


def option_range_text(opt: Option) -> str:
    """The declared range of an option in words ('' when it has none); 'each ...' for lists and number strings."""
    text = range_text(opt.minimum, opt.maximum, opt.above, opt.below)
    return f"each {'number ' if opt.numbers else ''}{text}" if text and (opt.nargs or opt.numbers) else text


def has_range(opt: Option) -> bool:
    return any(bound is not None for bound in (opt.minimum, opt.maximum, opt.above, opt.below))


def _num(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() and abs(bound) < 1e16 else str(bound)


# --- one value ---

def check_value(opt: Option, value: Any, place: str) -> None:
    """Raise a UserError starting with `place` when `value` breaks `opt`'s declared constraints."""
    if value is None:
        return
    for item in (value if isinstance(value, (list, tuple)) else [value]):
        if opt.type is str:
            check_text(opt, item, place)
            if opt.numbers is not None:
                check_numbers(opt, parse_numbers(opt, item, place), place)
        elif opt.type in NUMERIC:
            check_number(opt, item, place)


def check_number(opt: Option, value: int | float, place: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return  # the type was checked when the value was read
    problem = range_problem(value, minimum=opt.minimum, maximum=opt.maximum, above=opt.above, below=opt.below,
                            allow_inf=opt.allow_inf)
    if problem is None and opt.type is IntOrFloat and isinstance(value, float) and value >= 1:
        # sd-scripts multiplies any float by the step count, so 10.0 would mean ten runs' worth of steps
        count = f"write {_num(value)} (no decimal point)" if value.is_integer() else "give a whole number"
        problem = f"a fraction of all steps must be below 1 (or a percentage below 100%); {count} for a count of steps"
    if problem:
        raise UserError(f"{place}: {problem}")


def parse_numbers(opt: Option, text: str, place: str) -> list[int | float]:
    """The numbers of a Numbers option ('512,768' -> [512, 768]), refusing a wrong count or non-numbers."""
    spec = opt.numbers
    try:
        numbers = [spec.type(part) for part in str(text).split(",")]
    except ValueError:
        numbers = []
    if len(numbers) not in spec.counts:
        kind = "integers" if spec.type is int else "numbers"
        count = " or ".join(map(str, spec.counts))
        raise UserError(f"{place}: must be {count} comma-separated {kind}; {opt.name}: {opt.help}")
    return numbers


def check_numbers(opt: Option, numbers: Iterable[int | float], place: str) -> None:
    """Each number of a Numbers option (or of a dataset config pair) within the option's range, in order if asked."""
    numbers = list(numbers)
    for number in numbers:
        problem = range_problem(number, minimum=opt.minimum, maximum=opt.maximum, above=opt.above,
                                below=opt.below, allow_inf=opt.allow_inf)
        if problem:
            raise UserError(f"{place}: each number {problem}, got {_num(number)}")
    if opt.numbers is not None and opt.numbers.ascending and numbers != sorted(numbers):
        raise UserError(f"{place}: the first number must not be larger than the second (min,max)")


def check_text(opt: Option, value: str, place: str) -> None:
    """No NUL byte, valid UTF-8 (argv bytes that did not decode arrive as surrogates), names and paths that a file
    system can hold."""
    if not isinstance(value, str):
        return
    if "\0" in value:
        raise UserError(f"{place}: contains a NUL byte (\\x00), which no name or text may hold; remove it")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise UserError(f"{place}: contains bytes that are not UTF-8 text; use UTF-8 characters (for a path, "
                        "rename the file or folder)") from None
    if opt.max_bytes is not None and size > opt.max_bytes:
        raise UserError(f"{place}: is {size} bytes long; at most {opt.max_bytes} bytes, as longer file names are "
                        "built from it (file systems allow 255 bytes per name)")
    if opt.pattern is not None and not re.fullmatch(opt.pattern[0], value):
        raise UserError(f"{place}: must be {opt.pattern[1]}")
    if opt.path == FILE_NAME:
        if not value.strip() or value in (".", ".."):
            raise UserError(f"{place}: must be a file name, not {'empty' if not value.strip() else repr(value)}; "
                            "give a name such as my_lora, or leave the option out")
        if "/" in value or "\\" in value:
            raise UserError(f"{place}: is a file name, not a path; put the folder in --output_dir and keep only "
                            "the name here")
    if opt.path in (INPUT_PATH, OUTPUT_DIR, FILE_NAME):
        for part in re.split(r"[/\\]", value):
            if len(os.fsencode(part)) > NAME_MAX:
                raise UserError(f"{place}: the name '{part[:24]}...' is {len(os.fsencode(part))} bytes long; file "
                                f"systems allow at most {NAME_MAX} bytes per file or folder name")
    if opt.path == OUTPUT_DIR:
        check_output_folder(value, place)


def check_output_folder(value: str, place: str) -> None:
    """A folder the run writes to: not empty, not an existing file, and not under one (no folder can be made there)."""
    if not value.strip():
        raise UserError(f"{place}: must name a folder, not be empty; give a folder such as ./output")
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise UserError(f"{place}: '{path}' is a file, not a folder; choose another folder or move the file away")
    for parent in path.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise UserError(f"{place}: '{parent}' is not a folder (a file or a broken link), so no folder can be "
                                "made under it; choose another folder")
            return


# --- between options ---

def relation_problems(config: Mapping[str, Any], declared: Mapping[str, Option], origin) -> list[str]:
    """Option.requires (another option must be set, or have one value) and Option.not_above (a bound by another)."""
    problems = []
    for opt in declared.values():
        value = config.get(opt.name)
        if opt.requires and value not in (None, False) and opt.requires[0] in declared:
            other, wanted = opt.requires
            have = config.get(other)
            if (have is None) if wanted is None else (have != wanted):
                need = f"--{other}" + ("" if wanted is None else f" {wanted}")
                now = "is not given" if have is None else f"is {have!r} ({origin(other)})"
                problems.append(f"--{opt.name} ({origin(opt.name)}) needs {need}, but --{other} {now}: add {need}, "
                                f"or drop --{opt.name}")
        if opt.not_above and value is not None and config.get(opt.not_above) is not None:
            high = config[opt.not_above]
            if value > high:
                problems.append(f"--{opt.name} {value} ({origin(opt.name)}) is above --{opt.not_above} {high} "
                                f"({origin(opt.not_above)}); lower --{opt.name} or raise --{opt.not_above}")
    return problems


# --- a whole resolved config ---

def value_problems(config, declared: Mapping[str, Option]) -> dict[str, str]:
    """{option: what is wrong with its value} for each value that breaks its declaration."""
    problems = {}
    for name, opt in declared.items():
        value = config.get(name)
        if value is not None:
            try:
                check_value(opt, value, place(name, value, config.origin(name)))
            except UserError as err:
                problems[name] = str(err)
    return problems


def rule_problems(config, declared: Mapping[str, Option]) -> list[str]:
    """The rules between options, and the adapter module's own network_args keys."""
    problems = relation_problems(config, declared, config.origin)
    from_weights = config.get("dim_from_weights") and config.get("network_weights")  # the file's layout: args unused
    if "network_args" in declared and config.get("network_args") and not from_weights:
        # key=value strings whose keys and ranges the adapter module declares (networks/args.py); imports torch
        from networks.args import check_network_args

        try:
            families = config.get("model_families") or ()
            layout = "sd"
            if families:  # the script's family (SD 1.x/2.x share one layout) sizes the block-wise keys
                from library.models.family import family_named

                layout = family_named(families[0]).unet_targets.blocks
            check_network_args(config.get("network_args"), config.get("network_module"), layout)
        except UserError as err:
            problems.append(str(err))
    return problems


def place(name: str, value: Any, origin: str) -> str:
    """Where a value was given, for messages: '--name value' on the command line, 'file [section]: name = value'."""
    shown = shown_value(value)
    if origin == "command line":
        return f"--{name} {shown}"
    if origin == "default":
        return f"--{name} (default {shown})"
    return f"{origin}: {name} = {shown}"


def shown_value(value: Any) -> str:
    """A value as the user typed it, printable whatever it holds (an undecodable argv byte shows as \\udcNN)."""
    if isinstance(value, (list, tuple)):
        return " ".join(shown_value(v) for v in value)
    text = str(value)
    if isinstance(value, str):
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
        text = text.replace("\0", "\\x00")
        if not text or text != text.strip() or " " in text:
            text = repr(text)
        if len(text) > 300:  # paths are shown whole; only runaway values are cut
            text = text[:280] + "..."
    return text
