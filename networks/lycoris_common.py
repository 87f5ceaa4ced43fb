"""Pieces LoHa and LoKr share, as LyCORIS defines them: its `algo=` argument, Tucker rebuild, rank dropout."""

from __future__ import annotations

import logging

import torch

from networks.base import AdapterModule

logger = logging.getLogger(__name__)


def algo_check(algorithm: str):
    """A parser for LyCORIS' `algo=` network_arg: accepted for config compatibility, refused when it names another
    algorithm (silently training LoHa for `algo=lokr` would be worse than an error)."""

    def parse(text) -> str:
        value = str(text).strip().lower()
        if value != algorithm:
            from networks.registry import algo_modules

            ours = algo_modules()
            raise ValueError(f"this module trains {algorithm}; for {value} use --network_module "
                             f"{ours.get(value, 'lycoris.kohya')}")
        return value

    parse.__name__ = repr(algorithm)
    return parse


def rebuild_tucker(core: torch.Tensor, out_factor: torch.Tensor, in_factor: torch.Tensor) -> torch.Tensor:
    """LyCORIS' Tucker layout: core (r, r, k, k), out_factor (r, out), in_factor (r, in) -> (out, in, k, k)."""
    return torch.einsum("ij...,ip,jq->pq...", core, out_factor, in_factor)


def flat_layer_shapes(name: str, out: int, columns: int) -> list[tuple[int, ...]]:
    """Layer shapes for factors stored 2-D over in·k·k columns (LoHa, low-rank LoKr): a Linear, or a 3×3 conv when
    the columns allow it, the conv first where the layer's name is one of SD's UNet 3×3 convolutions."""
    from networks.files import is_unet_kernel_name

    linear, shapes = (out, columns), [(out, columns)]
    if columns % 9 == 0:
        kernel = (out, columns // 9, 3, 3)
        shapes = [kernel, linear] if is_unet_kernel_name(name) else [linear, kernel]
    return shapes


def drop_output_rows(delta: torch.Tensor, rate: float) -> torch.Tensor:
    """LyCORIS' rank dropout for rebuilt weights: zero whole output rows of ΔW, one mask for the batch, no rescale
    (LyCORIS rescales only with rank_dropout_scale, which its kohya entry never sets)."""
    keep = torch.rand(delta.shape[0], device=delta.device) > rate
    return delta * keep.to(delta.dtype).view(-1, *[1] * (delta.dim() - 1))


def warn_neuron_dropout(neuron_dropout, algorithm: str) -> None:
    if neuron_dropout:
        logger.warning("--network_dropout is ignored by %s: LyCORIS applies no neuron dropout when it rebuilds ΔW "
                       "(use rank_dropout or module_dropout)", algorithm)


class RebuiltWeightAdapter(AdapterModule):
    """LoHa and LoKr run through their rebuilt ΔW, as LyCORIS does (so no neuron dropout in that mode);
    rank dropout masks ΔW's output rows."""

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = self.delta_weight()
        if self.training and self.rank_dropout:
            delta = drop_output_rows(delta, self.rank_dropout)
        return self.apply_weight(x, delta.to(x.dtype))
