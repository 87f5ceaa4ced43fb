"""The learning-rate schedule of a run, as sd-scripts' get_scheduler_fix builds it from --lr_scheduler and friends."""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from library.config.suggest import did_you_mean
from library.errors import UserError
from library.training.optimizers import parse_optimizer_args, uses_relative_step

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Steps:
    """The step counts one schedule is built from (all in scheduler steps: optimizer steps × processes)."""

    total: int
    warmup: int
    decay: int
    options: Mapping[str, Any]


def _cycles(steps: _Steps) -> int:
    cycles = steps.options.get("lr_scheduler_num_cycles")
    return 1 if cycles is None else cycles


def _power(steps: _Steps) -> float:
    power = steps.options.get("lr_scheduler_power")
    return 1.0 if power is None else power


def _min_lr_ratio(steps: _Steps) -> float | None:
    return steps.options.get("lr_scheduler_min_lr_ratio")


def _warmup_total(steps: _Steps) -> dict[str, Any]:
    return {"num_warmup_steps": steps.warmup, "num_training_steps": steps.total}


# name -> (library that has it, the arguments sd-scripts gives it beside lr_scheduler_args). Schedules whose
# lambda ignores warmup take none, and sd-scripts refuses a warmup for them (piecewise_constant aside).
_SCHEDULES: dict[str, tuple[str, Callable[[_Steps], dict[str, Any]] | None]] = {
    "constant": ("transformers", None),
    "constant_with_warmup": ("transformers", lambda s: {"num_warmup_steps": s.warmup}),
    "linear": ("transformers", _warmup_total),
    "cosine": ("transformers", _warmup_total),  # always half a cosine: sd-scripts passes no num_cycles here
    "cosine_with_restarts": ("transformers", lambda s: _warmup_total(s) | {"num_cycles": _cycles(s)}),
    "polynomial": ("transformers", lambda s: _warmup_total(s) | {"power": _power(s)}),
    # sd-scripts halves num_cycles here, so the default 1 is the usual half cosine
    "cosine_with_min_lr": ("transformers", lambda s: _warmup_total(s) | {
        "num_cycles": _cycles(s) / 2, "min_lr_rate": _min_lr_ratio(s)}),
    "warmup_stable_decay": ("transformers", lambda s: {
        "num_warmup_steps": s.warmup, "num_stable_steps": s.total - s.warmup - s.decay,
        "num_decay_steps": s.decay, "num_cycles": _cycles(s) / 2, "min_lr_ratio": _min_lr_ratio(s) or 0.0}),
    "inverse_sqrt": ("transformers", lambda s: {
        "num_warmup_steps": s.warmup, "timescale": s.options.get("lr_scheduler_timescale")}),
    "piecewise_constant": ("diffusers", None),  # step_rules come in --lr_scheduler_args
}
SCHEDULER_NAMES = (*_SCHEDULES, "adafactor")

# Options that give a schedule's arguments: the same argument again in --lr_scheduler_args is refused.
_ARGUMENT_OPTIONS = {"num_warmup_steps": "lr_warmup_steps", "num_training_steps": "max_train_steps",
                     "num_cycles": "lr_scheduler_num_cycles", "power": "lr_scheduler_power",
                     "timescale": "lr_scheduler_timescale", "min_lr_rate": "lr_scheduler_min_lr_ratio",
                     "min_lr_ratio": "lr_scheduler_min_lr_ratio", "num_decay_steps": "lr_decay_steps",
                     "num_stable_steps": "lr_decay_steps"}


def warmup_steps(options: Mapping[str, Any], num_training_steps: int) -> int:
    """--lr_warmup_steps as a count: an int is a count, a float below 1 a fraction of num_training_steps."""
    return _step_count(options, "lr_warmup_steps", num_training_steps)


def decay_steps(options: Mapping[str, Any], num_training_steps: int) -> int:
    """--lr_decay_steps as a count, read like --lr_warmup_steps."""
    return _step_count(options, "lr_decay_steps", num_training_steps)


