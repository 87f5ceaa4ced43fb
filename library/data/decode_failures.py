"""Images that fail to decode during training: each named once and skipped, or with --strict the run stops.

The plan reads image headers only, so a file whose pixels are cut short or damaged is found when a batch (or the
latent cache) first decodes it. What then happens to its batch is decided in dataset.py (another image takes its
slot); this module keeps the record and writes the one-line messages.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from library.data.images import CorruptImageError
from library.errors import UserError


class DataLoadingError(UserError):
    """A UserError raised while a batch is loaded. A DataLoader worker's exception reaches the main process as
    `type(message_with_the_worker_traceback)`; this class keeps only its own one-line message from that text."""

    def __init__(self, message: str) -> None:
        marker = f"{type(self).__module__}.{type(self).__qualname__}: "
        if message.startswith("Caught ") and marker in message:
            message = message[message.rindex(marker) + len(marker):].strip()
        super().__init__(message)


def skipped_message(err: CorruptImageError) -> str:
    return (f"warning: skipped image {err.path}: it cannot be decoded ({err.reason}); other images of its bucket "
            "take its place in each batch. Replace or delete the file (--strict stops the run instead)")


def strict_message(err: CorruptImageError) -> str:
    return (f"{err.path}: the image cannot be decoded ({err.reason}); --strict stops the run on a bad image: replace "
            "or delete the file, or drop --strict to skip it")


def nothing_decodes_message(what: str, count: int, example: tuple[Path, str] | None) -> str:
    sample = f" (e.g. {example[0]}: {example[1]})" if example else ""
    return (f"none of the {count} {what} can be decoded{sample}: replace the broken files (--dry_run decodes every "
            "image and lists those it cannot read), then run again")


def _warn(line: str) -> None:
    # tqdm.write keeps the progress bar intact when the message comes from the process that draws it.
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stderr)


class DecodeFailures:
    """Which images of the run failed to decode, shared by the DataLoader's worker processes.

    One byte per image lives in shared memory, so a failure found by one worker (or by the main process before the
    workers start, e.g. while caching latents) is known to all, including workers started again for a new epoch:
    each image is named once per run (two workers meeting the same new file at the same moment may both name it).
    A known failure is skipped without decoding again; decoding is deterministic, so that changes no batch.
    """

    def __init__(self, paths: Iterable[str | Path], *, strict: bool = False,
                 known: Mapping[Path, str] | None = None) -> None:
        self.strict = strict
        self._ids = {path: i for i, path in enumerate(dict.fromkeys(Path(p) for p in paths))}
        self._failed = torch.zeros(max(1, len(self._ids)), dtype=torch.uint8).share_memory_()
        self._reasons: dict[Path, str] = {}
        for path, reason in (known or {}).items():
            self._mark(Path(path), reason)

    def __contains__(self, path: str | Path) -> bool:
        index = self._ids.get(Path(path))
        return bool(self._failed[index]) if index is not None else Path(path) in self._reasons

    def record(self, err: CorruptImageError) -> None:
        """Note a failure: name it (once), or with --strict stop the run with one line."""
        if self.strict:
            raise DataLoadingError(strict_message(err))
        if self._mark(Path(err.path), err.reason):
            _warn(skipped_message(err))

    def example(self) -> tuple[Path, str] | None:
        """One failure (path, reason) for a message, preferably one this process saw; None when there is none."""
        if self._reasons:
            return next(iter(self._reasons.items()))
        found = next((path for path, index in self._ids.items() if self._failed[index]), None)
        return (found, "found by another data-loader worker") if found is not None else None

    def _mark(self, path: Path, reason: str) -> bool:
        """Remember the failure; True when it was new to every process."""
        new_here = path not in self._reasons
        self._reasons.setdefault(path, reason)
        index = self._ids.get(path)
        if index is None:
            return new_here
        new = not bool(self._failed[index])
        self._failed[index] = 1
        return new
