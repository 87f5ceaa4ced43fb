"""OFT (`--network_module networks.oft`): sd-scripts' orthogonal fine-tuning, in its file format.

Each adapted U-Net layer's output rows are split into `network_dim` blocks; each block is rotated by a learned
orthogonal matrix R = (I + Q)(I − Q)⁻¹ (Cayley), Q the skew-symmetric part of `oft_blocks`, its norm capped at
alpha · out_features (sd-scripts' constraint). The weight becomes Rᵀ·W per block; the bias is kept. A multiplier m
uses m·(R − I) + I. Files hold `oft_unet_<layer>.oft_blocks` (blocks, size, size) and `.alpha`, as sd-scripts'
networks/oft.py writes them and A1111 WebUI reads them. U-Net only: attention projections by default,
`enable_all_linear=True` for every Linear / 1×1 conv of the transformer blocks, `enable_conv=True` for the ResNet
blocks and samplers (3×3 convolutions included).
"""

from __future__ import annotations

import logging
import math
from functools import reduce

import torch

from library.errors import UserError
from networks.args import boolean, parse_network_args
from networks.base import AdapterModule
from networks.injection import BLOCK_LAYOUTS, adapter_targets, every_layer, unet_targets
from networks.network import AdapterNetwork, named_for, network_from_weights

logger = logging.getLogger(__name__)

DEFAULT_CONSTRAINT = 1e-3  # sd-scripts' network_alpha when none is given
ATTENTION_CLASSES = ("Attention", "CrossAttention")  # diffusers' class, sd-scripts' own U-Net's


class OFTModule(AdapterModule):
    """`dim` blocks of (out/dim)² each; alpha is the constraint, not a scale."""

    ALGORITHM = "oft"
    MODULE = "networks.oft"
    LABEL = "OFT"
    WEIGHT_NAMES = ("oft_blocks",)
    EXTRA_ARGS = {"enable_all_linear": boolean, "enable_conv": boolean}
    COMMON_ARGS = ()  # sd-scripts' OFT reads only its own two network_args
    NAME_PREFIX = "oft"
    TEXT_ENCODER = False
    ADDITIVE = False
    MAX_NORM = False

    def __init__(self, lora_name, org_module, multiplier=1.0, dim=4, alpha=DEFAULT_CONSTRAINT, dropout=None,
                 rank_dropout=None, module_dropout=None, **_unused):
        super().__init__(lora_name, org_module, multiplier, dim, alpha, dropout, rank_dropout, module_dropout)
        if self.dim < 1 or self.out_dim % self.dim:
            raise UserError(f"networks.oft: network_dim {self.dim} (the number of blocks) must divide every adapted "
                            f"layer's output width; {lora_name} has {self.out_dim}")
        self.alpha.fill_(DEFAULT_CONSTRAINT if alpha is None else float(alpha))  # the base turns 0 into dim
        self.block_size = self.out_dim // self.dim
        self.oft_blocks = torch.nn.Parameter(torch.zeros(self.dim, self.block_size, self.block_size))

    def rotation(self, multiplier) -> torch.Tensor:
        """The (blocks, size, size) rotations at `multiplier`, in float32 (sd-scripts' get_weight)."""
        blocks = self.oft_blocks.float()
        skew = blocks - blocks.transpose(1, 2)
        norm = skew.flatten().norm()
        constraint = self.alpha_number() * self.out_dim
        skew = skew * ((norm.clamp(max=constraint) + 1e-8) / (norm + 1e-8))
        eye = torch.eye(self.block_size, device=blocks.device, dtype=blocks.dtype)
        rotation = (eye + skew) @ torch.linalg.inv(eye - skew)
        if isinstance(multiplier, (int, float)) and multiplier == 1:
            return rotation
        return (rotation - eye) * multiplier + eye

    def adapted_weight(self, weight: torch.Tensor, multiplier, *, training: bool = False) -> torch.Tensor:
        rotation = self.rotation(multiplier)
        blocks = weight.float().reshape(self.dim, self.block_size, -1)
        # Row block k of W becomes R_kᵀ · W_k (sd-scripts' einsum "k n m, k n ... -> k m ...").
        return torch.einsum("knm,knp->kmp", rotation, blocks).reshape(weight.shape)

    def delta_weight(self) -> torch.Tensor:
        """What the rotation changes in the wrapped layer's weight at multiplier 1 (it depends on that weight)."""
        weight = self.org_module.weight
        return self.adapted_weight(weight, 1) - weight.float()

    def parameter_factors(self) -> list[torch.nn.Parameter]:
        return []  # a rotation has no factor whose scaling scales the change (MAX_NORM is off)

    @classmethod
    def dim_from_weights(cls, weights: dict[str, torch.Tensor]) -> int:
        return int(weights["oft_blocks"].shape[0])

    @classmethod
    def layer_shapes(cls, name: str, weights: dict[str, torch.Tensor]) -> list[tuple[int, ...]]:
        return []  # the blocks tell the output width only; OFT's change needs the model anyway


