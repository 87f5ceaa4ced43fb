"""The optimizer of a run, as sd-scripts' get_optimizer builds it from --optimizer_type and --optimizer_args."""

from __future__ import annotations

import ast
import importlib
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch

from library.config.suggest import did_you_mean
from library.errors import UserError

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KnownOptimizer:
    """An --optimizer_type name sd-scripts knows: where its class lives and what sd-scripts adds to its kwargs."""

    module: str
    cls: str
    package: str  # what to pip install when the module is missing
    defaults: tuple[tuple[str, Any], ...] = ()  # filled in when not given; shown in ss_optimizer as sd-scripts does
    fixed: tuple[tuple[str, Any], ...] = ()  # always passed, not shown in ss_optimizer (e.g. nesterov=True)


_NESTEROV = (("momentum", 0.9),), (("nesterov", True),)

# sd-scripts' names (matched case-insensitively, as it lower()s them) -> the class it builds.
KNOWN_OPTIMIZERS: dict[str, KnownOptimizer] = {
    "AdamW": KnownOptimizer("torch.optim", "AdamW", "torch"),
    "AdamW8bit": KnownOptimizer("bitsandbytes.optim", "AdamW8bit", "bitsandbytes"),
    "PagedAdamW": KnownOptimizer("bitsandbytes.optim", "PagedAdamW", "bitsandbytes"),
    "PagedAdamW8bit": KnownOptimizer("bitsandbytes.optim", "PagedAdamW8bit", "bitsandbytes"),
    "PagedAdamW32bit": KnownOptimizer("bitsandbytes.optim", "PagedAdamW32bit", "bitsandbytes"),
    "Lion": KnownOptimizer("lion_pytorch", "Lion", "lion-pytorch"),
    "Lion8bit": KnownOptimizer("bitsandbytes.optim", "Lion8bit", "bitsandbytes"),
    "PagedLion8bit": KnownOptimizer("bitsandbytes.optim", "PagedLion8bit", "bitsandbytes"),
    "SGDNesterov": KnownOptimizer("torch.optim", "SGD", "torch", *_NESTEROV),
    "SGDNesterov8bit": KnownOptimizer("bitsandbytes.optim", "SGD8bit", "bitsandbytes", *_NESTEROV),
    "AdaFactor": KnownOptimizer("transformers.optimization", "Adafactor", "transformers"),
    "DAdaptation": KnownOptimizer("dadaptation.experimental", "DAdaptAdamPreprint", "dadaptation"),
    "DAdaptAdamPreprint": KnownOptimizer("dadaptation.experimental", "DAdaptAdamPreprint", "dadaptation"),
    "DAdaptAdaGrad": KnownOptimizer("dadaptation", "DAdaptAdaGrad", "dadaptation"),
    "DAdaptAdam": KnownOptimizer("dadaptation", "DAdaptAdam", "dadaptation"),
    "DAdaptAdan": KnownOptimizer("dadaptation", "DAdaptAdan", "dadaptation"),
    "DAdaptAdanIP": KnownOptimizer("dadaptation.experimental", "DAdaptAdanIP", "dadaptation"),
    "DAdaptLion": KnownOptimizer("dadaptation", "DAdaptLion", "dadaptation"),
    "DAdaptSGD": KnownOptimizer("dadaptation", "DAdaptSGD", "dadaptation"),
    "Prodigy": KnownOptimizer("prodigyopt", "Prodigy", "prodigyopt"),
}
_BY_LOWER = {name.lower(): name for name in KNOWN_OPTIMIZERS}

# sd-scripts also builds these, but they need the loop to switch train/eval modes around sampling and saving.
_SCHEDULE_FREE = ("RAdamScheduleFree", "AdamWScheduleFree", "SGDScheduleFree")


