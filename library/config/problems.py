"""Many problems of one run's options as one user error: all of them at once, still one line."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from library.errors import UserError


def raise_problems(problems: Sequence[str], file: Path | str | None = None) -> None:
    """Nothing when there are none; one problem as it is; several as 'N problems in FILE: a; b; c' (each without
    the file name it starts with, which the lead names once)."""
    if not problems:
        return
    if len(problems) == 1:
        raise UserError(problems[0])
    name = str(file) if file is not None else None
    in_file = [p for p in problems if name and name in p]  # "FILE [section]: ..." or "--x (from FILE): ..."
    if name and len(in_file) == len(problems):
        where = name
    elif name and in_file:
        where = f"the options ({name} and the command line)"
    else:
        where = "the options"
    items = [_without_file(p, name) for p in problems]
    raise UserError(f"{len(problems)} problems in {where}: " + "; ".join(items))


def _without_file(problem: str, name: str | None) -> str:
    if name and problem.startswith(name + ": "):
        return problem[len(name) + 2:]
    if name and problem.startswith(name + " ["):
        return problem[len(name) + 1:]
    return problem
