"""The adapter base: wraps one Linear or Conv2d so its output becomes org(x) + adapter(x) · multiplier · alpha/dim,
or, for adapters that are not additive (DoRA's weight decomposition, OFT's rotation), the layer run with the weight
they make of the original one."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn


class AdapterModule(nn.Module):
    """One adapted layer. Subclasses define their parameters, `delta_weight()` and (if cheaper) `adapter_forward()`.

    The wrapped layer is not a registered sub-module, so the network's state dict holds only adapter tensors under
    sd-scripts' names (`<lora_name>.lora_down.weight`, `<lora_name>.alpha`, ...).

    The class attributes and classmethods below are what the rest of the project knows about an algorithm: the tools,
    file readers and messages derive their tables from the registered classes, so a new adapter is its own file plus
    one line in networks/registry.py.
    """

    ALGORITHM: str = ""  # the registry name, LyCORIS' `algo=` value
    MODULE: str = ""  # its --network_module
    LABEL: str = ""  # the name people use (LoRA, LoHa, LoKr)
    CONV_LABEL: str | None = None  # the name when it also adapts 3×3 convolutions, if different (LoCon)
    ALIASES: tuple[str, ...] = ()  # other `algo` names that train with this module (locon)
    WEIGHT_NAMES: tuple[str, ...] = ()  # the tensors one module may store besides `alpha`, as `<lora_name>.<name>`
    DETECT_NAMES: tuple[str, ...] | None = None  # one of these is in every module (default: WEIGHT_NAMES[0])
    PLUS_PARAMS: tuple[str, ...] = ()  # LoRA+: parameters that learn at lr × the loraplus ratio
    EXTRA_ARGS: ClassVar[dict] = {}  # its own --network_args: name -> parser
    COMMON_ARGS: tuple[str, ...] | None = None  # which of networks.args.COMMON_ARGS it reads (None: all of them)
    NAME_PREFIX: str = "lora"  # module names start lora_unet_ / lora_te_ (sd-scripts' OFT: oft_unet_)
    TEXT_ENCODER: bool = True  # whether it adapts the text encoders too (sd-scripts' OFT: U-Net only)
    ADDITIVE: bool = True  # W + ΔW always (OFT rotates W instead); DoRA makes one module of any class non-additive
    FILE_ALGORITHM: str | None = None  # a training variant whose files are another algorithm's (DyLoRA: lora)
    MAX_NORM: bool = True  # --scale_weight_norms can cap ‖ΔW‖ by scaling parameter_factors()
    DECOMPOSABLE: bool = False  # takes dora_wd=True (LyCORIS' DoRA: a learned magnitude per input channel)

    def __init__(self, lora_name: str, org_module: nn.Module, multiplier: float = 1.0, dim: int = 4,
                 alpha: float | None = 1.0, dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None, dora_wd: bool = False,
                 wd_on_output: bool = False):
        super().__init__()
        if not isinstance(org_module, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"{lora_name}: adapters wrap Linear or Conv2d, not {type(org_module).__name__}")
        self.lora_name = lora_name
        self.multiplier = multiplier
        self.dim = int(dim)
        self.is_conv = isinstance(org_module, nn.Conv2d)
        if self.is_conv:
            self.in_dim, self.out_dim = org_module.in_channels, org_module.out_channels
        else:
            self.in_dim, self.out_dim = org_module.in_features, org_module.out_features
        # alpha 0 or None means "no scaling": alpha = dim (sd-scripts).
        alpha = self.dim if alpha is None or alpha == 0 else float(alpha)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        self._org = [org_module]  # a list keeps it out of this module's parameters and state dict
        self._org_forward = None
        self._merged_from: torch.Tensor | None = None  # the weight before a merge that cannot be subtracted again
        self.dora_scale: nn.Parameter | None = None
        self.wd_on_output = bool(wd_on_output)
        if dora_wd:
            if not self.DECOMPOSABLE:
                raise TypeError(f"{lora_name}: {type(self).__name__} has no weight decomposition (dora_wd)")
            # DoRA's magnitude starts as the original weight's norm, in float32 whatever the model's dtype.
            self.dora_scale = nn.Parameter(channel_norm(org_module.weight.detach().float(), self.wd_on_output))

    @property
    def org_module(self) -> nn.Module:
        return self._org[0]

    @property
    def scale(self) -> float:
        return self.alpha_number() / self.dim

    def alpha_number(self) -> float:
        """alpha as a Python number: the one freeze_alpha() fixed (torch.compile: reading a tensor's value would break
        the graph), else the buffer's."""
        frozen = getattr(self, "_frozen_alpha", None)
        return alpha_value(self.alpha) if frozen is None else frozen

    def freeze_alpha(self) -> None:
        """Fix alpha's value for a compiled forward (it never trains; call again after loading other weights)."""
        self._frozen_alpha = alpha_value(self.alpha)

    def parameter_factors(self) -> list[nn.Parameter]:
        """The tensors ΔW is a product of, each appearing once: scaling each by r^(1/n) scales ΔW by r (DoRA's
        magnitude is not one of them)."""
        return [p for p in self.parameters() if p is not self.dora_scale]

    def factor_degree(self) -> int:
        """n in "ΔW is a product of n factors": scaling every factor by r^(1/n) scales ΔW by r."""
        return len(self.parameter_factors())

    # -------------------------------------------------------------- wiring
    def apply_to(self) -> None:
        """Route the wrapped layer's forward through this adapter (sd-scripts replaces `forward` the same way)."""
        if self._org_forward is None:
            self._org_forward = self.org_module.forward
            self.org_module.forward = self.forward

    def restore(self) -> None:
        if self._org_forward is not None:
            self.org_module.forward = self._org_forward
            self._org_forward = None

    def is_additive(self) -> bool:
        """Whether the adapter adds ΔW·multiplier to W (merging can then be undone by subtracting it)."""
        return self.ADDITIVE and self.dora_scale is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_additive():
            multiplier = self.multiplier
            if isinstance(multiplier, (int, float)) and multiplier == 0:
                return self._org_forward(x)
            if self.module_dropout and self.training and torch.rand(()) < self.module_dropout:
                return self._org_forward(x)
            return self.adapted_forward(x)
        org = self._org_forward(x)
        if self.module_dropout and self.training and torch.rand(()) < self.module_dropout:
            return org
        added = self.adapter_forward(x)
        multiplier = self.multiplier
        if not (isinstance(multiplier, (int, float)) and multiplier == 1):  # × 1.0 changes no bit: skip a
            added = added * multiplier  # full-size multiply per adapted layer (training runs at multiplier 1)
        return org + added

    # -------------------------------------------------------------- maths
    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's added output at multiplier 1 (scale included). Default: through ΔW."""
        return self.apply_weight(x, self.delta_weight().to(x.dtype))

    def delta_weight(self) -> torch.Tensor:
        """ΔW in the wrapped layer's weight shape, alpha/dim scale included, multiplier excluded."""
        raise NotImplementedError

    def apply_weight(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x through the wrapped layer's operation with another weight (and no bias unless given)."""
        org = self.org_module
        if self.is_conv:
            return F.conv2d(x, weight, bias, org.stride, org.padding, org.dilation, org.groups)
        return F.linear(x, weight, bias)

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        """A non-additive adapter's output: the layer run with the adapted weight and its own bias (the original
        weight is read in whatever dtype it is stored, float8 under --fp8_base included)."""
        org = self.org_module
        weight = self.adapted_weight(org.weight, self.multiplier, training=self.training)
        bias = None if org.bias is None else org.bias.to(x.dtype)
        return self.apply_weight(x, weight.to(x.dtype), bias)

    def adapted_weight(self, weight: torch.Tensor, multiplier: float, *, training: bool = False) -> torch.Tensor:
        """The weight a non-additive adapter makes of `weight` at `multiplier`, in the adapter's dtype. DoRA (LyCORIS,
        and as ComfyUI and A1111 apply it): V = W + ΔW, then each input channel (output row with wd_on_output) of V
        rescaled to the learned magnitude, dora_scale / ‖V‖. A multiplier m ≠ 1 blends W + m·(that − W), as ComfyUI
        and A1111 apply a strength (LyCORIS instead scales V by m·(dora_scale/‖V‖ − 1) + 1, which is V, not W, at 0)."""
        base = weight.to(self.dora_scale.dtype)
        delta = self.delta_weight()
        if training and self.rank_dropout:
            from networks.lycoris_common import drop_output_rows

            delta = drop_output_rows(delta, self.rank_dropout)
        combined = base + delta.to(base.dtype)
        norm = channel_norm(combined, self.wd_on_output) + torch.finfo(combined.dtype).eps
        decomposed = combined * (self.dora_scale / norm)
        if isinstance(multiplier, (int, float)) and multiplier == 1:
            return decomposed
        return base + (decomposed - base) * multiplier

    def merged_weight(self, weight: torch.Tensor, multiplier: float | None = None) -> torch.Tensor:
        """The wrapped layer's weight with this adapter merged in: W + ΔW · multiplier for additive adapters, else
        the adapted weight; merging goes through it."""
        multiplier = self.multiplier if multiplier is None else multiplier
        if not self.is_additive():
            return self.adapted_weight(weight, multiplier).to(weight.dtype)
        return weight + (self.delta_weight() * multiplier).to(weight)

    @torch.no_grad()
    def merge_to(self, multiplier: float | None = None) -> None:
        """Merge this adapter into the wrapped layer's weight (then the adapter must not be applied as well)."""
        weight = self.org_module.weight
        if not self.is_additive():
            self._merged_from = weight.detach().clone()  # DoRA's rescaling and OFT's blend have no exact inverse
        weight.copy_(self.merged_weight(weight, multiplier))

    @torch.no_grad()
    def unmerge(self, multiplier: float | None = None) -> None:
        """Take a merge back out: subtract ΔW·multiplier, or restore the weight kept by merge_to."""
        weight = self.org_module.weight
        if not self.is_additive():
            if self._merged_from is None:
                raise RuntimeError(f"{self.lora_name}: unmerge without merge_to")
            weight.copy_(self._merged_from)
            self._merged_from = None
            return
        weight -= (self.delta_weight() * (self.multiplier if multiplier is None else multiplier)).to(weight)

    def org_weight_shape(self) -> torch.Size:
        return self.org_module.weight.shape

    @classmethod
    def name_prefix(cls, prefix: str) -> str:
        """A family's adapter-name prefix (lora_unet, lora_te1, ...) as this algorithm's files spell it."""
        return cls.NAME_PREFIX + prefix.removeprefix("lora")

    # -------------------------------------------------------------- reading files
    @classmethod
    def signature_names(cls) -> tuple[str, ...]:
        """Tensor names that tell a module of this algorithm in a file: one of them is in every module."""
        return cls.DETECT_NAMES if cls.DETECT_NAMES is not None else cls.WEIGHT_NAMES[:1]

    @classmethod
    def dim_from_weights(cls, weights: dict[str, torch.Tensor]) -> int:
        """The rank of one module's tensors (`<rest>` -> tensor, alpha included if stored)."""
        raise NotImplementedError

    @classmethod
    def is_conv_kernel(cls, weights: dict[str, torch.Tensor]) -> bool:
        """Whether the tensors alone show a k×k convolution (a 2-D factor may not tell: the layer name does)."""
        return False

    @classmethod
    def module_args_from_weights(cls, modules: dict[str, dict[str, torch.Tensor]]) -> dict:
        """The network_args (EXTRA_ARGS) that rebuild every module of a file in its stored layout."""
        return {}

    @classmethod
    def layer_shapes(cls, name: str, weights: dict[str, torch.Tensor]) -> list[tuple[int, ...]]:
        """Candidate weight shapes of the adapted layer, likeliest first: svd_merge_lora rebuilds ΔW without the
        model by building the module over a stand-in layer of the first shape its tensors load into."""
        raise NotImplementedError

    @classmethod
    def in_width(cls, weights: dict[str, torch.Tensor]) -> int | None:
        """The adapted Linear's input width when the tensors tell it unambiguously (check_lora_weights reads the
        base model's text-encoder width from attn2 to_k this way); None when they do not."""
        return None


def channel_norm(weight: torch.Tensor, on_output: bool = False) -> torch.Tensor:
    """DoRA's norm of W, shaped to broadcast against it: per input channel, (1, in, 1, …), the layout A1111 and
    ComfyUI both apply (LyCORIS' wd_on_output=False); or per output row, (out, 1, …), LyCORIS' default, which
    A1111 cannot apply."""
    if on_output:
        return weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(weight.shape[0], *[1] * (weight.dim() - 1))
    columns = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
    return columns.reshape(1, weight.shape[1], *[1] * (weight.dim() - 2))


def alpha_value(alpha: torch.Tensor) -> float:
    """The alpha buffer as a number, read from the device only when the buffer changed (moved, cast or loaded):
    float() of a GPU tensor waits for the device, and every forward needs the scale."""
    try:
        version = alpha._version
    except RuntimeError:  # an inference-mode tensor has no version counter
        return float(alpha)
    cached = getattr(alpha, "_host_value", None)
    if cached is None or cached[0] != version:
        cached = (version, float(alpha))
        alpha._host_value = cached  # on the tensor itself: .to() and load_state_dict give a new one or a new version
    return cached[1]


def kaiming_init_(weight: torch.Tensor) -> None:
    """The init nn.Linear/Conv2d use and sd-scripts applies to `lora_down`: Kaiming uniform, a = √5."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