def _targets(unet, side, all_linear: bool, conv: bool):
    """sd-scripts' OFT targets: attention projections (every Linear / 1×1 conv of the transformer blocks with
    enable_all_linear), plus the ResNet blocks' and samplers' layers, 3×3 included, with enable_conv."""
    targets = list(unet_targets(unet, side, include_conv=conv))
    if all_linear:
        return targets

    def under(classes) -> set[int]:
        return {id(child) for module in unet.modules() if type(module).__name__ in classes
                for child in module.modules()}

    keep = under(ATTENTION_CLASSES) | (under(side.conv_classes) if conv else set())
    return [target for target in targets if id(target.module) in keep]


def create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, neuron_dropout=None, **kwargs):
    """sd-scripts' plug-in entry: an OFT network for the U-Net (network_dim blocks, network_alpha the constraint)."""
    count = len(text_encoder) if isinstance(text_encoder, (list, tuple)) else int(text_encoder is not None)
    unet_side, _ = named_for(OFTModule, *adapter_targets(count))
    opts = parse_network_args(kwargs, OFTModule.EXTRA_ARGS, module=OFTModule.MODULE, common=OFTModule.COMMON_ARGS)
    dim = 4 if network_dim is None else int(network_dim)
    alpha = DEFAULT_CONSTRAINT if network_alpha is None else float(network_alpha)
    if not alpha > 0:
        raise UserError(f"--network_alpha {network_alpha}: OFT's alpha is its constraint and must be above 0 "
                        f"(sd-scripts suggests 1e-3 or 1e-4; at 0 nothing can train)")
    if alpha >= 1:
        logger.warning("networks.oft: network_alpha %g is its constraint (× each layer's width); at 1 or more it "
                       "hardly constrains anything: sd-scripts suggests 1e-3 (--network_alpha 1e-3)", alpha)
    if neuron_dropout:
        logger.warning("--network_dropout is ignored by OFT (sd-scripts' OFT has no dropout)")
    targets = _targets(unet, unet_side, bool(opts.get("enable_all_linear")), bool(opts.get("enable_conv")))
    widths = sorted({t.module.weight.shape[0] for t in targets})
    if any(width % dim for width in widths):
        common = reduce(math.gcd, widths)
        fits = [d for d in (1, 2, 4, 8, 16, 32, 64) if common % d == 0]
        raise UserError(f"--network_dim {dim}: OFT splits each layer's output into network_dim blocks, and the "
                        f"adapted widths ({', '.join(map(str, widths[:6]))}) are not all multiples of {dim}; use one "
                        f"of {', '.join(map(str, fits))}")
    modules = [OFTModule(t.lora_name, t.module, multiplier, dim, alpha) for t in targets]
    network = AdapterNetwork(OFTModule, [], modules, multiplier=multiplier, options=opts,
                             block_layout=BLOCK_LAYOUTS[unet_side.blocks])
    network.layer_names = frozenset(t.lora_name for t in every_layer(None, unet, unet_prefix=unet_side.prefix,
                                                                     unet_paths=unet_side.paths(unet)))
    return network


def create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd=None, for_inference=False,
                                **kwargs):
    """sd-scripts' plug-in entry: an OFT network shaped like a saved file (its layers, blocks and constraint)."""
    return network_from_weights(multiplier, file, text_encoder, unet, weights_sd=weights_sd,
                                for_inference=for_inference, module_class=OFTModule, **kwargs)
