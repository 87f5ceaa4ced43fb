"""Output names, save cadence and rotation as sd-scripts does them, and resumable training state."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

from library.errors import UserError
from library.safe_write import atomic_file

# sd-scripts' fallbacks when --output_name is not given.
DEFAULT_EPOCH_NAME, DEFAULT_STEP_NAME, DEFAULT_LAST_NAME = "epoch", "at", "last"
STATE_FILE = "train_state.json"


def epoch_name(output_name: str | None, epoch: int, ext: str) -> str:
    return f"{output_name or DEFAULT_EPOCH_NAME}-{epoch:06d}{ext}"


def step_name(output_name: str | None, step: int, ext: str) -> str:
    return f"{output_name or DEFAULT_STEP_NAME}-step{step:08d}{ext}"


def last_name(output_name: str | None, ext: str) -> str:
    return f"{output_name or DEFAULT_LAST_NAME}{ext}"


def epoch_to_remove(options: Mapping, epoch: int, *, state: bool = False) -> int | None:
    """The older epoch whose file (or state) --save_last_n_epochs(_state) drops after saving `epoch`."""
    keep = options.get("save_last_n_epochs_state" if state else "save_last_n_epochs") or (
        options.get("save_last_n_epochs") if state else None)
    every = options.get("save_every_n_epochs")
    if not keep or not every:
        return None
    old = epoch - every * keep
    return old if old > 0 else None


def step_to_remove(options: Mapping, step: int, *, state: bool = False) -> int | None:
    """sd-scripts' get_remove_step_no: the older step file --save_last_n_steps(_state) drops after saving `step`."""
    keep = options.get("save_last_n_steps_state" if state else "save_last_n_steps") or (
        options.get("save_last_n_steps") if state else None)
    every = options.get("save_every_n_steps")
    if not keep or not every:
        return None
    old = step - keep - 1
    old -= old % every
    return old if old > 0 else None


def remove_quietly(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@dataclass
class TrainState:
    """Where a run stands; saved beside accelerate's state so a resumed run continues exactly."""

    global_step: int  # optimizer steps done
    epoch: int  # 1-based epoch the next batch belongs to
    batch_in_epoch: int  # batches of that epoch already consumed (by all processes together)

    def write(self, folder: Path) -> None:
        with atomic_file(folder / STATE_FILE) as tmp:
            tmp.write_text(json.dumps(asdict(self) | {"current_step": self.global_step, "current_epoch": self.epoch}))

    @classmethod
    def read(cls, folder: Path) -> "TrainState":
        path = Path(folder) / STATE_FILE
        if not Path(folder).is_dir():
            raise UserError(f"--resume {folder}: no such state folder (folders are named '<output_name>-...-state')")
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            raise UserError(f"--resume {folder}: no readable {STATE_FILE}; is it a state saved with --save_state?") from None
        # sd-scripts writes only current_step / current_epoch; the batch position then starts the epoch afresh.
        return cls(int(data.get("global_step", data.get("current_step", 0))),
                   int(data.get("epoch", data.get("current_epoch", 1))), int(data.get("batch_in_epoch", 0)))
