"""User-facing errors: one line saying what is wrong, where, and how to fix it; exit code 2, no traceback."""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

USER_ERROR_EXIT_CODE = 2

F = TypeVar("F", bound=Callable[..., object])


class UserError(Exception):
    """A mistake in the user's input (a path, a flag, a file). Never a bug in our code."""


def exit_on_user_error(main: F) -> F:
    """Wrap an entry point so a UserError prints one line to stderr and exits with code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(USER_ERROR_EXIT_CODE) from None

    return wrapper  # type: ignore[return-value]
