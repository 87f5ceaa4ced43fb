"""Frozen convolutions at low resolution as one matrix product (im2col), where oneDNN is slow on a CPU.

oneDNN re-lays a convolution's weights out into its blocked format on every call. For the UNet's deep blocks (1,280
channels at 8×8 or 4×4 latents) that weight pass costs more than the arithmetic: measured on the dev machine, such a
convolution ran at a fraction of the rate of the 320-channel one at 32×32 with the same FLOPs. Unfolding the few input
pixels and multiplying by the weight matrix reads the weights once, as a GEMM does. It is used only where the weights
are much larger than the input (the ratio below) and only for weights that do not train, so autograd keeps nothing
extra (the gradient of a frozen weight is never formed; the input's gradient is W^T · grad folded back).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Weight elements per input element (of one sample) from which the matrix product is used.
MIN_WEIGHT_TO_INPUT = 32.0


def conv2d_as_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation
                     ) -> torch.Tensor:
    """F.conv2d(x, weight, bias, stride, padding, dilation) for groups = 1, as unfold + batched matrix product."""
    if torch.is_autocast_enabled(x.device.type):  # compute in autocast's dtype, as the convolution would
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    b, _, h, w = x.shape
    o, _, kh, kw = weight.shape
    if (kh, kw) == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0):
        cols = x.reshape(b, -1, h * w)  # a pointwise convolution: the pixels are the columns already
    else:
        cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # (B, C·kh·kw, L)
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    matrix = weight.reshape(o, -1).expand(b, -1, -1)
    if bias is None:
        out = torch.bmm(matrix, cols)
    else:
        out = torch.baddbmm(bias.view(1, o, 1).expand(b, o, ho * wo), matrix, cols)
    return out.view(b, o, ho, wo)


def _conv_forward(module: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if (not weight.requires_grad and x.dim() == 4 and isinstance(module.padding, tuple)
            and weight.numel() >= MIN_WEIGHT_TO_INPUT * x[0].numel()):
        return conv2d_as_matmul(x, weight, bias, module.stride, module.padding, module.dilation)
    return nn.Conv2d._conv_forward(module, x, weight, bias)


def use_matmul_convs(model: nn.Module) -> int:
    """Route `model`'s plain Conv2d layers (groups 1, zero padding; 3×3 and 1×1 shortcuts/projections alike) through
    `_conv_forward` above; returns how many.
    Only the instance's `_conv_forward` changes: state dicts, adapters that wrap `forward`, and saves are untouched."""
    count = 0
    for module in model.modules():
        if type(module) is nn.Conv2d and module.groups == 1 and module.padding_mode == "zeros":
            module._conv_forward = _conv_forward.__get__(module)
            count += 1
    return count


def restore_convs(model: nn.Module) -> None:
    for module in model.modules():
        if type(module) is nn.Conv2d and "_conv_forward" in module.__dict__:
            del module._conv_forward
