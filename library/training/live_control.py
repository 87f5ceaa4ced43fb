"""Live control of a running training: ask for a sample, a save, a state save or a clean stop without stopping it.

Write one or more of the words `sample` (preview images now), `save` (the model file now), `state` (the model file and
a state folder to resume from), `stop` (end cleanly: the final files are saved as at the end of the run), one per line
or separated by spaces, into a file named `control` in the output folder; after the current optimizer step the run
does them, in that order, says so in its log and deletes the file. On Linux and macOS, `kill -USR1 <pid>` makes the run
look at once: without a control file it means `state`. A word it does not know is
named in the log and ignored. With several processes, the main process reads the file and every process follows it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path

CONTROL_FILE = "control"
COMMANDS = ("sample", "save", "state", "stop")  # done in this order
SIGNAL_DEFAULT = ("state",)  # SIGUSR1 without a control file: save the model file and a state to resume from


class LiveControl:
    def __init__(self, output_dir: str | Path, accelerator, say=print):
        self.file = Path(output_dir) / CONTROL_FILE
        self.accelerator, self.say = accelerator, say
        self.signalled = False

    def requests(self) -> tuple[str, ...]:
        """The commands asked for since the last call (the same on every process), in COMMANDS order."""
        asked: set[str] = set()
        if self.accelerator.is_main_process:
            asked = self._read()
        if self.accelerator.num_processes > 1:
            asked = self._shared(asked)
        return tuple(command for command in COMMANDS if command in asked)

    def _read(self) -> set[str]:
        signalled, self.signalled = self.signalled, False
        words: list[str] = []
        try:
            words = self.file.read_text(encoding="utf-8", errors="replace").split()
        except FileNotFoundError:
            pass
        except OSError as err:
            self.say(f"warning: control file {self.file} cannot be read ({err.strerror}); ignored")
            return set()
        else:
            with contextlib.suppress(OSError):
                self.file.unlink()
        unknown = [w for w in words if w.lower() not in COMMANDS]
        if unknown:
            self.say(f"warning: control file {self.file}: unknown {', '.join(map(repr, unknown))} ignored (it takes "
                     f"{', '.join(COMMANDS)})")
        asked = {w.lower() for w in words} & set(COMMANDS)
        if signalled and not words:
            asked |= set(SIGNAL_DEFAULT)
        if asked:
            source = "SIGUSR1" if signalled else str(self.file)
            self.say(f"control ({source}): {', '.join(c for c in COMMANDS if c in asked)} now")
        return asked

    def _shared(self, asked: set[str]) -> set[str]:
        import torch

        bits = torch.tensor([int(c in asked) for c in COMMANDS], device=self.accelerator.device)
        bits = self.accelerator.reduce(bits, reduction="sum")
        return {c for c, bit in zip(COMMANDS, bits.tolist()) if bit}

    @contextlib.contextmanager
    def listening(self):
        """SIGUSR1 sets a flag read after the current step (POSIX; the main thread only); the previous handler is put
        back afterwards."""
        usr1 = getattr(signal, "SIGUSR1", None)
        if usr1 is None or threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handler(signum, frame):
            self.signalled = True

        previous = signal.signal(usr1, handler)
        try:
            yield self
        finally:
            signal.signal(usr1, previous)
