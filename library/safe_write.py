"""Write files and folders so that a crash never leaves a half-written result in place, a failed write (disk full)
is one line that names the file and the free space, and what a killed run left behind can be found and removed."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from library.errors import UserError

# The hidden names the writers below create beside `dst`: mkstemp/mkdtemp's `.<name>.<8 random chars>.tmp`, the
# agreed `.<name>.saving.tmp` of a folder many processes write, and `.<name>.old` while a folder is replaced.
_RANDOM_TEMP = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")
_SHARED_TEMP = re.compile(r"^\.(?P<name>.+)\.saving\.tmp$")
_OLD = re.compile(r"^\.(?P<name>.+)\.old$")
# Writers that do not raise OSError on a failed write: safetensors (SafetensorError "I/O error: ... (os error 28)")
# and torch.save (RuntimeError "PytorchStreamWriter failed writing file" / "unexpected pos").
_WRITE_FAILURE = re.compile(r"os error \d+|I/O error|IoError|No space left|StorageFull|quota|file write failed|"
                            r"unexpected pos", re.IGNORECASE)


@contextlib.contextmanager
def atomic_file(dst: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `dst`; on success it is flushed to disk and renamed onto `dst`."""
    dst = Path(dst)
    with _failed_write_is_one_line(dst):
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
def atomic_dir(dst: str | os.PathLike, *, temp: Path | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder beside `dst` (or `temp`, already filled by others, see shared_temp_dir); on
    success it replaces `dst` as a whole."""
    dst = Path(dst)
    with _failed_write_is_one_line(dst):
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp or Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
        try:
            yield tmp
            _publish_dir(tmp, dst)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def shared_temp_dir(dst: str | os.PathLike) -> Path:
    """The temporary folder name every process of a run agrees on for `dst` (each writes its part of a state)."""
    dst = Path(dst)
    return dst.with_name(f".{dst.name}.saving.tmp")


def write_atomically(dst: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` and move the result onto `dst` only if it returned normally."""
    with atomic_file(dst) as tmp:
        write(tmp)
    return Path(dst)


def write_failure(err: BaseException, dst: str | os.PathLike) -> UserError | None:
    """The one-line error for a write of `dst` that failed on the disk's side (full, read-only, quota, I/O), or None
    when `err` is something else (a bug, which keeps its traceback)."""
    if isinstance(err, UserError) or not isinstance(err, Exception):
        return None
    if isinstance(err, OSError):
        reason = err.strerror or str(err)
    elif _WRITE_FAILURE.search(str(err)):
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    else:
        return None
    dst = Path(dst)
    return UserError(f"could not write {dst}: {reason} ({format_bytes(free_bytes(dst))} free on its disk); files "
                     "saved before are intact: free some space or choose another folder, then run again")


def free_bytes(path: str | os.PathLike) -> int:
    """Free space on the disk that holds `path` (or its nearest existing parent folder)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def size_on_disk(path: str | os.PathLike) -> int:
    """Bytes of a file, or of every file under a folder."""
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    return path.stat().st_size if path.exists() else 0


def format_bytes(n: float) -> str:
    if n < 1000:
        return f"{int(n)} bytes"
    for unit in ("KB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def space_warning(dst: str | os.PathLike, needed: int) -> str | None:
    """A one-line warning when the disk holding `dst` has less free space than `needed` bytes, else None."""
    free = free_bytes(dst)
    if needed <= free:
        return None
    return (f"warning: {Path(dst).name} needs about {format_bytes(needed)} but only {format_bytes(free)} is free "
            f"on the disk holding {Path(dst).parent}; free some space now or this save will fail")


def remove_leftovers(folder: str | os.PathLike, owns: Callable[[str], bool]) -> tuple[int, int]:
    """Remove what killed saves left in `folder` (the hidden temporary names above) for the names `owns` accepts;
    a folder whose replacement was cut between its two renames is put back. Returns (items removed, bytes freed)."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0, 0
    count = freed = 0
    for path in sorted(folder.iterdir()):
        match = _RANDOM_TEMP.match(path.name) or _SHARED_TEMP.match(path.name) or _OLD.match(path.name)
        if not match or not owns(match["name"]) or path.is_symlink():
            continue
        target = folder / match["name"]
        if match.re is _OLD and path.is_dir() and not target.exists():
            os.replace(path, target)  # killed after moving the old folder aside: it is still the only copy
            continue
        size = size_on_disk(path)
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        count, freed = count + 1, freed + size
    return count, freed


def refuse_input_as_output(dst: str | os.PathLike, inputs, flag: str) -> None:
    """A tool never writes over one of its own inputs (a lossy resize or a conversion would replace the original)."""
    dst = Path(dst)
    for src in inputs:
        src = Path(src)
        if dst.exists() and src.exists() and os.path.samefile(dst, src):
            raise UserError(f"{flag} {dst}: is also an input; refusing to overwrite it, choose another output path")


@contextlib.contextmanager
def _failed_write_is_one_line(dst: Path) -> Iterator[None]:
    try:
        yield
    except Exception as err:
        failure = write_failure(err, dst)
        if failure is None:
            raise
        raise failure from None


def _publish_dir(tmp: Path, dst: Path) -> None:
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes the folder private (0700)
    for path in tmp.rglob("*"):
        if path.is_file():
            _fsync(path)
    # A folder cannot be renamed over a non-empty folder: move the old one aside first, drop it last.
    old = dst.with_name(f".{dst.name}.old")
    moved_aside = False
    try:
        if dst.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dst, old)
            moved_aside = True
        os.replace(tmp, dst)
    except BaseException:
        if moved_aside and not dst.exists():
            os.replace(old, dst)  # the new folder did not arrive: keep the old one under its name
        raise
    shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
