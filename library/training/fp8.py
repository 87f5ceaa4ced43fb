"""--fp8_base / --fp8_base_unet: frozen Linear and Conv2d weights stored in float8 (e4m3), computed in the training
dtype (sd-scripts' options; here on a CPU too).

Each layer's weight is cast up for its own forward and again in backward for the input's gradient: autograd keeps the
float8 weight (1 byte per value), never a cast-up copy, and no weight has a gradient. Biases stay as they were (they
are tiny). The layer's `forward` is replaced, so an adapter wrapping it afterwards (networks' apply_to) calls this
one; the weight keeps its name and shape (state_dict keys, adapters reading shapes) but becomes a float8 buffer.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """What the layer would compute in: autocast's dtype when it is on, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        dtype = _compute_dtype(x)
        ctx.save_for_backward(weight)
        ctx.x_dtype = x.dtype
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return (grad @ weight.to(grad.dtype)).to(ctx.x_dtype), None, None


class _Fp8Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        dtype = _compute_dtype(x)
        ctx.save_for_backward(weight)
        ctx.conv = (x.shape, x.dtype, stride, padding, dilation, groups)
        with torch.autocast(x.device.type, enabled=False):
            return F.conv2d(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), stride, padding,
                            dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        shape, x_dtype, stride, padding, dilation, groups = ctx.conv
        grad_x = torch.nn.grad.conv2d_input(shape, weight.to(grad.dtype), grad, stride, padding, dilation, groups)
        return grad_x.to(x_dtype), None, None, None, None, None, None


def _linear_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _Fp8Linear.apply(x, module.weight, module.bias)


def _conv_forward(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        raise ValueError(f"fp8 storage supports zero-padded convolutions with numeric padding, not {module}")
    return _Fp8Conv2d.apply(x, module.weight, module.bias, module.stride, module.padding, module.dilation,
                            module.groups)


def store_in_fp8(model: nn.Module, *, skip: tuple[str, ...] = ()) -> int:
    """Every frozen Linear / Conv2d of `model` (names containing none of `skip`) stored in float8 and computed through
    the functions above; returns how many layers. Call it after the model has its device and dtype, and before
    adapters wrap the layers."""
    count = 0
    for name, module in model.named_modules():
        if any(part in name for part in skip) or type(module) not in (nn.Linear, nn.Conv2d):
            continue
        if module.weight.requires_grad:
            raise ValueError(f"{name}: fp8 storage is for frozen weights")
        weight = module.weight.detach().to(FP8)
        # A buffer now, under the same name: state_dict keys stay, and the model's dtype (diffusers' and
        # transformers' `.dtype`: the first floating parameter) stays the compute dtype for sampling and caches.
        del module.weight
        module.register_buffer("weight", weight)
        forward = _linear_forward if type(module) is nn.Linear else _conv_forward
        module.forward = functools.partial(forward, module)
        count += 1
    return count
