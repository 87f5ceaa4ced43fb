"""LoKr (LyCORIS `lokr`): ΔW = kron(w1, w2) · scale, with LyCORIS' factorization, tensor names, shapes and init."""

from __future__ import annotations

import math

import torch
from torch import nn

from library.errors import UserError
from networks.args import boolean
from networks.lycoris_common import RebuiltWeightAdapter, algo_check, flat_layer_shapes, rebuild_tucker
from networks.network import plugin_entry_points


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m ≤ n and m·n = dimension, as LyCORIS splits a layer's side between w1 (m) and w2 (n).

    A positive factor that divides the dimension is used as is; otherwise m is the largest divisor not above
    √dimension (nor above factor, when one is given). The shapes in LyCORIS files depend on this exact rule.
    """
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return min(m, n), max(m, n)
    limit = dimension if factor < 0 else factor
    m = 1
    for candidate in range(2, math.isqrt(dimension) + 1):
        if candidate > limit:
            break
        if dimension % candidate == 0:
            m = candidate
    return m, dimension // m


class LoKrModule(RebuiltWeightAdapter):
    """kron(small w1, large w2): w2 is low-rank (w2_a·w2_b, or a Tucker core for 3×3 convs) unless dim ≥ half its
    larger side; w1 is low-rank only with decompose_both. With both sides full the scale is 1 (LyCORIS)."""

    ALGORITHM = "lokr"
    MODULE = "networks.lokr"
    LABEL = "LoKr"
    WEIGHT_NAMES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    # Every LoKr module holds one of these (LyCORIS' weight_list_det); by default only WEIGHT_NAMES[0] is.
    DETECT_NAMES = ("lokr_w1", "lokr_w1_a")
    # LoRA+: the out-side factors of the low-rank pairs; full w1/w2 stay at the base lr. LyCORIS' kohya network
    # matches only "lora_up", so loraplus ratios have no effect on a LoKr trained by LyCORIS itself.
    PLUS_PARAMS = ("lokr_w1_a", "lokr_w2_a")
    EXTRA_ARGS = {"algo": algo_check("lokr"), "factor": int, "decompose_both": boolean, "use_tucker": boolean,
                  "dora_wd": boolean, "wd_on_output": boolean}
    DECOMPOSABLE = True

    def __init__(self, lora_name, org_module, multiplier=1.0, dim=4, alpha=1.0, dropout=None, rank_dropout=None,
                 module_dropout=None, factor=-1, decompose_both=False, use_tucker=False, dora_wd=False,
                 wd_on_output=False, **_unused):
        super().__init__(lora_name, org_module, multiplier, dim, alpha, dropout, rank_dropout, module_dropout,
                         dora_wd=dora_wd, wd_on_output=wd_on_output)
        shape = org_module.weight.shape  # (out, in) or (out, in / groups, kh, kw)
        kernel = tuple(shape[2:])
        out_small, out_large = factorization(shape[0], int(factor))
        in_small, in_large = factorization(shape[1], int(factor))
        self.w1_low_rank = bool(decompose_both) and self.dim < max(out_small, in_small) / 2
        self.w2_low_rank = self.dim < max(out_large, in_large) / 2
        self.tucker = bool(use_tucker) and self.w2_low_rank and any(k != 1 for k in kernel)
        self.w2_shape = (out_large, in_large, *kernel)
        if self.w1_low_rank:
            self.lokr_w1_a = nn.Parameter(torch.empty(out_small, self.dim))
            self.lokr_w1_b = nn.Parameter(torch.empty(self.dim, in_small))
        else:
            self.lokr_w1 = nn.Parameter(torch.empty(out_small, in_small))
        if not self.w2_low_rank:
            self.lokr_w2 = nn.Parameter(torch.empty(self.w2_shape))
        elif self.tucker:
            self.lokr_t2 = nn.Parameter(torch.empty(self.dim, self.dim, *kernel))
            self.lokr_w2_a = nn.Parameter(torch.empty(self.dim, out_large))
            self.lokr_w2_b = nn.Parameter(torch.empty(self.dim, in_large))
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(out_large, self.dim))
            self.lokr_w2_b = nn.Parameter(torch.empty(self.dim, in_large * math.prod(kernel)))
        if self.full_rank:
            self.alpha.fill_(float(self.dim))  # LyCORIS writes alpha = dim where the scale is 1
        self._init_like_lycoris()

    @property
    def full_rank(self) -> bool:
        return not (self.w1_low_rank or self.w2_low_rank)

    @property
    def scale(self) -> float:
        # LyCORIS (and ComfyUI, A1111) ignore alpha when neither side is low-rank.
        return 1.0 if self.full_rank else self.alpha_number() / self.dim

    @torch.no_grad()
    def _init_like_lycoris(self) -> None:
        # LyCORIS' LokrModule init, in its order (one seed gives the same tensors); the zero w2 / w2_b makes ΔW = 0.
        kaiming = lambda t: nn.init.kaiming_uniform_(t, a=math.sqrt(5))  # noqa: E731
        if not self.w2_low_rank:
            nn.init.zeros_(self.lokr_w2)
        else:
            if self.tucker:
                kaiming(self.lokr_t2)
            kaiming(self.lokr_w2_a)
            nn.init.zeros_(self.lokr_w2_b)
        if self.w1_low_rank:
            kaiming(self.lokr_w1_a)
            kaiming(self.lokr_w1_b)
        else:
            kaiming(self.lokr_w1)

    def delta_weight(self) -> torch.Tensor:
        w1 = self.lokr_w1_a @ self.lokr_w1_b if self.w1_low_rank else self.lokr_w1
        if not self.w2_low_rank:
            w2 = self.lokr_w2
        elif self.tucker:
            w2 = rebuild_tucker(self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)
        else:
            w2 = (self.lokr_w2_a @ self.lokr_w2_b).reshape(self.w2_shape)
        # A conv's w1 is 2-D: give it 1×1 kernel axes so kron spreads w2's kernel over every block.
        w1 = w1.reshape(*w1.shape, *[1] * (w2.dim() - 2))
        # torch.kron views its operands and fails on the strided Tucker rebuild.
        return torch.kron(w1, w2.contiguous()) * self.scale

    @classmethod
    def dim_from_weights(cls, weights: dict[str, torch.Tensor]) -> int:
        for name in ("lokr_w2_b", "lokr_w1_b"):  # (dim, …) in every layout
            if name in weights:
                return weights[name].shape[0]
        # Both sides full: any dim from half the largest side up rebuilds them full. LyCORIS stored alpha = dim.
        needed = math.ceil(max(*weights["lokr_w1"].shape, *weights["lokr_w2"].shape[:2]) / 2)
        alpha = weights.get("alpha")
        return needed if alpha is None else max(needed, round(float(alpha)))

    @classmethod
    def is_conv_kernel(cls, weights: dict[str, torch.Tensor]) -> bool:
        # A low-rank w2 without Tucker is 2-D for convs too; only the layer itself tells a 3×3 conv then.
        w2 = weights.get("lokr_w2")
        return "lokr_t2" in weights or (w2 is not None and w2.dim() == 4 and tuple(w2.shape[2:]) != (1, 1))

    @classmethod
    def module_args_from_weights(cls, modules: dict) -> dict:
        args = {}
        if any("lokr_t2" in weights for weights in modules.values()):
            args["use_tucker"] = True
        if any("lokr_w1_a" in weights for weights in modules.values()):
            args["decompose_both"] = True
        factor = factor_from_weights(modules)
        if factor != -1:
            args["factor"] = factor
        return args

    @classmethod
    def layer_shapes(cls, name: str, weights: dict[str, torch.Tensor]) -> list[tuple[int, ...]]:
        (out_small, out_large), in_small, in_large = kron_sides(weights)
        out = out_small * out_large
        if "lokr_t2" in weights:
            return [(out, in_small * in_large[0], *weights["lokr_t2"].shape[2:])]
        if "lokr_w2" in weights:
            return [(out, in_small * in_large[0], *weights["lokr_w2"].shape[2:])]
        return flat_layer_shapes(name, out, in_small * weights["lokr_w2_b"].shape[1])

    # in_width stays None: the input width is split over two factors (and w2's columns may hold a 3×3 kernel).


def kron_sides(weights: dict[str, torch.Tensor]) -> tuple[tuple[int, int], int, tuple[int, ...]]:
    """((w1 rows, w2 rows), w1 cols, possible w2 cols) of one module: out = rows product, in = cols product."""
    if "lokr_w1" in weights:
        out_small, in_small = weights["lokr_w1"].shape
    else:
        out_small, in_small = weights["lokr_w1_a"].shape[0], weights["lokr_w1_b"].shape[1]
    if "lokr_w2" in weights:
        out_large, in_large = weights["lokr_w2"].shape[:2]
        return (out_small, out_large), in_small, (in_large,)
    if "lokr_t2" in weights:
        return (out_small, weights["lokr_w2_a"].shape[1]), in_small, (weights["lokr_w2_b"].shape[1],)
    # A 2-D low-rank w2 holds in·k·k columns; SD's adapted convolutions are 1×1 or 3×3.
    columns = weights["lokr_w2_b"].shape[1]
    in_large = tuple(columns // kk for kk in (1, 9) if columns % kk == 0)
    return (out_small, weights["lokr_w2_a"].shape[0]), in_small, in_large


def factor_from_weights(modules: dict[str, dict[str, torch.Tensor]]) -> int:
    """The `factor` network_arg that splits every module's sides as the file does: -1, else the smallest size seen."""
    sides = [kron_sides(weights) for weights in modules.values()]
    candidates = [-1] + sorted({v for (a, b), c, ds in sides for v in (a, b, c, *ds)})

    def fits(factor: int) -> bool:
        return all(factorization(a * b, factor) == (a, b) and any(factorization(c * d, factor) == (c, d) for d in ds)
                   for (a, b), c, ds in sides)

    for factor in candidates:
        if fits(factor):
            return factor
    raise UserError("this LoKr file splits its layers with different factors (per-module factor or "
                    "unbalanced_factorization); networks.lokr rebuilds one factor for the whole network — "
                    "load it with lycoris.kohya instead")


create_network, create_network_from_weights = plugin_entry_points(LoKrModule, ignores_neuron_dropout=True)
