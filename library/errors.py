"""User-facing errors: one line saying what is wrong, where, and how to fix it; exit code 2, no traceback.
An interruption (Ctrl+C, SIGTERM) is one line too, with the shell's code for it (130 for Ctrl+C)."""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

USER_ERROR_EXIT_CODE = 2
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for a program stopped by Ctrl+C

F = TypeVar("F", bound=Callable[..., object])


class UserError(Exception):
    """A mistake in the user's input (a path, a flag, a file). Never a bug in our code."""


class Interrupted(Exception):
    """The user stopped the program; the message says what was (not) saved."""

    def __init__(self, message: str, exit_code: int = INTERRUPTED_EXIT_CODE):
        super().__init__(message)
        self.exit_code = exit_code


def say(line: str) -> None:
    """One line to stderr in one write: print() writes the text and the newline apart, so the lines of processes
    sharing the stream (ranks under accelerate launch) could run together ("...'?)error: ..."); one write of a short
    line to a pipe is atomic."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def exit_on_user_error(main: F) -> F:
    """Wrap an entry point so a UserError prints one line to stderr and exits with code 2, and an interruption
    prints one line and exits with code 130."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            say(f"error: {err}")
            raise SystemExit(USER_ERROR_EXIT_CODE) from None
        except Interrupted as err:
            say(str(err))
            raise SystemExit(err.exit_code) from None
        except KeyboardInterrupt:
            say("interrupted (Ctrl+C); files saved before are intact")
            raise SystemExit(INTERRUPTED_EXIT_CODE) from None

    return wrapper  # type: ignore[return-value]
