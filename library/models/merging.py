"""Pure state-dict merges of single-file (ldm / SGM layout) checkpoints of every family: weighted sum, sd-scripts'
N-model sum, add difference, and by UNet block (SD 1.x/2.x's 12/25-block layout, SDXL's 9/23-block one)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Mapping, NamedTuple, Sequence

import torch

from library.errors import UserError

UNET_PREFIX = "model.diffusion_model."


@dataclass(frozen=True)
class CheckpointBlocks:
    """The UNet blocks of a family's single files (checkpoint keys), as merge_unet_blocks names them (adapter names
    have their own: networks/injection.BlockLayout).

    `blocks`: option name -> (ldm module name, indices that hold weights). `block_list`: sd-scripts' flat block list
    (SD 1.x: block_dims' 25; SDXL: --block_lr's 23), each entry the (option, indices) it covers.
    """

    label: str
    blocks: Mapping[str, tuple[str, tuple[int, ...]]]
    block_list: tuple[tuple[tuple[str, tuple[int, ...]], ...], ...]


# out.1 and time_embed.1 are SiLUs without weights, so naming them would silently do nothing: they are rejected.
SD1_LAYOUT = CheckpointBlocks(
    "SD 1.x/2.x",
    {"input_blocks": ("input_blocks", tuple(range(12))), "middle_blocks": ("middle_block", (0, 1, 2)),
     "output_blocks": ("output_blocks", tuple(range(12))), "out": ("out", (0, 2)),
     "time_embed": ("time_embed", (0, 2))},
    # sd-scripts' 25 blocks (networks/lora.py block_dims): IN00-IN11, M00, OUT00-OUT11; time_embed and out are in none.
    (*((("input_blocks", (i,)),) for i in range(12)), (("middle_blocks", (0, 1, 2)),),
     *((("output_blocks", (i,)),) for i in range(12))))
# SDXL (sdxl-reference.md §2.1): input_blocks.0-8, middle_block.0-2, output_blocks.0-8, and the size/pooled-text
# embedding `label_emb.0.{0,2}` beside time_embed. The 23 blocks are sd-scripts' --block_lr map (sdxl_train.py):
# 0 time_embed + label_emb, 1-9 input_blocks.0-8, 10-12 middle_block.0-2, 13-21 output_blocks.0-8, 22 out.
SDXL_LAYOUT = CheckpointBlocks(
    "SDXL",
    {"input_blocks": ("input_blocks", tuple(range(9))), "middle_blocks": ("middle_block", (0, 1, 2)),
     "output_blocks": ("output_blocks", tuple(range(9))), "out": ("out", (0, 2)),
     "time_embed": ("time_embed", (0, 2)), "label_emb": ("label_emb.0", (0, 2))},
    ((("time_embed", (0, 2)), ("label_emb", (0, 2))), *((("input_blocks", (i,)),) for i in range(9)),
     *((("middle_blocks", (i,)),) for i in range(3)), *((("output_blocks", (i,)),) for i in range(9)),
     (("out", (0, 2)),)))
# Which layout a family's files have (by ModelFamily.name); SD 2.x shares SD 1.x's.
LAYOUTS = {"sd1": SD1_LAYOUT, "sd2": SD1_LAYOUT, "sdxl": SDXL_LAYOUT}
BLOCK_OPTIONS = tuple(dict.fromkeys([*SD1_LAYOUT.blocks, *SDXL_LAYOUT.blocks]))
BLOCKS = SD1_LAYOUT.blocks  # SD 1.x/2.x's table, as before
# A UNet key's block: `input_blocks.4.` -> ("input_blocks", 4); SDXL's `label_emb.0.2.` -> ("label_emb.0", 2).
_BLOCK_KEY = re.compile(rf"^{re.escape(UNET_PREFIX)}(label_emb\.0|[a-z_]+)\.(\d+)\.")
_OPTION_OF_MODULE = {module: option for layout in (SD1_LAYOUT, SDXL_LAYOUT)
                     for option, (module, _) in layout.blocks.items()}


def layout_of(family) -> CheckpointBlocks:
    """The block layout of a loaded or detected family (None: SD 1.x/2.x, sd-scripts' default)."""
    name = getattr(family, "name", None) or "sd1"
    if name not in LAYOUTS:
        raise UserError(f"merging by UNet block is not supported for {family} models")
    return LAYOUTS[name]


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


def sum_of_models(models: Sequence[StateDict], ratios: Sequence[float], *, dtype: torch.dtype | None = None,
                  compute_dtype: torch.dtype = torch.float32, unet_only: bool = False,
                  device: str | torch.device = "cpu") -> Merged:
    """sd-scripts' tools/merge_models.py: Σ ratio_i·model_i over the first model's keys (ratios are not normalised);
    a model missing a key lends its share to the first model's tensor; `unet_only` keeps the first model's VAE and
    text encoders. A single model at ratio 1 (the others 0) gives its tensors exactly."""
    if len(models) != len(ratios):
        raise UserError(f"--ratios: got {len(ratios)} values for {len(models)} models; give one ratio per model")
    for ratio in ratios:
        _check_ratio(ratio, "--ratios")
    first, others = models[0], list(models[1:])
    merged: StateDict = {}
    missing = []
    for key, tensor in first.items():
        if not (isinstance(tensor, torch.Tensor) and tensor.is_floating_point()):
            merged[key] = tensor  # integer buffers are indices, not weights: keep the first model's
            continue
        if unet_only and not _is_unet_key(key):
            merged[key] = _cast(tensor, dtype or tensor.dtype)
            continue
        terms = [(ratios[0], tensor)]
        for ratio, other in zip(ratios[1:], others):
            if key in other:
                _check_shapes(key, tensor, [other[key]])
                terms.append((ratio, other[key]))
            else:
                missing.append(key)
                terms.append((ratio, tensor))
        merged[key] = _cast(_weighted(terms, compute_dtype, device), dtype or tensor.dtype)
    ignored = sorted({key for other in others for key in other if key not in first})
    return Merged(merged, sorted(set(missing)), ignored)


def _is_unet_key(key: str) -> bool:
    # sd-scripts' is_unet_key: everything but the VAE and the text encoders (SD 1.x/2.x and SDXL prefixes).
    return not ("first_stage_model" in key or "cond_stage_model" in key or "conditioner." in key)


def _weighted(terms: list[tuple[float, torch.Tensor]], compute_dtype: torch.dtype,
              device: str | torch.device) -> torch.Tensor:
    used = [(ratio, tensor) for ratio, tensor in terms if ratio != 0]
    if len(used) == 1 and used[0][0] == 1:
        return used[0][1]  # exactly that model's tensor, whatever float rounding would do
    total = None
    for ratio, tensor in used:
        term = tensor.to(device=device, dtype=compute_dtype) * ratio
        total = term if total is None else total + term
    if total is None:
        return torch.zeros_like(terms[0][1])
    return total.cpu()


def merge_by_blocks(a: StateDict, b: StateDict, *, base_alpha: float, dtype: torch.dtype | None = None,
                    layout: CheckpointBlocks = SD1_LAYOUT, **ratios: Mapping[int, float]) -> Merged:
    """Weighted sum with a ratio (the share of B) per UNet block; every key no ratio names uses base_alpha.
    `ratios`: option name (input_blocks, middle_blocks, output_blocks, out, time_embed; SDXL also label_emb) ->
    {index: ratio}, indices checked against `layout`."""
    for option, given in ratios.items():
        check_block_indices(given, option=f"--{option}", layout=layout)
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


def parse_block_ratios(text: str, *, option: str, layout: CheckpointBlocks | None = None,
                       check_indices: bool = True) -> dict[int, float]:
    """"0:0.5, 1:0.5, 11:0.3" -> {0: 0.5, 1: 0.5, 11: 0.3}; an empty string names no block. Indices are checked
    against `layout` (default: SD 1.x/2.x's, for the options it has) unless `check_indices` is False."""
    ratios: dict[int, float] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue  # tolerate a trailing comma
        index, ratio = _parse_pair(item, text, option)
        if index in ratios:
            raise UserError(f"{option} {text!r}: block {index} is given twice; give each block once")
        ratios[index] = ratio
    if check_indices and (layout is not None or option.lstrip("-") in BLOCKS):
        check_block_indices(ratios, option=option, layout=layout or SD1_LAYOUT)
    return ratios


def parse_block_list(text: str, *, option: str, layout: CheckpointBlocks) -> dict[str, dict[int, float]]:
    """sd-scripts' flat block list ("r0,r1,...": 25 for SD 1.x/2.x, 23 for SDXL, in --block_lr order) -> the
    per-option ratios merge_by_blocks takes."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    count = len(layout.block_list)
    if len(items) != count:
        raise UserError(f"{option}: {layout.label} has {count} blocks, got {len(items)} values; give {count} "
                        "comma-separated ratios (" + _list_help(layout) + ")")
    ratios: dict[str, dict[int, float]] = {}
    for item, entry in zip(items, layout.block_list):
        try:
            ratio = float(item)
        except ValueError:
            raise UserError(f"{option}: cannot read {item!r} as a ratio; give numbers such as 0.5") from None
        _check_ratio(ratio, option)
        for name, indices in entry:
            ratios.setdefault(name, {}).update(dict.fromkeys(indices, ratio))
    return ratios


def _list_help(layout: CheckpointBlocks) -> str:
    if layout is SDXL_LAYOUT:
        return "0 time_embed+label_emb, 1-9 input_blocks.0-8, 10-12 middle_block.0-2, 13-21 output_blocks.0-8, 22 out"
    return "0-11 input_blocks.0-11, 12 middle_block, 13-24 output_blocks.0-11"


def check_block_indices(ratios: Mapping[int, float], *, option: str, layout: CheckpointBlocks = SD1_LAYOUT) -> None:
    """Refuse indices that are not weighted layers of that block option in the layout's family."""
    name = option.lstrip("-")
    if name not in layout.blocks:
        if ratios:
            raise UserError(f"{option}: {layout.label} models have no {name} block; drop {option}")
        return
    _, valid = layout.blocks[name]
    for index in ratios:
        if index not in valid:
            shown = f"{valid[0]}-{valid[-1]}" if len(valid) > 2 else " and ".join(map(str, valid))
            raise UserError(f"{option}: block {index} does not exist in {layout.label}; valid indices are {shown}")


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
