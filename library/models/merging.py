"""Pure state-dict merges of SD 1.x/2.x single-file (ldm layout) checkpoints: weighted sum, add difference, by block."""

from __future__ import annotations

import math
import re
from typing import Callable, Mapping, NamedTuple

import torch

from library.errors import UserError

UNET_PREFIX = "model.diffusion_model."

# option name -> (ldm module name, indices that hold weights in SD 1.x/2.x). out.1 and time_embed.1 are SiLUs
# without weights, so naming them would silently do nothing: they are rejected instead.
BLOCKS: dict[str, tuple[str, tuple[int, ...]]] = {
    "input_blocks": ("input_blocks", tuple(range(12))),
    "middle_blocks": ("middle_block", (0, 1, 2)),
    "output_blocks": ("output_blocks", tuple(range(12))),
    "out": ("out", (0, 2)),
    "time_embed": ("time_embed", (0, 2)),
}
_OPTION_OF_MODULE = {module: option for option, (module, _) in BLOCKS.items()}
_BLOCK_KEY = re.compile(rf"^{re.escape(UNET_PREFIX)}([a-z_]+)\.(\d+)\.")

StateDict = dict[str, torch.Tensor]


class Merged(NamedTuple):
    """The merged tensors (in A's key order), A's keys absent from B or C (copied from A), and B/C-only keys."""
    state_dict: StateDict
    missing: list[str]
    ignored: list[str]


def weighted_sum(a: StateDict, b: StateDict, alpha: float, *, dtype: torch.dtype | None = None) -> Merged:
    """(1 - alpha)·A + alpha·B per floating tensor; alpha 0 gives A's tensors exactly, alpha 1 B's."""
    _check_ratio(alpha, "--alpha")
    return _merge(a, [b], lambda key, ta, tb: _lerp(ta, tb, alpha), dtype)


def add_difference(a: StateDict, b: StateDict, c: StateDict, alpha: float, *,
                   dtype: torch.dtype | None = None) -> Merged:
    """A + alpha·(B − C) per floating tensor; alpha 0 gives A's tensors exactly."""
    _check_ratio(alpha, "--alpha")

    def mix(key, ta, tb, tc):
        if alpha == 0:
            return ta
        return ta.float() + alpha * (tb.float() - tc.float())

    return _merge(a, [b, c], mix, dtype)


def merge_by_blocks(a: StateDict, b: StateDict, *, input_blocks: Mapping[int, float],
                    middle_blocks: Mapping[int, float], output_blocks: Mapping[int, float],
                    out: Mapping[int, float], time_embed: Mapping[int, float], base_alpha: float,
                    dtype: torch.dtype | None = None) -> Merged:
    """Weighted sum with a ratio (the share of B) per UNet block; every key no ratio names uses base_alpha."""
    ratios = {"input_blocks": input_blocks, "middle_blocks": middle_blocks, "output_blocks": output_blocks,
              "out": out, "time_embed": time_embed}
    for option, given in ratios.items():
        check_block_indices(given, option=f"--{option}")
        for value in given.values():
            _check_ratio(value, f"--{option}")
    _check_ratio(base_alpha, "--base_alpha")

    def mix(key, ta, tb):
        ratio = block_ratio(key, ratios)
        return _lerp(ta, tb, base_alpha if ratio is None else ratio)

    return _merge(a, [b], mix, dtype)


def block_ratio(key: str, ratios: Mapping[str, Mapping[int, float]]) -> float | None:
    """The ratio `ratios[option][index]` for a key inside a named UNet block (options as in BLOCKS), else None."""
    match = _BLOCK_KEY.match(key)
    if not match:
        return None
    option = _OPTION_OF_MODULE.get(match.group(1))
    if option is None:
        return None
    return ratios.get(option, {}).get(int(match.group(2)))


def parse_block_ratios(text: str, *, option: str) -> dict[int, float]:
    """"0:0.5, 1:0.5, 11:0.3" -> {0: 0.5, 1: 0.5, 11: 0.3}; an empty string names no block."""
    ratios: dict[int, float] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue  # tolerate a trailing comma
        index, ratio = _parse_pair(item, text, option)
        if index in ratios:
            raise UserError(f"{option} {text!r}: block {index} is given twice; give each block once")
        ratios[index] = ratio
    if option.lstrip("-") in BLOCKS:
        check_block_indices(ratios, option=option)
    return ratios


def check_block_indices(ratios: Mapping[int, float], *, option: str) -> None:
    """Refuse indices that are not weighted layers of that block option in SD 1.x/2.x."""
    _, valid = BLOCKS[option.lstrip("-")]
    for index in ratios:
        if index not in valid:
            shown = f"{valid[0]}-{valid[-1]}" if len(valid) > 2 else " and ".join(map(str, valid))
            raise UserError(f"{option}: block {index} does not exist in SD 1.x/2.x; valid indices are {shown}")


def _parse_pair(item: str, text: str, option: str) -> tuple[int, float]:
    index_text, sep, ratio_text = item.partition(":")
    try:
        if not sep:
            raise ValueError
        index, ratio = int(index_text.strip()), float(ratio_text.strip())
    except ValueError:
        raise UserError(f"{option} {text!r}: cannot read {item!r}; write INDEX:RATIO pairs separated by commas, "
                        "e.g. \"0:0.5, 1:0.3\"") from None
    if index < 0:
        raise UserError(f"{option} {text!r}: block index {index} is negative; indices start at 0")
    _check_ratio(ratio, option)
    return index, ratio


def _check_ratio(value: float, option: str) -> None:
    if not math.isfinite(value):
        raise UserError(f"{option}: ratio {value} is not a finite number; use e.g. 0.5")


def _lerp(ta: torch.Tensor, tb: torch.Tensor, ratio: float) -> torch.Tensor:
    # 0 and 1 are special-cased so those merges reproduce a model bit for bit, whatever float rounding does.
    if ratio == 0:
        return ta
    if ratio == 1:
        return tb
    return ta.float() * (1 - ratio) + tb.float() * ratio


def _merge(a: StateDict, others: list[StateDict], mix: Callable[..., torch.Tensor],
           dtype: torch.dtype | None) -> Merged:
    """Apply `mix(key, a_tensor, *other_tensors)` to A's floating tensors; copy everything else from A."""
    merged: StateDict = {}
    missing = []
    for key, ta in a.items():
        if not (isinstance(ta, torch.Tensor) and ta.is_floating_point()):
            merged[key] = ta  # position_ids and other integer buffers are indices, not weights: keep A's
            continue
        if any(key not in other for other in others):
            missing.append(key)
            merged[key] = _cast(ta, dtype or ta.dtype)
            continue
        theirs = [other[key] for other in others]
        _check_shapes(key, ta, theirs)
        merged[key] = _cast(mix(key, ta, *theirs), dtype or ta.dtype)
    ignored = sorted({key for other in others for key in other if key not in a})
    return Merged(merged, missing, ignored)


def _check_shapes(key: str, ta: torch.Tensor, theirs: list[torch.Tensor]) -> None:
    for name, tensor in zip("BC", theirs):
        if not isinstance(tensor, torch.Tensor) or tensor.shape != ta.shape:
            shape = list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise UserError(f"{key}: shape {list(ta.shape)} in model A but {shape} in model {name}; the models have "
                            "different architectures (SD 1.x vs 2.x, inpainting...) and cannot be merged")


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor if tensor.dtype == dtype else tensor.to(dtype)