def _step_count(options: Mapping[str, Any], name: str, total: int) -> int:
    value = options.get(name) or 0
    if isinstance(value, str) and value.strip().endswith("%"):  # sd-scripts' argparse reads "10%" as 0.1
        try:
            value = float(value.strip()[:-1]) / 100.0
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise UserError(f"--{name} {value!r}: give a step count (e.g. 100) or a fraction of all steps below 1 "
                        f"(e.g. 0.1)")
    if isinstance(value, float):
        # sd-scripts multiplies any float, so a TOML 10.0 would warm up for 10 runs' worth of steps
        if value >= 1:
            raise UserError(f"--{name} {value}: a fraction of all steps must be below 1; "
                            f"write {int(value)} (no decimal point) for a count of steps")
        return int(value * total)
    return value


def make_scheduler(options: Mapping[str, Any], optimizer: torch.optim.Optimizer, *, num_training_steps: int,
                   num_processes: int = 1, step_offset: int = 0) -> torch.optim.lr_scheduler.LRScheduler:
    """The schedule sd-scripts builds. Its length is num_training_steps × num_processes because accelerate steps a
    prepared scheduler once per process; a warmup count is not multiplied (sd-scripts), a fraction is of the total.
    With --ti_lr_schedule, AUTOMATIC1111's "rate:step, ..." schedule instead, counted from `step_offset`."""
    if options.get("ti_lr_schedule"):
        return _a1111_scheduler(options, optimizer, num_training_steps, num_processes, step_offset)
    total = num_training_steps * num_processes
    steps = _Steps(total, warmup_steps(options, total), decay_steps(options, total), options)
    kwargs = parse_optimizer_args(options.get("lr_scheduler_args"), option="lr_scheduler_args")
    name = str(options.get("lr_scheduler") or "constant")
    if uses_relative_step(optimizer):
        return _adafactor_scheduler(name, optimizer, steps)
    if options.get("lr_scheduler_type"):
        return _custom_scheduler(options["lr_scheduler_type"], optimizer, kwargs, steps)
    if name.lower().startswith("adafactor"):
        raise UserError(f"--lr_scheduler {name} only goes with --optimizer_type AdaFactor and relative_step=True "
                        f"(its default); choose another --lr_scheduler such as constant_with_warmup")
    key = name.lower()
    if key not in _SCHEDULES:
        raise UserError(f"--lr_scheduler {name!r} is not known{did_you_mean(key, SCHEDULER_NAMES)}; "
                        f"use one of {', '.join(SCHEDULER_NAMES)}, or --lr_scheduler_type module.Class")
    return _named_scheduler(key, optimizer, kwargs, steps)


def _a1111_scheduler(options: Mapping[str, Any], optimizer: torch.optim.Optimizer, num_training_steps: int,
                     num_processes: int, step_offset: int):
    from library.training.a1111_schedule import A1LearningRate, check_schedule_covers, parse_a1_schedule

    for name, neutral in (("lr_scheduler", "constant"), ("lr_warmup_steps", 0), ("lr_scheduler_type", "")):
        if options.get(name) and options.get(name) != neutral:
            raise UserError(f"--ti_lr_schedule and --{name} {options[name]} both set the learning rate: "
                            f"keep one of them")
    if uses_relative_step(optimizer):
        raise UserError("--ti_lr_schedule cannot drive Adafactor with relative_step=True (it sets its own step size): "
                        "pass --optimizer_args relative_step=False")
    schedule = parse_a1_schedule(str(options["ti_lr_schedule"]))
    check_schedule_covers(schedule, last_step=step_offset + num_training_steps)
    return A1LearningRate(optimizer, schedule, step_offset=step_offset, num_processes=num_processes)


