"""`accelerate launch` that keeps our one-line errors: accelerate's own argument parser and launch machinery, minus
the launcher's traceback (one process) or failure report (several) after a script that already said what was wrong."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from typing import Sequence

from library.errors import INTERRUPTED_EXIT_CODE, USER_ERROR_EXIT_CODE

# Exit codes with which a training script has printed its own one line (library.errors): nothing to add to them.
SAID_ITS_LINE = (USER_ERROR_EXIT_CODE, INTERRUPTED_EXIT_CODE, 128 + signal.SIGTERM)  # 143: saved on SIGTERM
USAGE = "python launch.py [accelerate launch options] script.py [script options]"


def main(argv: Sequence[str] | None = None) -> None:
    """Parse `argv` as `accelerate launch` does and run it; a failed script ends this process with its exit code."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    parser = launch_command_parser()
    parser.prog, parser.usage = "launch.py", USAGE
    args = parser.parse_args(argv)
    # Without --quiet accelerate raises with the script's own exit code (with it, it exits 1); its --debug report stays.
    args.quiet = False
    held = _HeldStopLogs()
    try:
        launch_command(args)
    except subprocess.CalledProcessError as err:  # one process: accelerate re-raises the script's failure
        raise SystemExit(_exit_code(err.returncode, _script(args))) from None
    except KeyboardInterrupt:  # the script, stopped by the same Ctrl+C, printed its own line
        raise SystemExit(INTERRUPTED_EXIT_CODE) from None
    except ChildFailedError as err:  # several processes (torchrun): one entry per failed process
        code = said_its_line([failure.exitcode for failure in err.failures.values()])
        if code is not None:
            held.drop()
            raise SystemExit(code) from None
        held.release()
        print(err, file=sys.stderr)  # torchrun's report: which process, exit code or signal, its traceback file
        rank, first = err.get_first_failure()
        raise SystemExit(_exit_code(first.exitcode, f"{_script(args)} (process {rank})", report=False)) from None
    finally:
        held.release()


def said_its_line(exit_codes: Sequence[int]) -> int | None:
    """The exit code to end with when the failed processes all printed their own line (the others were stopped by
    torchrun's SIGTERM after the first failure); None when one crashed or was killed, which deserves a report."""
    said = [code for code in exit_codes if code in SAID_ITS_LINE]
    stopped = -signal.SIGTERM
    return said[0] if said and all(code in SAID_ITS_LINE or code == stopped for code in exit_codes) else None


def _exit_code(code: int, script: str, *, report: bool = True) -> int:
    """The script's exit code as a shell gives it (128 + N for signal N), with one line when the script printed none
    of its own (a crash prints its traceback; a killed process prints nothing)."""
    if code in SAID_ITS_LINE:
        return code
    if code < 0:
        if report:
            hint = " (the system often does this when it runs out of memory)" if -code == signal.SIGKILL else ""
            print(f"launch.py: {script} was killed by {_signal_name(-code)}{hint}", file=sys.stderr)
        return 128 - code
    if report:
        print(f"launch.py: {script} exited with code {code}", file=sys.stderr)
    return code


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _script(args) -> str:
    return str(getattr(args, "training_script", None) or "the training script")


class _HeldStopLogs(logging.Filter):
    """torchrun logs how it stops the processes after one fails (`Sending process … closing signal`, `failed
    (exitcode: N) …`). Held until the outcome is known: dropped after scripts that printed their own line (they only
    repeat it), logged as usual otherwise."""

    LOGGER = "torch.distributed.elastic.multiprocessing.api"
    HELD = ("Sending process", "failed (exitcode:")

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.logger = logging.getLogger(self.LOGGER)
        self.logger.addFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith(self.HELD):
            self.records.append(record)
            return False
        return True

    def drop(self) -> None:
        self.records.clear()
        self.release()

    def release(self) -> None:
        self.logger.removeFilter(self)
        records, self.records = self.records, []
        for record in records:
            self.logger.handle(record)
