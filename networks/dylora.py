"""DyLoRA (`--network_module networks.dylora`): sd-scripts' dynamic-rank LoRA, whose file is a plain LoRA.

The ranks are trained `unit` at a time: each optimizer step, every module draws one block of `unit` ranks; only that
block learns (the others get no gradient, so the optimizer leaves them alone, as sd-scripts' requires_grad switch
does), while the forward uses all ranks with the output scaled by √(dim / (block end)). Ranks trained this way keep
working when the file is cut to its first r ranks (tools/extract_lora_from_dylora.py in sd-scripts; any LoRA resize).
Saved as `lora_down.weight` / `lora_up.weight` / `alpha`: every LoRA loader reads it, `--network_module
networks.lora` included.

Differences from sd-scripts' networks/dylora.py, on purpose: the block is drawn once per optimizer step rather than at
every forward (a gradient-checkpointed recomputation would otherwise draw another block than the forward it
recomputes), from a generator of the network's own, the same on every process; and the rank scaling applies in
training only (sd-scripts also applies a random one while it renders sample images).
"""

from __future__ import annotations

import logging
import math
import random

import torch
import torch.nn.functional as F
from torch import nn

from library.errors import UserError
from networks.args import number
from networks.base import AdapterModule, kaiming_init_
from networks.lora import LoRAModule, lora_delta
from networks.network import AdapterNetwork, build_network, network_from_weights

logger = logging.getLogger(__name__)


