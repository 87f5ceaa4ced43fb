"""Where adapters go, named as sd-scripts names them: `lora_unet_<diffusers path>` and `lora_te_<transformers path>`
(`lora_te1_` / `lora_te2_` for a family with two text encoders). Which module classes are targets, and each part's
prefix, come from the model family (`ModelFamily.unet_targets` / `text_encoder_targets`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterator

from torch import nn

from library.models.family import AdapterTargets

# The single-text-encoder families' prefixes (SD 1.x/2.x), which most files use.
UNET_PREFIX = "lora_unet"
TEXT_ENCODER_PREFIX = "lora_te"
NUM_OF_BLOCKS = 12  # sd-scripts' block indexing: 0 (unused), IN01..IN11 = 1..11, MID = 12, OUT00..OUT11 = 13..24
_UP_DOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")


@dataclass(frozen=True)
class Target:
    lora_name: str
    module: nn.Module
    is_conv_kernel: bool  # a Conv2d wider than 1×1: gets an adapter only with conv_dim (LoCon)


def adapter_targets(text_encoder_count: int) -> tuple[AdapterTargets, tuple[AdapterTargets, ...]]:
    """(UNet targets, targets per text encoder) of the family with that many text encoders (sd-scripts' plug-in
    API hands networks one text encoder, or a list of them, and no family)."""
    from library.models.family import families

    every = families()
    family = next((f for f in every if len(f.text_encoder_targets) == text_encoder_count), every[0])
    return family.unet_targets, family.text_encoder_targets[:text_encoder_count]


def text_encoder_targets(text_encoder: nn.Module, targets: AdapterTargets) -> Iterator[Target]:
    """The targets' modules (CLIP: self_attn q/k/v/out_proj and mlp fc1/fc2 of every layer), named with
    transformers 4's `text_model.` path: transformers >= 5 dropped that wrapper; the ecosystem's files keep it."""
    for name, module in text_encoder.named_modules():
        if type(module).__name__ in targets.classes:
            path = name if name.startswith("text_model.") else f"text_model.{name}"
            yield from _children(targets.prefix, path, module)


def unet_targets(unet: nn.Module, targets: AdapterTargets, *, include_conv: bool) -> Iterator[Target]:
    """Linear / 1×1 Conv children of the targets' modules; with conv_dim, also their conv classes' (ResNet blocks,
    up/down-samplers). Named by the family's path map (SDXL: SGM names)."""
    classes = targets.classes + (targets.conv_classes if include_conv else ())
    paths = targets.paths(unet)
    for name, module in unet.named_modules():
        if type(module).__name__ in classes:
            yield from _children(targets.prefix, name, module, paths)


def every_layer(text_encoder: nn.Module | None, unet: nn.Module | None, *,
                text_encoder_prefix: str = TEXT_ENCODER_PREFIX, unet_prefix: str = UNET_PREFIX,
                unet_paths: Callable[[str], str] | None = None) -> Iterator[Target]:
    """Every Linear and Conv2d of the model under the names a network file would give it: what a file made with
    other targets (LyCORIS presets that adapt conv_in, time_embedding, ...) can name, in the model's order."""
    if text_encoder is not None:
        path = "" if any(n.startswith("text_model.") for n, _ in text_encoder.named_modules()) else "text_model"
        yield from _children(text_encoder_prefix, path, text_encoder)
    if unet is not None:
        yield from _children(unet_prefix, "", unet, unet_paths)


def _children(prefix: str, path: str, module: nn.Module, paths: Callable[[str], str] | None = None) -> Iterator[Target]:
    for child_name, child in module.named_modules():
        if isinstance(child, (nn.Linear, nn.Conv2d)):
            full = ".".join(part for part in (path, child_name) if part)
            lora_name = ".".join(part for part in (prefix, paths(full) if paths else full) if part).replace(".", "_")
            is_kernel = isinstance(child, nn.Conv2d) and child.kernel_size != (1, 1)
            yield Target(lora_name, child, is_kernel)


def block_index(lora_name: str) -> int:
    """sd-scripts' 25-block index of a UNet adapter (-1 for modules outside the blocks, e.g. text encoder)."""
    match = _UP_DOWN.search(lora_name)
    if match:
        direction, block, kind, layer = match.group(1), int(match.group(2)), match.group(3), int(match.group(4))
        index = 3 * block + (2 if kind in ("upsamplers", "downsamplers") else layer)
        return 1 + index if direction == "down" else NUM_OF_BLOCKS + 1 + index
    return NUM_OF_BLOCKS if "mid_block_" in lora_name else -1
