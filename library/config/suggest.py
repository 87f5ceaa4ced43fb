"""Did-you-mean suggestions for misspelt option and key names."""

from __future__ import annotations

import difflib
from typing import Iterable


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The valid name the user most likely meant, or None if nothing is close."""
    candidates = list(candidates)
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    if match:
        return match[0]
    # Transposed or dropped letters in long names score low with difflib; compare sorted letters too.
    key = sorted(name.lower())
    same_letters = [c for c in candidates if abs(len(c) - len(name)) <= 1 and
                    difflib.SequenceMatcher(None, sorted(c.lower()), key).ratio() > 0.9]
    return same_letters[0] if same_letters else None


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """" (did you mean 'x'?)" or "" — to append to an error message."""
    match = closest(name, candidates)
    return f" (did you mean '{match}'?)" if match else ""