class DyLoRAModule(AdapterModule):
    """`dim / unit` blocks of `unit` ranks, each its own pair of parameters (so a block that does not train this step
    has no gradient); the state dict joins them into LoRA's two tensors."""

    ALGORITHM = "dylora"
    MODULE = "networks.dylora"
    LABEL = "DyLoRA"
    FILE_ALGORITHM = "lora"  # its files are LoRA files: reading them goes through LoRAModule
    WEIGHT_NAMES = LoRAModule.WEIGHT_NAMES
    PLUS_PARAMS = ("lora_B",)  # LoRA+: every block of the up side
    EXTRA_ARGS = {"unit": number(int, minimum=1)}
    # sd-scripts' DyLoRA reads conv_dim / conv_alpha and the LoRA+ ratios, nothing else.
    COMMON_ARGS = ("conv_dim", "conv_alpha", "loraplus_lr_ratio", "loraplus_unet_lr_ratio",
                   "loraplus_text_encoder_lr_ratio", "verbose")

    def __init__(self, lora_name, org_module, multiplier=1.0, dim=4, alpha=1.0, dropout=None, rank_dropout=None,
                 module_dropout=None, unit=1, **_unused):
        super().__init__(lora_name, org_module, multiplier, dim, alpha)
        unit = int(unit)
        if self.dim % unit:
            raise UserError(f"networks.dylora: {lora_name} has rank {self.dim}, not a multiple of unit={unit}; "
                            "DyLoRA trains unit ranks at a time (choose --network_dim and unit so that unit divides it)")
        self.unit = unit
        kernel = tuple(org_module.kernel_size) if self.is_conv else ()
        down_shape = (unit, self.in_dim, *kernel)
        up_shape = (self.out_dim, unit, *[1] * len(kernel))
        self.lora_A = nn.ParameterList([nn.Parameter(torch.empty(down_shape)) for _ in range(self.dim // unit)])
        self.lora_B = nn.ParameterList([nn.Parameter(torch.zeros(up_shape)) for _ in range(self.dim // unit)])
        for block in self.lora_A:
            kaiming_init_(block)  # the bound depends on the fan-in only: sd-scripts' per-rank init draws alike
        self.trained_block: int | None = None  # the block learning this step (None: all, with no rank scaling)
        self._register_state_dict_hook(_joined_state)
        self._register_load_state_dict_pre_hook(self._split_state)

    # -------------------------------------------------------------- the dynamic part
    def choose_block(self, block: int | None) -> None:
        """Let only `block` learn (None: every block), as sd-scripts' per-forward requires_grad switch."""
        self.trained_block = block
        for index, (down, up) in enumerate(zip(self.lora_A, self.lora_B)):
            learns = block is None or index == block
            down.requires_grad_(learns)
            up.requires_grad_(learns)

    def down_up(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat(list(self.lora_A), 0), torch.cat(list(self.lora_B), 1)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        down, up = self.down_up()
        org = self.org_module
        if self.is_conv:
            hidden = F.conv2d(x, down, None, org.stride, org.padding, org.dilation)
            out = F.conv2d(hidden, up)
        else:
            out = F.linear(F.linear(x, down), up)
        scale = self.scale
        if self.training and self.trained_block is not None:
            # sd-scripts: × √(dim / (b + unit)), b the first rank of the block that learns
            scale = scale * math.sqrt(self.dim / ((self.trained_block + 1) * self.unit))
        return out if scale == 1.0 else out * scale

    def delta_weight(self) -> torch.Tensor:
        down, up = self.down_up()
        return lora_delta(up, down, self.is_conv, self.out_dim, self.in_dim) * self.scale

    def factor_degree(self) -> int:
        return 2  # ΔW = Σ up_i · down_i: scaling every block of both sides by √r scales it by r

    # -------------------------------------------------------------- LoRA's file layout
    def _split_state(self, state_dict, prefix, *_args) -> None:
        for side, joined, axis in (("lora_A", "lora_down.weight", 0), ("lora_B", "lora_up.weight", 1)):
            tensor = state_dict.pop(prefix + joined, None)
            if tensor is None:
                continue
            target = getattr(self, side)[0]
            if tensor.dim() != target.dim():  # a 1×1 conv stored 2-D (or the reverse)
                tensor = tensor.reshape(*tensor.shape[:2], *target.shape[2:])
            for index, chunk in enumerate(tensor.split(self.unit, dim=axis)):
                state_dict[f"{prefix}{side}.{index}"] = chunk

    # -------------------------------------------------------------- reading files (through LoRAModule)
    @classmethod
    def dim_from_weights(cls, weights: dict[str, torch.Tensor]) -> int:
        return LoRAModule.dim_from_weights(weights)

    @classmethod
    def is_conv_kernel(cls, weights: dict[str, torch.Tensor]) -> bool:
        return LoRAModule.is_conv_kernel(weights)

    @classmethod
    def layer_shapes(cls, name: str, weights: dict[str, torch.Tensor]) -> list[tuple[int, ...]]:
        return LoRAModule.layer_shapes(name, weights)

    @classmethod
    def in_width(cls, weights: dict[str, torch.Tensor]) -> int | None:
        return LoRAModule.in_width(weights)


def _joined_state(module: DyLoRAModule, state_dict: dict, prefix: str, _metadata) -> None:
    """lora_A.0 … / lora_B.0 … -> lora_down.weight / lora_up.weight (sd-scripts' DyLoRA state_dict)."""
    for side, joined, axis in (("lora_A", "lora_down.weight", 0), ("lora_B", "lora_up.weight", 1)):
        keys = [f"{prefix}{side}.{index}" for index in range(len(getattr(module, side)))]
        state_dict[prefix + joined] = torch.cat([state_dict.pop(key) for key in keys], axis)


class DyLoRANetwork(AdapterNetwork):
    """Draws each module's learning block at every optimizer step (sd-scripts' train loop calls on_step_start)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._rng = random.Random(torch.initial_seed())

    def on_step_start(self, *args, **kwargs) -> None:
        modules = self.text_encoder_loras + self.unet_loras
        if not modules:
            return
        blocks = torch.tensor([self._rng.randrange(m.dim // m.unit) for m in modules])
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            # every process must train the same blocks: the gradients are averaged parameter by parameter
            device = next(self.parameters()).device
            blocks = blocks.to(device)
            torch.distributed.broadcast(blocks, 0)
        for module, block in zip(modules, blocks.tolist()):
            module.choose_block(block)

    def on_epoch_start(self, text_encoder, unet) -> None:
        self.train()


def create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, neuron_dropout=None, **kwargs):
    """sd-scripts' plug-in entry: a DyLoRA network (LoRA's targets; conv_dim, which must equal network_dim, adds the
    3×3 convolutions at network_alpha, as sd-scripts does)."""
    dim = 4 if network_dim is None else int(network_dim)
    if neuron_dropout:
        logger.warning("--network_dropout is ignored by DyLoRA (sd-scripts' DyLoRA has no dropout)")
    conv_dim = kwargs.get("conv_dim")
    if conv_dim is not None:
        if str(conv_dim).strip() != str(dim) and _int(conv_dim) != dim:
            raise UserError(f"--network_args conv_dim={conv_dim}: DyLoRA adapts 3×3 convolutions at network_dim "
                            f"({dim}), as sd-scripts does; set conv_dim={dim} or leave it out")
        if kwargs.get("conv_alpha") is not None and network_alpha is not None \
                and _float(kwargs["conv_alpha"]) != float(network_alpha):
            logger.warning("networks.dylora: conv_alpha is ignored; 3×3 convolutions use network_alpha (%g), as in "
                           "sd-scripts", float(network_alpha))
        kwargs["conv_alpha"] = 1.0 if network_alpha is None else network_alpha
    return build_network(DyLoRAModule, multiplier, dim, network_alpha, text_encoder, unet,
                         network_class=DyLoRANetwork, **kwargs)


def create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd=None, for_inference=False,
                                **kwargs):
    """sd-scripts' plug-in entry: a DyLoRA network shaped like a LoRA file (ranks and alphas from its tensors)."""
    return network_from_weights(multiplier, file, text_encoder, unet, weights_sd=weights_sd,
                                for_inference=for_inference, module_class=DyLoRAModule, network_class=DyLoRANetwork,
                                **kwargs)


def _int(text) -> int | None:
    try:
        return int(str(text).strip())
    except ValueError:
        return None


def _float(text) -> float | None:
    try:
        return float(str(text).strip())
    except ValueError:
        return None
