"""The resolved options of one run: read-only, attribute access, and where each value came from."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Iterator, Mapping


class RunConfig(Mapping[str, Any]):
    """Frozen option values (defaults < --config_file < command line) with their origins."""

    __slots__ = ("_values", "_origins", "script")

    def __init__(self, values: Mapping[str, Any], origins: Mapping[str, str], script: str):
        object.__setattr__(self, "_values", MappingProxyType(dict(values)))
        object.__setattr__(self, "_origins", MappingProxyType(dict(origins)))
        object.__setattr__(self, "script", script)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"no option named {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("RunConfig is read-only; use replace()")

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def origin(self, name: str) -> str:
        """"default", "command line", or "<file> [section]"."""
        return self._origins.get(name, "default")

    def is_set(self, name: str) -> bool:
        return self.origin(name) != "default"

    def replace(self, origin: str = "derived", **changes: Any) -> "RunConfig":
        values = dict(self._values) | changes
        origins = dict(self._origins) | {k: origin for k in changes}
        return RunConfig(values, origins, self.script)
