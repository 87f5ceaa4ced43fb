"""Write files and folders so that a crash never leaves a half-written result in place."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from library.errors import UserError


@contextlib.contextmanager
def atomic_file(dst: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `dst`; on success it is flushed to disk and renamed onto `dst`."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        _fsync(tmp)
        # mkstemp makes the file private (0600); give it the mode a plain open() would have (or the old file's).
        os.chmod(tmp, dst.stat().st_mode & 0o7777 if dst.exists() else 0o666 & ~_umask())
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(dst: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `dst`; on success it replaces `dst` as a whole."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    old = dst.with_name(f".{dst.name}.old")
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes the folder private (0700)
        for path in tmp.rglob("*"):
            if path.is_file():
                _fsync(path)
        # A folder cannot be renamed over a non-empty folder: move the old one aside first, drop it last.
        if dst.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_atomically(dst: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` and move the result onto `dst` only if it returned normally."""
    with atomic_file(dst) as tmp:
        write(tmp)
    return Path(dst)


def refuse_input_as_output(dst: str | os.PathLike, inputs, flag: str) -> None:
    """A tool never writes over one of its own inputs (a lossy resize or a conversion would replace the original)."""
    dst = Path(dst)
    for src in inputs:
        src = Path(src)
        if dst.exists() and src.exists() and os.path.samefile(dst, src):
            raise UserError(f"{flag} {dst}: is also an input; refusing to overwrite it, choose another output path")


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
