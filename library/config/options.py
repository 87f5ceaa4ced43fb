"""Option declarations: one record per option (name, type, default, help, section); everything else derives from them."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

# Entry scripts an option can belong to.
NETWORK, DB, TI, HYPERNETWORK = "network", "db", "ti", "hypernetwork"
ALL_SCRIPTS = frozenset({NETWORK, DB, TI, HYPERNETWORK})


class IntOrFloat:
    """Type marker for sd-scripts' int-or-float options (e.g. lr_warmup_steps: a count, or a ratio below 1)."""


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

    def for_script(self, script: str) -> "Option":
        """This option as `script` declares it (its own default, if it has one)."""
        defaults = dict(self.per_script)
        return replace(self, default=defaults[script]) if script in defaults else self
