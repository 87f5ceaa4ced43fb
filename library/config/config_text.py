"""Parse TOML and JSON config text with errors that name file, line and column and explain common mistakes."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

from library.errors import UserError

_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")
QUOTES = "\"'"
TOML_KEY = re.compile(r"""^\s*("[^"]*"|'[^']*'|[A-Za-z0-9_-]+)\s*[=.]""")


# Python's parsers recurse once per nesting level: a file nested deeper than this stops them with RecursionError.
TOO_DEEP = ("arrays or tables are nested too deeply to read (thousands of levels); a config needs only a few "
            "levels: check the file for runaway brackets")


def parse_toml(text: str, file: Path) -> dict:
    try:
        return tomllib.loads(text)
    except RecursionError:
        raise UserError(f"{file}: {TOO_DEEP}") from None
    except tomllib.TOMLDecodeError as err:
        message = str(err)
        position = _TOML_POSITION.search(message)
        if position is None:  # e.g. "Unclosed array (at end of document)"
            raise UserError(f"{file}: TOML syntax error: {message.replace('document', 'file')}") from None
        line, column = int(position[1]), int(position[2])
        lines = text.splitlines()
        line_text = lines[line - 1] if line <= len(lines) else ""
        raise UserError(f"{file}:{line}:{column}: {_explain_toml(message[:position.start()], line_text)}") from None


def _explain_toml(message: str, line_text: str) -> str:
    if message == "Cannot overwrite a value":
        key = TOML_KEY.match(line_text)
        what = f"key '{key[1].strip(QUOTES)}' is" if key else "this key or table is"
        return f"{what} given twice in the same table (TOML: {message}); keep only one"
    declared = re.fullmatch(r"Cannot declare \((.*)\) twice", message)
    if declared:
        name = ".".join(part.strip(" '\"") for part in declared[1].split(",") if part.strip())
        return f"table [{name}] is declared twice (TOML: {message}); merge them into one"
    if message.startswith("Unescaped '\\'"):
        return (f"TOML syntax error: {message}; in double quotes a backslash starts an escape: write Windows paths "
                "in single quotes ('C:\\images') or with forward slashes")
    return f"TOML syntax error: {message}"


def parse_json(text: str, file: Path) -> Any:
    def unique_keys(pairs):
        table = {}
        for key, value in pairs:
            if key in table:  # json would silently keep the last one
                raise UserError(f"{file}: key '{key}' is given twice in the same JSON object; keep only one")
            table[key] = value
        return table

    try:
        return json.loads(text, object_pairs_hook=unique_keys)
    except RecursionError:
        raise UserError(f"{file}: {TOO_DEEP}") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{file}:{err.lineno}:{err.colno}: JSON syntax error: {err.msg}") from None