def parse_optimizer_args(items: Iterable[str] | None, *, option: str = "optimizer_args") -> dict[str, Any]:
    """sd-scripts' key=value rule: each value through ast.literal_eval ("0.9,0.999" is a tuple), else kept as text."""
    kwargs: dict[str, Any] = {}
    for item in items or ():
        key, sep, text = str(item).partition("=")  # the first "=" only: values such as step_rules may hold more
        if not sep or not key.strip():
            raise UserError(f"--{option} {item!r}: write key=value, e.g. weight_decay=0.01 or betas=0.9,0.999")
        kwargs[key.strip()] = _literal(text)
    return kwargs


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    # sd-scripts would stop here; "false" as text would be truthy, so read the spellings TOML and YAML use.
    if text.strip().lower() in ("true", "false"):
        return text.strip().lower() == "true"
    return text


def optimizer_type(options: Mapping[str, Any]) -> str:
    """--optimizer_type after the old --use_8bit_adam / --use_lion_optimizer flags, "" meaning AdamW."""
    chosen = options.get("optimizer_type") or ""
    if options.get("use_8bit_adam") and options.get("use_lion_optimizer"):
        raise UserError("--use_8bit_adam and --use_lion_optimizer both given: keep one, or use --optimizer_type")
    for flag, name in (("use_8bit_adam", "AdamW8bit"), ("use_lion_optimizer", "Lion")):
        if options.get(flag):
            if chosen:
                raise UserError(f"--{flag} and --optimizer_type {chosen} both given: "
                                f"drop --{flag} (it means --optimizer_type {name})")
            return name
    return chosen or "AdamW"


def make_optimizer(options: Mapping[str, Any], param_groups: Iterable[Any]
                   ) -> tuple[torch.optim.Optimizer, str, dict[str, Any]]:
    """(optimizer, "module.Class" for ss_optimizer, the keyword arguments it got from --optimizer_args)."""
    name = optimizer_type(options)
    kwargs = parse_optimizer_args(options.get("optimizer_args"))
    groups = _copy_groups(param_groups)
    lr = options.get("learning_rate")
    known = _BY_LOWER.get(name.lower())
    fixed: dict[str, Any] = {}
    if known is None:
        cls = _class_from_path(name)
    else:
        spec = KNOWN_OPTIMIZERS[known]
        cls = _import_known(known, spec)
        kwargs |= {key: value for key, value in spec.defaults if key not in kwargs}  # appended, as sd-scripts
        fixed = dict(spec.fixed)
        if known == "AdaFactor":
            lr, groups = _adafactor_settings(kwargs, groups, lr)
        elif known.startswith("DAdapt") or known == "Prodigy":
            _warn_adaptive_lr(known, groups, lr)
    optimizer = _construct(cls, groups, lr, kwargs, fixed, name, options.get("optimizer_args"))
    return optimizer, f"{cls.__module__}.{cls.__name__}", kwargs


def uses_relative_step(optimizer: torch.optim.Optimizer) -> bool:
    """True for transformers' Adafactor with relative_step: it sets its own step size and learning_rate is unused."""
    from transformers.optimization import Adafactor

    return isinstance(optimizer, Adafactor) and any(g.get("relative_step") for g in optimizer.param_groups)


def _copy_groups(param_groups: Iterable[Any]) -> list[Any]:
    # Copies, so dropping a group's lr (Adafactor) never reaches the caller's dicts, unlike sd-scripts' pop().
    return [dict(g) if isinstance(g, Mapping) else g for g in param_groups]


def _import_known(name: str, spec: KnownOptimizer) -> type:
    try:
        module = importlib.import_module(spec.module)
    except ImportError:
        raise UserError(f"--optimizer_type {name} needs the {spec.package} package: pip install {spec.package}, "
                        f"or choose another --optimizer_type such as AdamW") from None
    cls = getattr(module, spec.cls, None)
    if cls is None:
        raise UserError(f"--optimizer_type {name}: the installed {spec.package} has no {spec.cls}; "
                        f"pip install -U {spec.package}")
    return cls


