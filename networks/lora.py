"""LoRA and LoCon (`--network_module networks.lora`): ΔW = up · down · alpha/dim, sd-scripts' module API."""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from networks.args import boolean
from networks.base import AdapterModule, kaiming_init_
from networks.network import plugin_entry_points


class LoRAModule(AdapterModule):
    """`lora_down` (Kaiming uniform) then `lora_up` (zeros); a 3×3 conv gets a 3×3 down and a 1×1 up (LoCon)."""

    ALGORITHM = "lora"
    MODULE = "networks.lora"
    LABEL, CONV_LABEL = "LoRA", "LoCon"  # sd-scripts' name for a LoRA that also adapts 3×3 convolutions (conv_dim)
    ALIASES = ("locon",)
    WEIGHT_NAMES = ("lora_down.weight", "lora_up.weight")
    PLUS_PARAMS = ("lora_up.weight",)  # LoRA+: the up side learns at lr × loraplus ratio
    # DoRA (LyCORIS' network_args): ours, sd-scripts' networks.lora has no weight decomposition.
    EXTRA_ARGS: dict = {"dora_wd": boolean, "wd_on_output": boolean}
    DECOMPOSABLE = True

    def __init__(self, lora_name, org_module, multiplier=1.0, dim=4, alpha=1.0, dropout=None, rank_dropout=None,
                 module_dropout=None, dora_wd=False, wd_on_output=False, **_unused):
        super().__init__(lora_name, org_module, multiplier, dim, alpha, dropout, rank_dropout, module_dropout,
                         dora_wd=dora_wd, wd_on_output=wd_on_output)
        if self.is_conv:
            self.lora_down = nn.Conv2d(self.in_dim, self.dim, org_module.kernel_size, org_module.stride,
                                       org_module.padding, bias=False)
            self.lora_up = nn.Conv2d(self.dim, self.out_dim, (1, 1), (1, 1), bias=False)
        else:
            self.lora_down = nn.Linear(self.in_dim, self.dim, bias=False)
            self.lora_up = nn.Linear(self.dim, self.out_dim, bias=False)
        kaiming_init_(self.lora_down.weight)
        nn.init.zeros_(self.lora_up.weight)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.lora_down(x)
        scale = self.scale
        if self.training and self.dropout:
            hidden = F.dropout(hidden, p=self.dropout)  # neuron dropout (--network_dropout)
        if self.training and self.rank_dropout:
            # Drop whole ranks per sample and rescale the rest, as sd-scripts does.
            keep = torch.rand((hidden.size(0), self.dim), device=hidden.device) > self.rank_dropout
            if hidden.dim() == 3:  # (batch, tokens, rank)
                keep = keep.unsqueeze(1)
            elif hidden.dim() == 4:  # (batch, rank, h, w)
                keep = keep[..., None, None]
            hidden = hidden * keep
            scale = scale / (1.0 - self.rank_dropout)
        out = self.lora_up(hidden)
        return out if scale == 1.0 else out * scale  # alpha = dim: × 1.0 changes no bit, so skip the full-size pass

    def delta_weight(self) -> torch.Tensor:
        return lora_delta(self.lora_up.weight, self.lora_down.weight, self.is_conv, self.out_dim, self.in_dim) \
            * self.scale

    @classmethod
    def dim_from_weights(cls, weights: dict[str, torch.Tensor]) -> int:
        return weights["lora_down.weight"].shape[0]

    @classmethod
    def is_conv_kernel(cls, weights: dict[str, torch.Tensor]) -> bool:
        down = weights["lora_down.weight"]
        return down.dim() == 4 and down.shape[2:] != (1, 1)

    @classmethod
    def layer_shapes(cls, name: str, weights: dict[str, torch.Tensor]) -> list[tuple[int, ...]]:
        down, up = weights["lora_down.weight"], weights["lora_up.weight"]
        return [(up.shape[0], *down.shape[1:])]

    @classmethod
    def in_width(cls, weights: dict[str, torch.Tensor]) -> int | None:
        return int(weights["lora_down.weight"].shape[1])


def lora_delta(up: torch.Tensor, down: torch.Tensor, is_conv: bool, out_dim: int, in_dim: int) -> torch.Tensor:
    """up · down in the wrapped layer's weight shape (no scale)."""
    if not is_conv:
        return up @ down
    if down.shape[2:] == (1, 1):
        return (up.flatten(1) @ down.flatten(1)).reshape(out_dim, in_dim, 1, 1)
    # 3×3 down then 1×1 up: the composed kernel is up applied to every tap of down.
    return torch.einsum("or,rikl->oikl", up.flatten(1), down)


create_network, create_network_from_weights = plugin_entry_points(LoRAModule)
