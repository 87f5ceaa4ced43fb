"""Frozen low-resolution convolutions as unfold + matrix product: the same function as F.conv2d, gradients included,
used only where it applies, invisible to state dicts and to adapters that wrap a layer's forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from library.training.conv_matmul import MIN_WEIGHT_TO_INPUT, conv2d_as_matmul, restore_convs, use_matmul_convs


@pytest.mark.parametrize("kernel,stride,padding,dilation,bias", [(3, 1, 1, 1, True), (3, 2, 1, 1, True),
                                                                  (3, 1, 0, 1, False), (3, 1, 2, 2, True),
                                                                  (1, 1, 0, 1, True), (1, 2, 0, 1, False)])
def test_the_matrix_product_is_the_convolution_with_its_input_gradient(kernel, stride, padding, dilation, bias):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(12, 6, kernel, kernel, generator=g)
    b = torch.randn(12, generator=g) if bias else None
    x = torch.randn(2, 6, 7, 5, generator=g, requires_grad=True)
    args = ((stride, stride), (padding, padding), (dilation, dilation))
    expected = F.conv2d(x, weight, b, *args)
    got = conv2d_as_matmul(x, weight, b, *args)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    upstream = torch.randn(expected.shape, generator=g)
    torch.testing.assert_close(torch.autograd.grad(got, x, upstream)[0], torch.autograd.grad(expected, x, upstream)[0],
                               rtol=1e-5, atol=1e-5)


def test_under_bf16_autocast_it_computes_in_bf16_like_the_convolution():
    weight, x = torch.randn(8, 4, 3, 3), torch.randn(1, 4, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = conv2d_as_matmul(x, weight, None, (1, 1), (1, 1), (1, 1))
        expected = F.conv2d(x, weight, None, 1, 1)
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=5e-2)


def _calls(monkeypatch):
    import library.training.conv_matmul as module

    calls = []
    real = module.conv2d_as_matmul
    monkeypatch.setattr(module, "conv2d_as_matmul", lambda *a: calls.append(1) or real(*a))
    return calls


def test_only_frozen_weights_much_larger_than_the_input_take_the_matrix_product(monkeypatch):
    calls = _calls(monkeypatch)
    conv = nn.Conv2d(64, 64, 3, padding=1)
    state = {k: v.clone() for k, v in conv.state_dict().items()}
    assert use_matmul_convs(nn.Sequential(conv, nn.Conv2d(64, 64, 1), nn.Conv2d(64, 64, 3, groups=2))) == 2
    small = torch.randn(1, 64, 4, 4)  # 36,864 weights per 1,024 inputs: 36×
    assert 64 * 64 * 9 >= MIN_WEIGHT_TO_INPUT * small[0].numel()
    conv(small)
    assert calls == []  # the weight trains: the convolution keeps it out of autograd's saved tensors
    conv.requires_grad_(False)
    expected = F.conv2d(small, conv.weight, conv.bias, 1, 1)
    torch.testing.assert_close(conv(small), expected, rtol=1e-5, atol=1e-5)
    assert calls == [1]
    conv(torch.randn(1, 64, 32, 32))  # a large input: oneDNN is fast there
    assert calls == [1]
    assert conv.state_dict().keys() == state.keys() and all(torch.equal(conv.state_dict()[k], v) for k, v in state.items())
    restore_convs(conv)
    conv(small)
    assert calls == [1] and "_conv_forward" not in conv.__dict__


def test_an_adapter_wrapping_the_layer_still_adds_its_output(monkeypatch):
    from networks.lora import LoRAModule

    calls = _calls(monkeypatch)
    conv = nn.Conv2d(64, 64, 3, padding=1).requires_grad_(False)
    lora = LoRAModule("lora_unet_conv", conv, dim=4, alpha=4)
    nn.init.normal_(lora.lora_up.weight)
    lora.apply_to()
    x = torch.randn(1, 64, 4, 4)
    without = conv(x)
    use_matmul_convs(conv)
    with_matmul = conv(x)
    assert calls == [1]
    torch.testing.assert_close(with_matmul, without, rtol=1e-5, atol=1e-5)
    assert (with_matmul - F.conv2d(x, conv.weight, conv.bias, 1, 1)).abs().max() > 1e-3  # the adapter's part is in