def _class_from_path(name: str) -> type:
    """sd-scripts' fallback: "module.Class" from any library, a bare "Class" from torch.optim."""
    if any(name.lower() == n.lower() for n in _SCHEDULE_FREE):
        raise UserError(f"--optimizer_type {name} is not supported yet: schedule-free optimizers need train/eval "
                        f"mode switches in the training loop; use AdamW or Prodigy")
    module_name, dot, class_name = name.rpartition(".")
    if dot:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise UserError(f"--optimizer_type {name}: cannot import {module_name} ({err}); install the package "
                            f"that provides it or fix the module path") from None
        candidates = [n for n, v in vars(module).items()
                      if isinstance(v, type) and issubclass(v, torch.optim.Optimizer)]
    else:
        module = torch.optim
        # torch.optim class names, matched case-insensitively like sd-scripts' own names
        class_name = next((n for n in dir(module) if n.lower() == name.lower()), name)
        candidates = list(KNOWN_OPTIMIZERS)
    cls = getattr(module, class_name, None)
    if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer:
        return cls
    where = f"{module_name} has no optimizer class {class_name}" if dot else f"unknown optimizer {name!r}"
    raise UserError(f"--optimizer_type: {where}{did_you_mean(class_name, candidates)}; use one of "
                    f"{', '.join(KNOWN_OPTIMIZERS)}, a torch.optim class, or module.Class such as "
                    f"bitsandbytes.optim.AdEMAMix8bit")


def _adafactor_settings(kwargs: dict[str, Any], groups: list[Any], lr: float | None) -> tuple[float | None, list]:
    """sd-scripts' corrections: relative_step defaults on, warmup_init turns it on; then lr is unused (None)."""
    kwargs.setdefault("relative_step", True)
    if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
        _log.info("Adafactor: warmup_init=True needs relative_step, so relative_step is set to True (as sd-scripts)")
        kwargs["relative_step"] = True
    if not kwargs["relative_step"]:
        return lr, groups
    # Adafactor refuses an lr beside relative_step; the lr goes to the "adafactor" schedule as its initial value.
    if any(isinstance(g, dict) and g.get("lr") not in (None, lr) for g in groups):
        _log.warning("Adafactor with relative_step=True: unet_lr and text_encoder_lr are ignored")
    groups = [{k: v for k, v in g.items() if k != "lr"} if isinstance(g, dict) else g for g in groups]
    return None, groups


def _warn_adaptive_lr(name: str, groups: list[Any], lr: float | None) -> None:
    """D-Adaptation and Prodigy scale the lr they get: sd-scripts warns below 1.0-ish and about per-part rates."""
    first = groups[0].get("lr", lr) if groups and isinstance(groups[0], dict) else lr
    rates = {g.get("lr", first) for g in groups if isinstance(g, dict)}
    if first is not None and first <= 0.1:
        _log.warning(f"{name}: learning rate {first} is low; these optimizers expect about 1.0")
    if len(rates) > 1:
        _log.warning(f"{name}: several learning rates given (e.g. unet_lr and text_encoder_lr); "
                     f"only the first, {first}, takes effect")


def _construct(cls: type, groups: list[Any], lr: float | None, kwargs: dict[str, Any], fixed: dict[str, Any],
               name: str, items: Iterable[str] | None) -> torch.optim.Optimizer:
    groups = [dict(g, params=list(g.get("params", []))) if isinstance(g, dict) else g for g in groups]
    params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    if not params:
        # sd-scripts leaves out parameter groups whose learning rate is 0; torch.optim then refuses an empty list.
        raise UserError("nothing to train: every part's learning rate is 0 (--learning_rate, --unet_lr, "
                        "--text_encoder_lr) or no part is trained; set a learning rate above 0")
    try:
        return cls(groups, lr=lr, **fixed, **kwargs)
    except (TypeError, ValueError) as err:
        if not items:  # nothing the user wrote reached the constructor: a bug, keep the traceback
            raise
        raise UserError(f"--optimizer_args {' '.join(map(str, items))}: {name} refused them ({err}); "
                        f"check the names and values against {cls.__module__}.{cls.__name__}") from None
