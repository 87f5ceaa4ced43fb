"""Output names, save cadence and rotation as sd-scripts does them, and resumable training state."""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
import zipfile
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


# Folders a save writes beside its file, named after its stem (pivotal tuning's embedding files); they go with it.
COMPANION_SUFFIXES = ("-embeddings",)


def remove_saved(path: Path, ext: str) -> None:
    """A rotated-out save: its file (or folder) and the companions written beside it."""
    remove_quietly(path)
    stem = path.name[:-len(ext)] if ext and path.name.endswith(ext) else path.name
    for suffix in COMPANION_SUFFIXES:
        companion = path.with_name(stem + suffix)
        if companion.is_dir():
            remove_quietly(companion)


def remove_quietly(path: Path) -> None:
    if path.is_dir():
        # Renamed to a hidden temporary name first: a kill during the deletion leaves a leftover the next run
        # removes, never a half-deleted folder under a name --resume would take.
        trash = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            os.replace(path, trash)
        except OSError:
            trash = path
        shutil.rmtree(trash, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@dataclass
class TrainState:
    """Where a run stands; saved beside accelerate's state so a resumed run continues exactly."""

    global_step: int  # optimizer steps done
    epoch: int  # 1-based epoch the next batch belongs to
    batch_in_epoch: int  # batches of that epoch already consumed (by all processes together)

    def write(self, folder: Path) -> None:
        """Written last into the state's temporary folder, with every other file's size: resume checks them."""
        folder = Path(folder)
        files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != STATE_FILE}
        with atomic_file(folder / STATE_FILE) as tmp:
            tmp.write_text(json.dumps(asdict(self) | {"current_step": self.global_step, "current_epoch": self.epoch,
                                                      "files": files}))

    @classmethod
    def read(cls, folder: Path) -> "TrainState":
        path = Path(folder) / STATE_FILE
        if not Path(folder).is_dir():
            raise UserError(f"--resume {folder}: no such state folder (folders are named '<output_name>-...-state')")
        data = _read_json(path)
        if data is None:
            raise UserError(f"--resume {folder}: no readable {STATE_FILE}; is it a state saved with --save_state?")
        # sd-scripts writes only current_step / current_epoch; the batch position then starts the epoch afresh.
        return cls(int(data.get("global_step", data.get("current_step", 0))),
                   int(data.get("epoch", data.get("current_epoch", 1))), int(data.get("batch_in_epoch", 0)))


def required_state_files(accelerator) -> list[str]:
    """The files accelerate's load_state reads for the objects this run registered, plus our own state file."""
    def numbered(stem: str, ext: str, count: int) -> list[str]:
        return [f"{stem}{ext}" if i == 0 else f"{stem}_{i}{ext}" for i in range(count)]

    names = numbered("model", ".safetensors", len(accelerator._models))
    names += numbered("optimizer", ".bin", len(accelerator._optimizers))
    names += numbered("scheduler", ".bin", len(accelerator._schedulers))
    names += ["scaler.pt"] if accelerator.scaler is not None else []
    names += [f"custom_checkpoint_{i}.pkl" for i in range(len(accelerator._custom_objects))]
    return names + ["random_states_0.pkl", STATE_FILE]


def state_problem(folder: Path, required: list[str]) -> str | None:
    """Why `folder` is not a complete state this run can resume from (missing, cut-short or extra files), or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return "no such folder"
    data = _read_json(folder / STATE_FILE) or {}
    sizes = data.get("files") or {}  # saved by us since states became atomic; older and sd-scripts' states lack it
    missing = [n for n in dict.fromkeys([*required, *sizes]) if not (folder / n).is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    if STATE_FILE in required and not data:
        return f"{STATE_FILE} is not readable"
    broken = [n for n in dict.fromkeys([*required, *sizes])
              if (n in sizes and (folder / n).stat().st_size != sizes[n]) or not _looks_whole(folder / n)]
    if broken:
        return f"{', '.join(broken)} cut short (the save was interrupted)"
    customs = [p.name for p in folder.glob("custom_checkpoint_*.pkl")]
    wanted = sum(n.startswith("custom_checkpoint_") for n in required)
    if len(customs) != wanted:
        return f"it holds {len(customs)} custom_checkpoint files where this run has {wanted} (saved with other options)"
    return None


def resume_folder(path: Path, required: list[str], say=print) -> Path:
    """The state folder to resume from: `path` itself when it is one (refused with one line when incomplete), or
    the newest complete `*-state` folder in an output folder."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"--resume {path}: no such state folder (folders are named '<output_name>-...-state')")
    states = [p for p in path.iterdir() if p.is_dir() and p.name.endswith("-state") and not p.name.startswith(".")]
    is_state = any((path / n).exists() for n in (STATE_FILE, "optimizer.bin", "random_states_0.pkl"))
    if is_state or not states:
        problem = state_problem(path, required)
        if problem:
            raise UserError(f"--resume {path}: not a complete state folder ({problem}); resume from an earlier "
                            "-state folder, or give the output folder to take its newest complete one")
        return path
    problems = {p: state_problem(p, required) for p in states}
    complete = [p for p, problem in problems.items() if problem is None]
    if not complete:
        found = "; ".join(f"{p.name}: {problem}" for p, problem in sorted(problems.items()))
        raise UserError(f"--resume {path}: no complete -state folder in it ({found}); start without --resume")
    newest = max(complete, key=lambda p: ((p / STATE_FILE).stat().st_mtime, p.name))
    for p, problem in sorted(problems.items()):
        if problem:
            say(f"--resume: skipping {p} ({problem})")
    say(f"--resume {path}: continuing from its newest complete state, {newest.name}")
    return newest


def owns_name(name: str, output_name: str | None) -> bool:
    """Whether a file or folder name is one a run with `output_name` writes (its models, states, options, samples)."""
    prefixes = (output_name,) if output_name else (DEFAULT_EPOCH_NAME, DEFAULT_STEP_NAME, DEFAULT_LAST_NAME)
    if any(name.startswith(p) and name[len(p):len(p) + 1] in ("", ".", "-", "_") for p in prefixes):
        return True
    return not output_name and re.match(r"e?\d{6}_\d{2}_", name) is not None  # unnamed samples: 000120_00_...


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _looks_whole(path: Path) -> bool:
    """A cheap check that a file was written to its end: torch.save's zip ends with its directory; a safetensors
    file is exactly as long as its header says."""
    if path.suffix in (".bin", ".pkl", ".pt"):
        return zipfile.is_zipfile(path)
    if path.suffix == ".safetensors":
        try:
            with open(path, "rb") as f:
                header_size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(header_size))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            return path.stat().st_size == 8 + header_size + end
        except (OSError, ValueError, KeyError, TypeError):
            return False
    return path.stat().st_size > 0 or path.suffix == ".json"
