"""The contract every adapter in the registry keeps, on Linear, 1×1 and 3×3 convolutions, with and without DoRA's weight
decomposition where the adapter has it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from networks.registry import ALGORITHMS, module_class

LAYERS = {
    "linear": lambda: nn.Linear(24, 40),
    "conv1x1": lambda: nn.Conv2d(24, 40, 1),
    "conv3x3": lambda: nn.Conv2d(24, 40, 3, padding=1),
}
# float32 tolerances: runtime vs merged weight differ only by summation order.
RUNTIME_ATOL = 1e-5
UNMERGE_ATOL = 1e-6


def _input(kind: str) -> torch.Tensor:
    return torch.randn(3, 7, 24) if kind == "linear" else torch.randn(2, 24, 6, 6)


# "<algorithm>+dora": the same adapter with dora_wd=True (LyCORIS' weight decomposition).
VARIANTS = {**{a: (a, {}) for a in ALGORITHMS},
            **{f"{a}+dora": (a, {"dora_wd": True}) for a in ALGORITHMS if module_class(a).DECOMPOSABLE}}


def _adapter(variant: str, kind: str, seed: int = 0):
    algorithm, args = VARIANTS[variant]
    torch.manual_seed(seed)
    layer = LAYERS[kind]()
    cls = module_class(algorithm)
    # OFT's dim is its number of blocks and its alpha a constraint (a small number), not a rank and a scale.
    dim, alpha = (8, 1e-2) if cls.ALGORITHM == "oft" else (4, 2)
    adapter = cls(f"{cls.NAME_PREFIX}_unet_test_{kind}", layer, multiplier=0.8, dim=dim, alpha=alpha, **args)
    adapter.apply_to()
    return layer, adapter


def _merged(adapter, weight, multiplier):
    """W + ΔW·m for additive adapters (stated here, not asked of the adapter); the adapter's own weight otherwise."""
    if adapter.is_additive():
        return weight + adapter.delta_weight() * multiplier
    return adapter.merged_weight(weight, multiplier)


def _randomise(adapter) -> None:
    with torch.no_grad():
        for param in adapter.parameters():
            param.normal_(0, 0.1)


def _through(layer, weight, x):
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, weight, layer.bias, layer.stride, layer.padding)
    return F.linear(x, weight, layer.bias)


CASES = [(v, k) for v in VARIANTS for k in LAYERS]


@pytest.mark.parametrize("algorithm, kind", CASES)
def test_fresh_adapter_leaves_the_output_unchanged(algorithm, kind):
    layer, adapter = _adapter(algorithm, kind)
    x = _input(kind)
    if adapter.is_additive():
        assert torch.equal(layer(x), _through(layer, layer.weight, x))
        assert adapter.delta_weight().abs().max() == 0
    else:  # the weight is rebuilt (DoRA: V/‖V‖·‖W‖ with an epsilon), so equal up to rounding
        torch.testing.assert_close(layer(x), _through(layer, layer.weight, x), atol=RUNTIME_ATOL, rtol=0)


@pytest.mark.parametrize("algorithm, kind", CASES)
def test_runtime_output_equals_output_through_the_merged_weight(algorithm, kind):
    layer, adapter = _adapter(algorithm, kind)
    _randomise(adapter)
    x = _input(kind)
    merged = _merged(adapter, layer.weight, 0.8)
    assert merged.shape == layer.weight.shape and (merged - layer.weight).abs().max() > 0
    expected = _through(layer, merged, x)
    torch.testing.assert_close(layer(x), expected, atol=RUNTIME_ATOL, rtol=0)


@pytest.mark.parametrize("algorithm, kind", CASES)
def test_merge_then_unmerge_restores_the_weight(algorithm, kind):
    layer, adapter = _adapter(algorithm, kind)
    _randomise(adapter)
    adapter.restore()
    x = _input(kind)
    before = layer.weight.detach().clone()
    with_adapter = _through(layer, _merged(adapter, before, 0.8), x)
    adapter.merge_to()
    torch.testing.assert_close(layer(x), with_adapter, atol=RUNTIME_ATOL, rtol=0)
    adapter.unmerge()
    torch.testing.assert_close(layer.weight.detach(), before, atol=UNMERGE_ATOL, rtol=0)


@pytest.mark.parametrize("algorithm, kind", CASES)
def test_state_dict_round_trip_is_exact(algorithm, kind):
    layer, adapter = _adapter(algorithm, kind)
    _randomise(adapter)
    state = {k: v.clone() for k, v in adapter.state_dict().items()}
    assert "alpha" in state  # (LoKr with full-rank factors stores alpha = dim: scale 1, as LyCORIS)
    other_layer, other = _adapter(algorithm, kind, seed=1)
    other_layer.load_state_dict(layer.state_dict())
    other.load_state_dict(state)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in state.items())
    x = _input(kind)
    assert torch.equal(other_layer(x), layer(x))


@pytest.mark.parametrize("algorithm", list(VARIANTS))
def test_multiplier_zero_and_module_dropout_skip_the_adapter(algorithm):
    layer, adapter = _adapter(algorithm, "linear")
    _randomise(adapter)
    x = _input("linear")
    base = _through(layer, layer.weight, x)
    adapter.multiplier = 0.0
    assert torch.equal(layer(x), base)
    adapter.multiplier, adapter.module_dropout = 1.0, 1.0
    adapter.train()
    assert torch.equal(layer(x), base)  # module dropout 1.0 drops the whole adapter while training
    adapter.eval()
    assert not torch.equal(layer(x), base)