def _named_scheduler(name: str, optimizer: torch.optim.Optimizer, kwargs: dict[str, Any], steps: _Steps):
    library, arguments = _SCHEDULES[name]
    if arguments is None and steps.warmup:
        if name != "piecewise_constant":
            raise UserError(f"--lr_scheduler {name} has no warmup but --lr_warmup_steps gives "
                            f"{steps.warmup}: set it to 0, or use constant_with_warmup")
        _log.warning("--lr_warmup_steps is ignored by piecewise_constant (as in sd-scripts)")
    given = arguments(steps) if arguments else {}
    _refuse_duplicates(given, kwargs)
    if name == "cosine_with_min_lr" and given["min_lr_rate"] is None and "min_lr" not in kwargs:
        raise UserError("--lr_scheduler cosine_with_min_lr needs --lr_scheduler_min_lr_ratio (e.g. 0.1)")
    if name == "warmup_stable_decay" and given["num_stable_steps"] < 0:
        raise UserError(f"--lr_warmup_steps ({steps.warmup}) + --lr_decay_steps ({steps.decay}) exceed the "
                        f"{steps.total} scheduler steps; lower them")
    function = _schedule_function(name, library)
    try:
        return function(optimizer, **given, **kwargs)
    except (TypeError, ValueError) as err:
        hint = " (e.g. --lr_scheduler_args \"step_rules=1:10,0.1:20,0.01\")" if name == "piecewise_constant" else ""
        raise UserError(f"--lr_scheduler {name}: {err}{hint}") from None


def _refuse_duplicates(given: Mapping[str, Any], kwargs: Mapping[str, Any]) -> None:
    duplicates = sorted(kwargs.keys() & given.keys())
    if duplicates:
        key = duplicates[0]
        raise UserError(f"--lr_scheduler_args {key}=...: {key} comes from --{_ARGUMENT_OPTIONS.get(key, key)}; "
                        f"set that option instead")


def _schedule_function(name: str, library: str) -> Callable[..., Any]:
    """transformers has every schedule sd-scripts names but piecewise_constant, which only diffusers has."""
    module = importlib.import_module(f"{library}.optimization")
    try:
        return module.TYPE_TO_SCHEDULER_FUNCTION[module.SchedulerType(name)]
    except (ValueError, KeyError):
        raise UserError(f"--lr_scheduler {name} needs a newer {library}: pip install -U {library}") from None


def _adafactor_scheduler(name: str, optimizer: torch.optim.Optimizer, steps: _Steps):
    """Adafactor with relative_step sets its own lr; AdafactorSchedule only reports it (learning_rate until step 1)."""
    from transformers.optimization import AdafactorSchedule

    if steps.options.get("lr_scheduler_type"):
        raise UserError("--lr_scheduler_type cannot schedule Adafactor with relative_step=True (it sets its own "
                        "step size): drop it, or pass --optimizer_args relative_step=False")
    if steps.warmup:
        raise UserError(f"--lr_warmup_steps {steps.warmup}: Adafactor with relative_step=True has no warmup "
                        f"schedule; set it to 0 (--optimizer_args warmup_init=True warms up inside Adafactor)")
    if not name.lower().startswith("adafactor"):
        _log.info(f"Adafactor with relative_step=True: --lr_scheduler {name} is replaced by adafactor (as sd-scripts)")
    return AdafactorSchedule(optimizer, steps.options.get("learning_rate") or 0.0)


def _custom_scheduler(path: str, optimizer: torch.optim.Optimizer, kwargs: dict[str, Any], steps: _Steps):
    """--lr_scheduler_type: "module.Class", or a bare class name from torch.optim.lr_scheduler."""
    if steps.warmup:
        raise UserError(f"--lr_scheduler_type {path} gets no warmup from sd-scripts: set --lr_warmup_steps 0 "
                        f"(give the class its own arguments with --lr_scheduler_args)")
    module_name, dot, class_name = path.rpartition(".")
    try:
        module = importlib.import_module(module_name) if dot else torch.optim.lr_scheduler
    except ImportError as err:
        raise UserError(f"--lr_scheduler_type {path}: cannot import {module_name} ({err})") from None
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        candidates = [n for n, v in vars(module).items() if isinstance(v, type) and not n.startswith("_")]
        raise UserError(f"--lr_scheduler_type {path}: {module.__name__} has no class {class_name}"
                        f"{did_you_mean(class_name, candidates)}")
    try:
        return cls(optimizer, **kwargs)
    except (TypeError, ValueError) as err:
        raise UserError(f"--lr_scheduler_type {path}: {err}; give its arguments with --lr_scheduler_args "
                        f"key=value") from None
