"""`--network_args key=value` parsed into typed options, with one-line errors for unknown keys and bad values."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from library.config.checks import range_problem, range_text
from library.config.suggest import did_you_mean
from library.errors import UserError
from networks.injection import BLOCK_LAYOUTS, BlockLayout

# What --network_module means when it is not given (sd-scripts requires it; LoRA is what its users mean).
DEFAULT_NETWORK_MODULE = "networks.lora"
LR_WEIGHT_PRESETS = ("sine", "cosine", "linear", "reverse_linear", "zeros")


class OutOfRange(ValueError):
    """A value of the right type outside its range: the message says what the range is."""


def number(kind: type, **bounds) -> Callable[[str], int | float]:
    """A parser for one int or float within `bounds` (minimum, maximum, above, below: as Option declares them)."""
    def parse(text: str) -> int | float:
        value = kind(text)
        problem = range_problem(value, **bounds)
        if problem:
            raise OutOfRange(problem)
        return value
    limits = range_text(**bounds)
    parse.__name__ = f"{kind.__name__} {limits}" if limits else kind.__name__
    return parse


def _number_list(kind: type, **bounds) -> Callable[[str], list]:
    """Comma-separated numbers, each within `bounds`; how many a key needs depends on the model's blocks
    (BlockLayout), so `apply_layout` counts them."""
    one = number(kind, **bounds)

    def parse(text: str) -> list:
        values = [kind(v) for v in str(text).split(",") if v.strip()]
        for value in values:
            try:
                one(value)
            except OutOfRange as err:
                raise OutOfRange(f"values {str(err).replace('must be', 'must each be')} (got {value})") from None
        return values
    limits = range_text(**bounds)
    parse.__name__ = f"comma-separated {kind.__name__}s" + (f", each {limits}" if limits else "")
    return parse


def boolean(text: str) -> bool:
    value = str(text).strip().lower()
    if value not in ("true", "false", "1", "0"):
        raise ValueError("must be true or false")
    return value in ("true", "1")


@dataclass(frozen=True)
class Preset:
    """A down/up_lr_weight preset (sine, cosine, linear, reverse_linear, zeros) plus an offset: its values depend
    on how many blocks the model has, so `apply_layout` expands it."""

    name: str
    offset: float

    def values(self, n: int) -> list[float]:
        ramps = {"sine": [math.sin(math.pi * (i / (n - 1)) / 2) for i in range(n)],
                 "linear": [i / (n - 1) for i in range(n)], "zeros": [0.0] * n}
        ramps["cosine"], ramps["reverse_linear"] = ramps["sine"][::-1], ramps["linear"][::-1]
        return [w + self.offset for w in ramps[self.name]]


def lr_weights(text: str) -> Preset | list[float]:
    """sd-scripts' down/up_lr_weight: a preset (sine, cosine, linear, reverse_linear, zeros)[+offset] or numbers
    (one per IN or OUT block: 12 for SD 1.x/2.x, 9 for SDXL)."""
    text = str(text).strip()
    name, _, offset = text.partition("+")
    if name in LR_WEIGHT_PRESETS:
        base = float(offset or 0.0)
        if not math.isfinite(base):
            raise OutOfRange(f"the offset after '+' must be a finite number, got {offset}")
        return Preset(name, base)
    return _weights(text)


def _weights(text: str) -> list[float]:
    values = [float(v) for v in str(text).split(",") if v.strip()]
    for value in values:
        problem = range_problem(value, minimum=0)
        if problem:  # a negative weight would make the block's learning rate negative
            raise OutOfRange(f"weights {problem.replace('must be', 'must each be')} (got {value})")
    return values


BLOCK_COUNTED = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")


def apply_layout(opts: dict[str, Any], layout: BlockLayout) -> dict[str, Any]:
    """The block-wise keys sized for the model's blocks: block_dims & co. must give one value per block; presets
    expand to the IN/OUT block count; weight lists shorter or longer than that are padded with 1.0 or cut, as
    sd-scripts does (mid_lr_weight too: SDXL has 3 middle blocks)."""
    out = dict(opts)
    for key in BLOCK_COUNTED:
        if key in out and len(out[key]) != layout.total:
            raise UserError(f"--network_args {key}: needs {layout.total} comma-separated values for {layout.label} "
                            f"models (one per block, in sd-scripts' order), got {len(out[key])}")
    for key, n in (("down_lr_weight", layout.down), ("up_lr_weight", layout.up), ("mid_lr_weight", layout.mid)):
        if key in out:
            value = out[key]
            values = value.values(n) if isinstance(value, Preset) else list(value)
            out[key] = (values + [1.0] * n)[:n]
    return out


# Keys every network module accepts (sd-scripts' networks/lora.py create_network), each with its range: a dim of 0
# skips the module and an alpha of 0 means alpha = dim (sd-scripts), a dropout is a probability below 1.
COMMON_ARGS: dict[str, Callable[[str], Any]] = {
    "conv_dim": number(int, minimum=0), "conv_alpha": number(float, minimum=0),
    "dropout": number(float, minimum=0, below=1), "rank_dropout": number(float, minimum=0, below=1),
    "module_dropout": number(float, minimum=0, below=1),
    "block_dims": _number_list(int, minimum=0), "block_alphas": _number_list(float, minimum=0),
    "conv_block_dims": _number_list(int, minimum=0), "conv_block_alphas": _number_list(float, minimum=0),
    "down_lr_weight": lr_weights, "mid_lr_weight": _weights, "up_lr_weight": lr_weights,
    "block_lr_zero_threshold": number(float, minimum=0), "loraplus_lr_ratio": number(float, above=0),
    "loraplus_unet_lr_ratio": number(float, above=0), "loraplus_text_encoder_lr_ratio": number(float, above=0),
    "verbose": boolean,
}


def split_network_args(items: Iterable[str] | None) -> dict[str, str]:
    """["conv_dim=4", "algo=locon"] -> {"conv_dim": "4", "algo": "locon"} (sd-scripts' --network_args form)."""
    parsed: dict[str, str] = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise UserError(f"--network_args {item!r}: write key=value, e.g. conv_dim=4")
        parsed[key.strip()] = value.strip()
    return parsed


def parse_network_args(raw: Mapping[str, Any], extra: Mapping[str, Callable[[str], Any]] | None = None,
                       *, module: str = DEFAULT_NETWORK_MODULE, layout: BlockLayout | None = None,
                       common: Iterable[str] | None = None) -> dict[str, Any]:
    """Typed values for the keys `module` accepts (`common`: which of COMMON_ARGS, None for all); an unknown key or a
    bad value is a UserError naming it. With the model's block `layout`, block-wise keys are counted and sized for it
    (`apply_layout`)."""
    shared = COMMON_ARGS if common is None else {key: COMMON_ARGS[key] for key in common}
    accepted = {**shared, **(extra or {})}
    typed: dict[str, Any] = {}
    for key, value in raw.items():
        if value is None:
            continue
        parse = accepted.get(key)
        if parse is None:
            raise UserError(f"--network_args {key}={value}: {module} has no option '{key}'{did_you_mean(key, accepted)}")
        try:
            typed[key] = value if not isinstance(value, str) and parse in (int, float) else parse(value)
        except OutOfRange as err:
            raise UserError(f"--network_args {key}={value}: {key} {err}") from None
        except (TypeError, ValueError) as err:
            kind = getattr(parse, "__name__", "a value")
            raise UserError(f"--network_args {key}={value}: expected {kind} ({err})") from None
        if not all(math.isfinite(v) for v in _floats(typed[key])):  # float("nan") parses; no argument means it
            raise UserError(f"--network_args {key}={value}: {key} must be a finite number")
    return apply_layout(typed, layout) if layout is not None else typed


def _floats(value: Any) -> list[float]:
    items = value if isinstance(value, (list, tuple)) else [value]
    return [v for v in items if isinstance(v, float)]


def check_network_args(items: Iterable[str] | None, module_name: str | None, layout: str = "sd") -> None:
    """--network_args checked before any weights load: the key=value form, and for the modules of this package
    (networks.lora, .loha, .lokr) the value of every key the module declares (type and range). Unknown keys are left
    to create_network, which names them; other modules (lycoris.kohya, ...) read their own arguments."""
    raw = split_network_args(items)
    name = module_name or DEFAULT_NETWORK_MODULE
    if not name.startswith("networks."):
        return
    import importlib

    try:
        module = importlib.import_module(name)
    except ImportError:
        return  # --network_module names no module of ours: loading it later says so
    classes = [v for v in vars(module).values() if isinstance(v, type) and getattr(v, "MODULE", None) == name]
    if classes:
        extra = getattr(classes[0], "EXTRA_ARGS", None) or {}
        known = {key: value for key, value in raw.items() if key in COMMON_ARGS or key in extra}
        parse_network_args(known, extra, module=name, layout=BLOCK_LAYOUTS[layout],
                           common=getattr(classes[0], "COMMON_ARGS", None))
