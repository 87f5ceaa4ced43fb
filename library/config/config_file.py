"""--config_file TOML: sd-scripts' layout (any section names, keys are option names) read strictly; and writing one."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import toml

from library.config.config_text import parse_toml
from library.config.gui_keys import GUI_KEYS, GuiKey
from library.config.options import IntOrFloat, Option
from library.config.problems import raise_problems
from library.config.suggest import closest, did_you_mean
from library.errors import UserError
from library.safe_write import atomic_file

SCRIPT_FILES = {"network": "train_network.py", "db": "train_db.py", "ti": "train_textual_inversion.py",
                "hypernetwork": "train_hypernetwork.py"}


def config_path(name: str) -> Path:
    """sd-scripts appends `.toml` when the name has no extension."""
    path = Path(name).expanduser()
    return path if path.suffix.lower() == ".toml" else path.with_name(path.name + ".toml")


@dataclass
class ConfigFile:
    """What a --config_file holds for one script: values and origins, every problem found, and the GUI keys
    ignored ({tool: [key, ...]})."""

    path: Path
    values: dict[str, Any] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    ignored: dict[str, list[str]] = field(default_factory=dict)


def read_config_file(name: str, options: Mapping[str, Option], script: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Values and their origins ("file [section]") from a config TOML; every problem in one UserError."""
    loaded = load_config_file(name, options, script)
    raise_problems(loaded.problems, loaded.path)
    return loaded.values, loaded.origins


def load_config_file(name: str, options: Mapping[str, Option], script: str) -> ConfigFile:
    """Read a config TOML as sd-scripts does, but checked: every key against all declarations (`options`), keys of
    other entry scripts warned about and dropped, off values (see is_off) left at the default, known GUI keys
    ignored, and every problem collected rather than the first raised."""
    path = config_path(name)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"--config_file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"--config_file {path}: cannot read it ({err})") from None
    loaded = ConfigFile(path)
    entries = _entries(parse_toml(text, path), loaded)
    flat = {key: value for _, key, value in entries}
    unknown: list[tuple[str, str]] = []
    for section, key, value in entries:
        where = f"{path} [{section}]" if section else str(path)
        option = options.get(key)
        if option is None:
            if key in GUI_KEYS:
                _gui_key(GUI_KEYS[key], value, where, flat, options, loaded)
            elif closest(key, options):
                loaded.problems.append(f"{where}: unknown option '{key}'{did_you_mean(key, options)}")
            else:
                unknown.append((key, where))
            continue
        if is_off(value, option):
            continue  # GUIs write every field; an unused one holds "", false or 0: the default applies
        if script not in option.scripts:
            users = ", ".join(sorted(SCRIPT_FILES[s] for s in option.scripts))
            print(f"warning: {where}: '{key}' is an option of {users}; {SCRIPT_FILES[script]} ignores it", file=sys.stderr)
            continue
        try:
            loaded.values[key] = coerce(value, option, where)
        except UserError as err:
            loaded.problems.append(str(err))
            continue
        loaded.origins[key] = where
    if len(unknown) == 1:
        loaded.problems.append(f"{unknown[0][1]}: unknown option '{unknown[0][0]}'")
    elif unknown:
        names = ", ".join(key for key, _ in unknown)
        loaded.problems.append(f"{path}: {len(unknown)} unknown options: {names} (not options of any SD 1.x/2.x "
                               "trainer; sd-scripts would silently skip them: remove them)")
    return loaded


def _entries(data: dict, loaded: ConfigFile) -> list[tuple[str, str, Any]]:
    """(section, key, value) as sd-scripts flattens them; a key set twice with one value is kept once."""
    entries: list[tuple[str, str, Any]] = []
    sections: dict[str, tuple[str, Any]] = {}
    for section, key, value in _flatten(data, loaded):
        if key in sections:
            first, earlier = sections[key]
            if earlier != value:  # sd-scripts would silently keep the last one
                loaded.problems.append(f"{loaded.path}: '{key}' is set twice ([{first}] and [{section}]) with "
                                       "different values; keep one")
            continue
        sections[key] = (section, value)
        entries.append((section, key, value))
    return entries


def _flatten(data: dict, loaded: ConfigFile):
    """(section, key, value) for top-level keys and one level of tables, as sd-scripts flattens them."""
    for key, value in data.items():
        if not isinstance(value, dict):
            yield "", key, value
            continue
        for inner, inner_value in value.items():
            if isinstance(inner_value, dict):
                loaded.problems.append(f"{loaded.path} [{key}.{inner}]: nested tables are not options; put option "
                                       "keys directly under a [section]")
                continue
            yield key, inner, inner_value


def _gui_key(key: GuiKey, value: Any, where: str, flat: Mapping[str, Any], options: Mapping[str, Option],
             loaded: ConfigFile) -> None:
    """Ignore a known GUI/wrapper key (noting it), unless ignoring it would change the run: then it is a problem."""
    shown = f"{key.name} = {_as_toml(value)}"
    if key.switch is not None:
        switch = flat.get(key.switch)
        if switch not in (None, False, "", 0):
            if key.name == key.switch:  # the feature's own switch names the problem once
                loaded.problems.append(f"{where}: {shown}: {key.feature} is not supported here; set it to false or "
                                       "remove it")
            return
    if key.means is not None and key.means in options and key.means not in flat:
        target = options[key.means]
        try:
            same = is_off(value, target) or coerce(value, target, where) == target.default
        except UserError:
            same = False
        if not same:
            loaded.problems.append(f"{where}: {shown} is {key.means} as {key.source} names it; sd-scripts does not "
                                   f"read that name from a config file (the run would use {key.means} = "
                                   f"{_as_toml(target.default)}): write {key.means} = {_as_toml(value)} instead")
            return
    loaded.ignored.setdefault(key.source, []).append(key.name)


def _as_toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return f'"{value}"' if isinstance(value, str) else str(value)


def is_off(value: Any, option: Option) -> bool:
    """A config-file value that means "not used" whatever the option: GUIs write every field they have, the unused
    ones as "" or false, or a value the option declares as meaning its default (Option.off: 0 where the GUIs' widgets
    use it for "unset", max_token_length = 75). sd-scripts runs them all."""
    if value is None or (option.nargs and value == []):
        return True
    if value is False or (isinstance(value, str) and not value.strip()):
        return option.type is bool or option.default in (None, False, "")
    if isinstance(value, bool):
        return False
    if option.type in (int, float, IntOrFloat) and isinstance(value, str):
        try:
            value = parse_number(value, option.type)
        except ValueError:
            return False
    return not isinstance(value, list) and value in option.off


def coerce(value: Any, option: Option, where: str) -> Any:
    """Check a file value against the declared type, converting what the command line would convert."""
    if option.nargs:
        items = value if isinstance(value, list) else [value]
        return [_coerce_one(v, option, where) for v in items]
    return _coerce_one(value, option, where)


def _coerce_one(value: Any, option: Option, where: str) -> Any:
    kind = option.type
    if kind is bool and type(value) is int and value in (0, 1):
        value = bool(value)  # the kohya_ss GUI writes persistent_data_loader_workers = 1; sd-scripts reads it as true
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
