"""The answer of an entry script whose method has not landed yet: one line and exit code 2."""

import sys

from library.errors import USER_ERROR_EXIT_CODE


def exit_not_yet(script: str, what: str, issue: int) -> None:
    print(f"{script}: not yet — {what} lands with issue #{issue}; train_network.py already loads and re-saves models.",
          file=sys.stderr)
    raise SystemExit(USER_ERROR_EXIT_CODE)
