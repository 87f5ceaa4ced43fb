"""LoHa (LyCORIS `loha`): ΔW = (w1a·w1b) ⊙ (w2a·w2b) · alpha/dim, in LyCORIS' tensor names, shapes and init."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from networks.args import boolean
from networks.lycoris_common import RebuiltWeightAdapter, algo_check, flat_layer_shapes, rebuild_tucker
from networks.network import plugin_entry_points


class HadamardWeight(torch.autograd.Function):
    """(w1a·w1b) ⊙ (w2a·w2b) · scale. Autograd would keep both products (each as large as the layer's weight) for
    backward; this keeps only the four factors and recomputes the products there, as LyCORIS' HadaWeight does."""

    @staticmethod
    def forward(ctx, w1a, w1b, w2a, w2b, scale: float):
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        ctx.scale = scale
        return (w1a @ w1b) * (w2a @ w2b) * scale

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        grad = grad * ctx.scale
        grad_first = grad * (w2a @ w2b)  # d loss / d (w1a·w1b)
        grad_second = grad * (w1a @ w1b)
        return grad_first @ w1b.T, w1a.T @ grad_first, grad_second @ w2b.T, w2a.T @ grad_second, None


class TuckerHadamardWeight(torch.autograd.Function):
    """The same product with each side rebuilt from a Tucker core; backward recomputes both sides from the six
    saved factors (through autograd, the chain is short) instead of keeping two kernel-sized tensors alive."""

    @staticmethod
    def forward(ctx, t1, w1a, w1b, t2, w2a, w2b, scale: float):
        ctx.save_for_backward(t1, w1a, w1b, t2, w2a, w2b)
        ctx.scale = scale
        return rebuild_tucker(t1, w1a, w1b) * rebuild_tucker(t2, w2a, w2b) * scale

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        factors = [t.detach().requires_grad_() for t in ctx.saved_tensors]
        with torch.enable_grad():
            first, second = rebuild_tucker(*factors[:3]), rebuild_tucker(*factors[3:])
        grad = grad * ctx.scale
        grads = torch.autograd.grad((first, second), factors, (grad * second.detach(), grad * first.detach()))
        return (*grads, None)


class LoHaModule(RebuiltWeightAdapter):
    """Two rank-`dim` products multiplied elementwise; a 3×3 conv optionally factors each side as a Tucker core."""

    ALGORITHM = "loha"
    MODULE = "networks.loha"
    LABEL = "LoHa"
    WEIGHT_NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
    # LoRA+: the out-side factors (LoRA's `up` analogue). LyCORIS' kohya network matches only "lora_up", so
    # loraplus ratios have no effect on a LoHa trained by LyCORIS itself.
    PLUS_PARAMS = ("hada_w1_a", "hada_w2_a")
    EXTRA_ARGS = {"algo": algo_check("loha"), "use_tucker": boolean, "dora_wd": boolean, "wd_on_output": boolean}
    DECOMPOSABLE = True

    def __init__(self, lora_name, org_module, multiplier=1.0, dim=4, alpha=1.0, dropout=None, rank_dropout=None,
                 module_dropout=None, use_tucker=False, dora_wd=False, wd_on_output=False, **_unused):
        super().__init__(lora_name, org_module, multiplier, dim, alpha, dropout, rank_dropout, module_dropout,
                         dora_wd=dora_wd, wd_on_output=wd_on_output)
        shape = org_module.weight.shape  # (out, in) or (out, in / groups, kh, kw)
        kernel = tuple(shape[2:])
        self.tucker = bool(use_tucker) and any(k != 1 for k in kernel)
        if self.tucker:
            self.hada_t1 = nn.Parameter(torch.empty(self.dim, self.dim, *kernel))
            self.hada_t2 = nn.Parameter(torch.empty(self.dim, self.dim, *kernel))
            out_shape, in_shape = (self.dim, shape[0]), (self.dim, shape[1])
        else:
            out_shape, in_shape = (shape[0], self.dim), (self.dim, math.prod(shape[1:]))
        self.hada_w1_a = nn.Parameter(torch.empty(out_shape))
        self.hada_w1_b = nn.Parameter(torch.empty(in_shape))
        self.hada_w2_a = nn.Parameter(torch.empty(out_shape))
        self.hada_w2_b = nn.Parameter(torch.empty(in_shape))
        self._init_like_lycoris()

    @torch.no_grad()
    def _init_like_lycoris(self) -> None:
        # LyCORIS' LohaModule init, in its order (so one seed gives the same tensors): w2a = 0 makes ΔW = 0.
        if self.tucker:
            nn.init.normal_(self.hada_t1, std=0.1)
            nn.init.normal_(self.hada_t2, std=0.1)
        nn.init.normal_(self.hada_w1_b, std=1.0)
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w2_b, std=1.0)
        nn.init.zeros_(self.hada_w2_a)

    def delta_weight(self) -> torch.Tensor:
        if self.tucker:
            delta = TuckerHadamardWeight.apply(self.hada_t1, self.hada_w1_a, self.hada_w1_b, self.hada_t2,
                                               self.hada_w2_a, self.hada_w2_b, self.scale)
        else:
            delta = HadamardWeight.apply(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, self.scale)
        return delta.reshape(self.org_weight_shape())

    @classmethod
    def dim_from_weights(cls, weights: dict[str, torch.Tensor]) -> int:
        return weights["hada_w1_b"].shape[0]  # (dim, in·k·k), or (dim, in) with Tucker

    @classmethod
    def is_conv_kernel(cls, weights: dict[str, torch.Tensor]) -> bool:
        # Without Tucker a 3×3 conv's factors are 2-D like a Linear's; only the layer itself tells them apart.
        return "hada_t1" in weights

    @classmethod
    def module_args_from_weights(cls, modules: dict) -> dict:
        return {"use_tucker": True} if any("hada_t1" in weights for weights in modules.values()) else {}

    @classmethod
    def layer_shapes(cls, name: str, weights: dict[str, torch.Tensor]) -> list[tuple[int, ...]]:
        if "hada_t1" in weights:
            return [(weights["hada_w1_a"].shape[1], weights["hada_w1_b"].shape[1], *weights["hada_t1"].shape[2:])]
        return flat_layer_shapes(name, weights["hada_w1_a"].shape[0], weights["hada_w1_b"].shape[1])

    @classmethod
    def in_width(cls, weights: dict[str, torch.Tensor]) -> int | None:
        return None if "hada_t1" in weights else int(weights["hada_w1_b"].shape[1])


create_network, create_network_from_weights = plugin_entry_points(LoHaModule, ignores_neuron_dropout=True)
