"""--config_file TOML: sd-scripts' layout (any section names, keys are option names) read strictly; and writing one."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Mapping

import toml

from library.config.config_text import parse_toml
from library.config.options import IntOrFloat, Option
from library.config.suggest import did_you_mean
from library.errors import UserError
from library.safe_write import atomic_file

SCRIPT_FILES = {"network": "train_network.py", "db": "train_db.py", "ti": "train_textual_inversion.py",
                "hypernetwork": "train_hypernetwork.py"}


def config_path(name: str) -> Path:
    """sd-scripts appends `.toml` when the name has no extension."""
    path = Path(name).expanduser()
    return path if path.suffix.lower() == ".toml" else path.with_name(path.name + ".toml")


def read_config_file(name: str, options: Mapping[str, Option], script: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Values and their origins ("file [section]") from a config TOML; every key checked against all declarations
    (`options`), keys of other entry scripts warned about and dropped."""
    path = config_path(name)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"--config_file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"--config_file {path}: cannot read it ({err})") from None
    data = parse_toml(text, path)
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    sections: dict[str, str] = {}
    for section, key, value in _flatten(data, path):
        where = f"{path} [{section}]" if section else str(path)
        if key in sections:
            raise UserError(f"{path}: '{key}' is set twice ([{sections[key]}] and [{section}]); keep one")
        sections[key] = section
        option = options.get(key)
        if option is None:
            raise UserError(f"{where}: unknown option '{key}'{did_you_mean(key, options)}")
        if script not in option.scripts:
            users = ", ".join(sorted(SCRIPT_FILES[s] for s in option.scripts))
            print(f"warning: {where}: '{key}' is an option of {users}; {SCRIPT_FILES[script]} ignores it", file=sys.stderr)
            continue
        values[key] = coerce(value, option, where)
        origins[key] = where
    return values, origins


def _flatten(data: dict, path: Path):
    """(section, key, value) for top-level keys and one level of tables, as sd-scripts flattens them."""
    for key, value in data.items():
        if not isinstance(value, dict):
            yield "", key, value
            continue
        for inner, inner_value in value.items():
            if isinstance(inner_value, dict):
                raise UserError(f"{path} [{key}.{inner}]: nested tables are not options; "
                                "put option keys directly under a [section]")
            yield key, inner, inner_value


def coerce(value: Any, option: Option, where: str) -> Any:
    """Check a file value against the declared type, converting what the command line would convert."""
    if option.nargs:
        items = value if isinstance(value, list) else [value]
        return [_coerce_one(v, option, where) for v in items]
    return _coerce_one(value, option, where)


def _coerce_one(value: Any, option: Option, where: str) -> Any:
    kind = option.type
    ok = (
        (kind is bool and isinstance(value, bool))
        or (kind is int and isinstance(value, int) and not isinstance(value, bool))
        or (kind in (float, IntOrFloat) and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (kind is str and isinstance(value, str))
    )
    if not ok and isinstance(value, str) and kind in (int, float, IntOrFloat):
        try:  # the same text on the command line would be accepted, so accept it here too
            value, ok = parse_number(value, kind), True
        except ValueError:
            pass
    if not ok and kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        value, ok = str(value), True  # e.g. resolution = 512 where sd-scripts expects "512"
    if not ok:
        raise UserError(f"{where}: {option.name} must be {type_name(option)}, got {value!r}")
    if option.choices and value not in option.choices:
        raise UserError(f"{where}: {option.name} must be one of {', '.join(map(str, option.choices))}, got {value!r}"
                        f"{did_you_mean(str(value), map(str, option.choices))}")
    return value


def parse_number(text: str, kind: type) -> int | float:
    if kind is int:
        return int(text)
    if kind is IntOrFloat:
        text = text.strip()
        if text.endswith("%"):  # sd-scripts' int_or_float: "10%" is the fraction 0.1 of all steps
            return float(text[:-1]) / 100.0
        number = float(text)
        return int(number) if number.is_integer() and "." not in text and "e" not in text.lower() else number
    return float(text)


def type_name(option: Option) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
             IntOrFloat: "an integer or a number"}
    base = names[option.type]
    return f"a list of {base.removeprefix('a ').removeprefix('an ')}s" if option.nargs else base


def dump_config(values: Mapping[str, Any], options: Mapping[str, Option]) -> str:
    """A config TOML grouped by section; None values are left out (TOML has no null)."""
    sections: dict[str, dict[str, Any]] = {}
    for name, value in values.items():
        if value is not None and name in options:
            sections.setdefault(options[name].section, {})[name] = list(value) if isinstance(value, tuple) else value
    return toml.dumps(sections)


def write_config(path: Path, text: str) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
