"""The run step of an entry script whose method has not landed yet: one line and exit code 2."""

from __future__ import annotations

import sys
from typing import Callable

from library.errors import USER_ERROR_EXIT_CODE


def not_yet(script: str, what: str, issue: int) -> Callable:
    """A `run` callback for entry.start: options and data are checked (and --dry_run works), training is refused."""

    def run(config, plan) -> None:
        print(f"{script}: not yet — {what} lands with issue #{issue}; the options and data were checked "
              "(--dry_run prints the plan), and train_network.py already loads and re-saves models.", file=sys.stderr)
        raise SystemExit(USER_ERROR_EXIT_CODE)

    return run
