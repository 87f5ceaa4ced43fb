"""Console set-up for entry points: our messages stay readable, library chatter and progress bars stay quiet."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path


def quiet_libraries() -> None:
    """Called by entry points only (never at import): silence diffusers/transformers info logs and bars."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*torchvision.*")


def whole_lines() -> None:
    """Every line this process prints reaches the console in one write. Under `accelerate launch` the ranks share the
    console, and print() hands the text and its newline to the stream apart: with PYTHONUNBUFFERED (set in many
    containers) those are two writes, and another rank's line could land between them. Line buffering joins them;
    progress bars ("\r", flushed by tqdm) are written as before."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)  # a stream someone replaced may not have it
        if reconfigure is not None:
            reconfigure(line_buffering=True, write_through=False)


# ---------------------------------------------------------------------------------------------------- console log
# --console_log_level / --console_log_file (sd-scripts' setup_logging). Our messages are plain lines on stdout and
# stderr, so the console itself is the log: each line gets a level from its start ("error: ..." is ERROR,
# "warning: ..." WARNING, any other stderr line WARNING, any other stdout line INFO), lines below the level are dropped,
# and with a file the lines go there instead of the console. Progress bars (lines redrawn with "\r") stay on the
# console and out of the file.
LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40, "CRITICAL": 50}
_BINARY_PROBE = 4096


def line_level(line: str, default: int) -> int:
    head = line.lstrip().lower()
    if head.startswith("error"):
        return LEVELS["ERROR"]
    if head.startswith("warning"):
        return LEVELS["WARNING"]
    return default


class _LogStream:
    """A text stream in place of sys.stdout / sys.stderr that filters and routes whole lines."""

    def __init__(self, console, *, default: int, threshold: int, file):
        self.console, self.default, self.threshold, self.file = console, default, threshold, file
        self.pending = ""

    def write(self, text: str) -> int:
        if "\r" in text or self.pending.startswith("\r"):  # a progress bar redrawing itself: console only
            self.console.write(self.pending + text)
            self.pending = ""
            return len(text)
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self._emit(line + "\n")
        return len(text)

    def _emit(self, line: str) -> None:
        if line_level(line, self.default) < self.threshold:
            return
        if self.file is not None:
            self.file.write(line)
            self.file.flush()
        else:
            self.console.write(line)

    def flush(self) -> None:
        if self.pending and not self.pending.startswith("\r"):
            self._emit(self.pending)
            self.pending = ""
        self.console.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding...: the console's
        return getattr(self.console, name)


@contextlib.contextmanager
def console_log(level: str | None, file: str | None, *, main_process: bool = True) -> Iterator[None]:
    """Route this process's console lines by `level` (default INFO) into `file` (written afresh, by the main process
    only) or the console. A UserError ending the run is also written to the file, so the log says why it stopped."""
    if level is None and file is None:
        yield
        return
    from library.errors import UserError

    threshold = LEVELS[level or "INFO"]
    log = _open_log(file) if file and main_process else None
    streams = [_LogStream(sys.stdout, default=LEVELS["INFO"], threshold=threshold, file=log),
               _LogStream(sys.stderr, default=LEVELS["WARNING"], threshold=threshold, file=log)]
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = streams
    try:
        yield
    except UserError as err:
        if log is not None:
            log.write(f"error: {err}\n")
        raise
    finally:
        for stream in streams:
            stream.flush()
        sys.stdout, sys.stderr = saved
        if log is not None:
            log.close()


def _open_log(file: str):
    from library.errors import UserError

    path = Path(file)
    if path.is_dir():
        raise UserError(f"--console_log_file {file} is a folder; name a file (e.g. {path / 'train.log'})")
    if path.is_file():
        with open(path, "rb") as existing:
            if b"\0" in existing.read(_BINARY_PROBE):
                raise UserError(f"--console_log_file {file} exists and is not a text file (a model or an image?): "
                                "it would be overwritten; name another file")
    try:
        return open(path, "w", encoding="utf-8")  # written afresh each run, as sd-scripts' FileHandler(mode="w")
    except OSError as err:
        raise UserError(f"--console_log_file {file} cannot be written ({err.strerror}); check the folder") from None
