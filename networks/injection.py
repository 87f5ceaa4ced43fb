"""Where adapters go, named as sd-scripts names them: `lora_unet_<diffusers path>` and `lora_te_<transformers path>`
(`lora_te1_` / `lora_te2_` for a family with two text encoders). Which module classes are targets, and each part's
prefix, come from the model family (`ModelFamily.unet_targets` / `text_encoder_targets`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

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


def sgm_block_index(lora_name: str) -> int:
    """sd-scripts' 23-block index of an SDXL UNet adapter (SGM names, as --block_lr counts): 0 time/label
    embeddings, 1-9 input_blocks 0-8, 10-12 middle_block 0-2, 13-21 output_blocks 0-8, 22 out; -1 otherwise."""
    name = lora_name.removeprefix("lora_unet_")
    if name == lora_name:
        return -1
    for head, first in (("input_blocks_", 1), ("middle_block_", 10), ("output_blocks_", 13)):
        if name.startswith(head):
            return first + int(name[len(head):].split("_")[0])
    if name.startswith(("time_embed_", "label_emb_")):
        return 0
    return 22 if name.startswith("out_") else -1


@dataclass(frozen=True)
class BlockLayout:
    """sd-scripts' blocks of a UNet for block-wise network_args: block_dims & co. take one value per block
    (`total`), down_lr_weight / up_lr_weight `down` / `up` values and mid_lr_weight `mid`; SDXL's list starts and
    ends with a block that never gets adapters (the embeddings, the output layers)."""

    label: str
    down: int
    mid: int
    up: int
    padded: bool  # one extra block before and after (SDXL)
    index: Callable[[str], int]  # adapter name -> block index, -1 outside the blocks (text encoders)

    @property
    def total(self) -> int:
        return self.down + self.mid + self.up + (2 if self.padded else 0)

    def lr_weights(self, down: Sequence[float], mid: Sequence[float], up: Sequence[float]) -> list[float]:
        """One learning-rate weight per block index (sd-scripts' get_block_lr_weight list)."""
        weights = [*down, *mid, *up]
        return [1.0, *weights, 1.0] if self.padded else weights


BLOCK_LAYOUTS = {"sd": BlockLayout("SD 1.x/2.x", NUM_OF_BLOCKS, 1, NUM_OF_BLOCKS, False, block_index),
                 "sdxl": BlockLayout("SDXL", 9, 3, 9, True, sgm_block_index)}
