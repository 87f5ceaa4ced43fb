"""Float8 storage of frozen layers (--fp8_base): the same math as the cast-up weights, in forward and backward, with
only the 1-byte weights kept for backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from library.training.fp8 import FP8, store_in_fp8


@pytest.mark.parametrize("make, shape", [(lambda: nn.Linear(16, 8), (3, 5, 16)),
                                         (lambda: nn.Conv2d(4, 6, 3, padding=1, stride=2), (2, 4, 9, 9))])
@pytest.mark.parametrize("autocast", [False, True])
def test_forward_and_input_gradient_are_those_of_the_cast_up_weight(make, shape, autocast):
    torch.manual_seed(0)
    layer = make().requires_grad_(False)
    reference = make().requires_grad_(False)
    model = nn.Sequential(layer)
    assert store_in_fp8(model) == 1 and layer.weight.dtype == FP8 and "weight" in layer.state_dict()
    with torch.no_grad():  # the reference computes with exactly the rounded weights, in float32
        reference.weight.copy_(layer.weight.float())
        reference.bias.copy_(layer.bias)
    x = torch.randn(shape, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    saved = []
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), \
            torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
        out = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out_ref = reference(x_ref)
    assert out.dtype == out_ref.dtype
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    assert saved == [FP8]  # autograd keeps the float8 weight, no cast-up copy (nor the input: no weight gradient)
    out.float().square().sum().backward()
    out_ref.float().square().sum().backward()
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-2 if autocast else 1e-5, atol=1e-2 if autocast else 1e-5)


def test_trained_or_skipped_layers_are_left_alone():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)).requires_grad_(False)
    assert store_in_fp8(model, skip=("1",)) == 1 and model[1].weight.dtype == torch.float32
    with pytest.raises(ValueError, match="frozen"):
        store_in_fp8(nn.Linear(2, 2))
