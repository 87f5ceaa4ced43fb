"""`--network_args key=value` parsed into typed options, with one-line errors for unknown keys and bad values."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping

from library.config.suggest import did_you_mean
from library.errors import UserError
from networks.injection import NUM_OF_BLOCKS

NUM_BLOCKS = NUM_OF_BLOCKS * 2 + 1  # 25: sd-scripts' block_dims / block_alphas length
LR_WEIGHT_PRESETS = ("sine", "cosine", "linear", "reverse_linear", "zeros")


def _number_list(kind: type, length: int) -> Callable[[str], list]:
    def parse(text: str) -> list:
        values = [kind(v) for v in str(text).split(",") if v.strip()]
        if len(values) != length:
            raise ValueError(f"needs {length} comma-separated values, got {len(values)}")
        return values
    parse.__name__ = f"{length} comma-separated {kind.__name__}s"
    return parse


def boolean(text: str) -> bool:
    value = str(text).strip().lower()
    if value not in ("true", "false", "1", "0"):
        raise ValueError("must be true or false")
    return value in ("true", "1")


def lr_weights(text: str) -> list[float]:
    """sd-scripts' down/up_lr_weight: a preset (sine, cosine, linear, reverse_linear, zeros)[+offset] or 12 numbers."""
    text = str(text).strip()
    name, _, offset = text.partition("+")
    if name in LR_WEIGHT_PRESETS:
        base, n = float(offset or 0.0), NUM_OF_BLOCKS
        ramps = {"sine": [math.sin(math.pi * (i / (n - 1)) / 2) for i in range(n)],
                 "linear": [i / (n - 1) for i in range(n)], "zeros": [0.0] * n}
        ramps["cosine"], ramps["reverse_linear"] = ramps["sine"][::-1], ramps["linear"][::-1]
        return [w + base for w in ramps[name]]
    values = [float(v) for v in text.split(",") if v.strip()]
    # sd-scripts pads a short list with 1.0 and truncates a long one.
    return (values + [1.0] * NUM_OF_BLOCKS)[:NUM_OF_BLOCKS]


# Keys every network module accepts (sd-scripts' networks/lora.py create_network).
COMMON_ARGS: dict[str, Callable[[str], Any]] = {
    "conv_dim": int, "conv_alpha": float, "dropout": float, "rank_dropout": float, "module_dropout": float,
    "block_dims": _number_list(int, NUM_BLOCKS), "block_alphas": _number_list(float, NUM_BLOCKS),
    "conv_block_dims": _number_list(int, NUM_BLOCKS), "conv_block_alphas": _number_list(float, NUM_BLOCKS),
    "down_lr_weight": lr_weights, "mid_lr_weight": float, "up_lr_weight": lr_weights,
    "block_lr_zero_threshold": float, "loraplus_lr_ratio": float, "loraplus_unet_lr_ratio": float,
    "loraplus_text_encoder_lr_ratio": float, "verbose": boolean,
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
                       *, module: str = "networks.lora") -> dict[str, Any]:
    """Typed values for the keys `module` accepts; an unknown key or a bad value is a UserError naming it."""
    accepted = {**COMMON_ARGS, **(extra or {})}
    typed: dict[str, Any] = {}
    for key, value in raw.items():
        if value is None:
            continue
        parse = accepted.get(key)
        if parse is None:
            raise UserError(f"--network_args {key}={value}: {module} has no option '{key}'{did_you_mean(key, accepted)}")
        try:
            typed[key] = value if not isinstance(value, str) and parse in (int, float) else parse(value)
        except (TypeError, ValueError) as err:
            kind = getattr(parse, "__name__", "a value")
            raise UserError(f"--network_args {key}={value}: expected {kind} ({err})") from None
    return typed
