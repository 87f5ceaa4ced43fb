"""Typed settings slices: small frozen dataclasses whose field names are declared options, built once from a run's
config, so the code that reads them (noise, losses...) neither looks names up per step nor restates defaults."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Mapping, TypeVar

from library.config.declarations import OPTIONS

_DECLARED = {o.name: o for o in OPTIONS}
_Settings = TypeVar("_Settings")


def settings_from_config(cls: type[_Settings], config: Mapping[str, Any]) -> _Settings:
    """A settings dataclass whose field names are declared options, read once from `config`.

    A missing or None value means the option's declared default (library/config/declarations.py, per entry script
    when `config` is a RunConfig), so no default is restated here; plain dicts (tests, tools) may leave keys out.
    An undeclared field name is a KeyError: every field must be an option.
    """
    script = getattr(config, "script", None)
    values = {}
    for field in fields(cls):
        declared = _DECLARED[field.name]
        value = config.get(field.name)
        if value is None:
            value = (declared.for_script(script) if script else declared).default
        values[field.name] = value
    return cls(**values)
