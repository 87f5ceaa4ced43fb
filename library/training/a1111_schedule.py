"""AUTOMATIC1111's learning-rate schedule strings ("0.005:100, 1e-3:1000, 1e-5") and a torch scheduler that follows one."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from library.errors import UserError

_HOW = "write it like '0.005:100, 1e-3:1000, 1e-5' (lr until step)"


@dataclass(frozen=True)
class A1Schedule:
    """(lr, last 1-based step it applies to) pairs in order; a last step of None runs to the end of training."""

    rates: tuple[tuple[float, int | None], ...]
    text: str

    @property
    def end(self) -> int | None:
        """The last step the schedule covers, or None when its final rate runs to the end."""
        return self.rates[-1][1]

    def rate_at(self, step: int) -> float | None:
        """The lr for 1-based optimizer step `step` (0, before any step, gives the first rate); None past the end."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        for rate, last in self.rates:
            if last is None or step <= last:
                return rate
        return None


def _bad(option: str, text: str, what: str) -> UserError:
    return UserError(f"{option} '{text}': {what}; {_HOW}")


def _parse_rate(word: str, option: str, text: str) -> float:
    try:
        rate = float(word)
    except ValueError:
        raise _bad(option, text, f"'{word}' is not a learning rate") from None
    # float() takes 'nan' and 'inf', which would wreck the weights rather than train them
    if not math.isfinite(rate):
        raise _bad(option, text, f"'{word}' is not a finite learning rate")
    return rate


def _parse_step(word: str, option: str, text: str) -> int | None:
    try:
        step = int(word)
    except ValueError:
        raise _bad(option, text, f"'{word}' is not a step number") from None
    if step == -1:
        return None
    if step < 1:
        raise _bad(option, text, f"step {step} is not a step number (steps count from 1; -1 means to the end)")
    return step


def _parse_entry(entry: str, option: str, text: str) -> tuple[float, int | None]:
    parts = entry.split(":")
    if len(parts) > 2:
        raise _bad(option, text, f"entry '{entry}' has more than one ':'")
    rate = _parse_rate(parts[0].strip(), option, text)
    step = _parse_step(parts[1].strip(), option, text) if len(parts) == 2 else None
    return rate, step


def parse_a1_schedule(text: str, *, option: str = "--ti_lr_schedule") -> A1Schedule:
    """Parse A1's "rate:step, rate:step, rate" schedule; UserError naming `option` when it is malformed."""
    rates: list[tuple[float, int | None]] = []
    for entry in text.split(","):
        if not entry.strip():
            continue  # A1 skips blank entries, so a trailing comma is fine
        rate, step = _parse_entry(entry.strip(), option, text)
        previous = rates[-1][1] if rates else 0
        if step is not None and step <= previous:
            raise _bad(option, text, f"step {step} does not come after step {previous}; steps must increase")
        rates.append((rate, step))
        if step is None:
            break  # A1 stops reading at the rate that runs to the end
    if not rates:
        raise _bad(option, text, "the schedule is empty")
    return A1Schedule(rates=tuple(rates), text=text)


def check_schedule_covers(schedule: A1Schedule, *, last_step: int, option: str = "--ti_lr_schedule") -> None:
    """Refuse a run that goes past the schedule's last step (A1 would have stopped training there)."""
    end = schedule.end
    if end is not None and end < last_step:
        raise UserError(
            f"{option} '{schedule.text}' ends at step {end} but the run goes to step {last_step}; end the schedule "
            f"with a bare rate (e.g. ', 1e-5') to keep training, or train {end} steps with --max_train_steps {end}")


class A1LearningRate(torch.optim.lr_scheduler.LRScheduler):
    """Sets every param group's lr to the schedule's rate (absolute values, not factors)."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: A1Schedule, *, step_offset: int = 0,
                 num_processes: int = 1, last_epoch: int = -1) -> None:
        if num_processes < 1:
            raise ValueError(f"num_processes must be >= 1, got {num_processes}")
        if step_offset < 0:
            raise ValueError(f"step_offset must be >= 0, got {step_offset}")
        # set before super().__init__, whose initial step already asks get_lr for a rate
        self.schedule = schedule
        self.step_offset = step_offset
        self.num_processes = num_processes
        super().__init__(optimizer, last_epoch)

    def optimizer_step(self) -> int:
        """The 1-based optimizer step the current lr is for: accelerate steps us once per process per step."""
        return self.step_offset + self.last_epoch // self.num_processes + 1

    def _rate(self) -> float:
        rate = self.schedule.rate_at(self.optimizer_step())
        # past the end keep the last rate; callers refuse such runs up front with check_schedule_covers
        return self.schedule.rates[-1][0] if rate is None else rate

    def get_lr(self) -> list[float]:
        return [self._rate()] * len(self.optimizer.param_groups)

    def state_dict(self) -> dict[str, Any]:
        # the schedule travels as its text so the state holds only plain values (fine for weights_only loads too)
        state = super().state_dict()
        state["schedule"] = self.schedule.text
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        text = state.pop("schedule", None)
        super().load_state_dict(state)
        if text is not None:
            self.schedule = parse_a1_schedule(text)
