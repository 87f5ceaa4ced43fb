"""LoHa and LoKr: single-layer maths, network files on the tiny model, and lycoris-lora 4.1.3 as the reference."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from lycoris.config import PRESET
from lycoris.functional.general import factorization as lycoris_factorization
from lycoris.kohya import LycorisNetworkKohya
from lycoris.kohya import create_network_from_weights as lycoris_network_from_weights
from lycoris.modules.loha import LohaModule as LycorisLoha
from lycoris.modules.lokr import LokrModule as LycorisLokr
from safetensors.torch import load_file
from torch import nn

from library.errors import UserError
from networks import loha, lokr
from networks.files import describe_network_file
from networks.loha import HadamardWeight, LoHaModule, TuckerHadamardWeight
from networks.lokr import LoKrModule, factorization

LAYERS = {
    "linear": lambda: nn.Linear(32, 48),
    "conv1x1": lambda: nn.Conv2d(32, 48, 1),
    "conv3x3": lambda: nn.Conv2d(32, 48, 3, padding=1),
}
INPUT_SHAPES = {"linear": (3, 5, 32), "conv1x1": (2, 32, 6, 6), "conv3x3": (2, 32, 6, 6)}
LYCORIS_CLASS = {LoHaModule: LycorisLoha, LoKrModule: LycorisLokr}

# (class, layer, dim, kwargs): every layout the two algorithms write. 48 = 6·8 and 32 = 4·8 (LoKr's split), so
# dim 2 gives a low-rank w2, decompose_both also a low-rank w1, and dim 8 two full matrices.
CASES = {
    **{f"loha-{layer}": (LoHaModule, layer, 4, {}) for layer in LAYERS},
    "loha-conv3x3-tucker": (LoHaModule, "conv3x3", 4, {"use_tucker": True}),
    **{f"lokr-{layer}": (LoKrModule, layer, 2, {}) for layer in LAYERS},
    **{f"lokr-{layer}-decompose-both": (LoKrModule, layer, 2, {"decompose_both": True}) for layer in LAYERS},
    "lokr-conv3x3-tucker": (LoKrModule, "conv3x3", 2, {"use_tucker": True}),
    "lokr-conv3x3-tucker-decompose-both": (LoKrModule, "conv3x3", 2, {"use_tucker": True, "decompose_both": True}),
    **{f"lokr-{layer}-factor4": (LoKrModule, layer, 2, {"factor": 4}) for layer in ("linear", "conv3x3")},
    **{f"lokr-{layer}-full": (LoKrModule, layer, 8, {}) for layer in LAYERS},
}
ALPHA = 3.0  # ≠ dim, so a wrong scale shows
MULTIPLIER = 0.7


def make(case: str, seed: int = 0):
    cls, layer_name, dim, kwargs = CASES[case]
    torch.manual_seed(seed)
    layer = LAYERS[layer_name]()
    return layer, cls("test", layer, multiplier=1.0, dim=dim, alpha=ALPHA, **kwargs)


def randomize(module: nn.Module, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def sample_input(case: str) -> torch.Tensor:
    return torch.randn(INPUT_SHAPES[CASES[case][1]], generator=torch.Generator().manual_seed(2))


def layer_op(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, weight, layer.bias, layer.stride, layer.padding)
    return F.linear(x, weight, layer.bias)


def reference_delta(module) -> torch.Tensor:
    """ΔW from the published formulas, written independently of the modules' code (no kron, no custom Function)."""
    p = dict(module.named_parameters())
    shape = module.org_module.weight.shape
    if isinstance(module, LoHaModule):
        if "hada_t1" in p:
            side = lambda t, a, b: torch.einsum("ijkl,ip,jq->pqkl", t, a, b)  # noqa: E731
            product = (side(p["hada_t1"], p["hada_w1_a"], p["hada_w1_b"])
                       * side(p["hada_t2"], p["hada_w2_a"], p["hada_w2_b"]))
        else:
            product = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])
        return product.reshape(shape) * float(module.alpha) / module.dim
    w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
    if "lokr_w2" in p:
        w2 = p["lokr_w2"]
    elif "lokr_t2" in p:
        w2 = torch.einsum("ijkl,ip,jq->pqkl", p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
    else:
        w2 = (p["lokr_w2_a"] @ p["lokr_w2_b"]).reshape(-1, shape[1] // w1.shape[1], *shape[2:])
    rows, cols = w2.shape[:2]
    delta = torch.zeros(shape)
    for i in range(w1.shape[0]):  # block (i, j) of a Kronecker product is w1[i, j] · w2
        for j in range(w1.shape[1]):
            delta[i * rows:(i + 1) * rows, j * cols:(j + 1) * cols] = w1[i, j] * w2
    low_rank = any(name.endswith(("_a", "_b")) for name in p)
    return delta * (float(module.alpha) / module.dim if low_rank else 1.0)


# ---------------------------------------------------------------------------------------------- single layers
@pytest.mark.parametrize("case", CASES)
def test_output_unchanged_at_init(case):
    layer, module = make(case)
    x = sample_input(case)
    before = layer(x)
    module.apply_to()
    assert torch.count_nonzero(module.delta_weight()) == 0
    assert torch.equal(layer(x), before)


@pytest.mark.parametrize("case", CASES)
def test_init_shapes_and_values_match_lycoris(case):
    """Same seed, same layer: LyCORIS' own module holds the same tensor names, shapes and initial values."""
    cls, layer_name, dim, kwargs = CASES[case]
    layer = LAYERS[layer_name]()
    torch.manual_seed(5)
    ours = cls("test", layer, multiplier=1.0, dim=dim, alpha=ALPHA, **kwargs)
    torch.manual_seed(5)
    theirs = LYCORIS_CLASS[cls]("test", layer, 1.0, dim, ALPHA, **kwargs)
    expected = theirs.state_dict()
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {k: tuple(v.shape) for k, v in expected.items()}
    for name, value in expected.items():
        assert torch.equal(ours.state_dict()[name].float(), value.float()), name
    assert ours.scale == pytest.approx(theirs.scale)


@pytest.mark.parametrize("case", CASES)
def test_runtime_output_equals_output_through_merged_weight(case):
    layer, module = make(case)
    randomize(module)
    module.multiplier = MULTIPLIER
    x = sample_input(case)
    expected = layer_op(layer, x, layer.weight + reference_delta(module) * MULTIPLIER)
    module.apply_to()
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_merge_then_unmerge_restores_weight(case):
    layer, module = make(case)
    randomize(module)
    original = layer.weight.detach().clone()
    x = sample_input(case)
    module.merge_to(MULTIPLIER)
    torch.testing.assert_close(layer.weight, original + reference_delta(module) * MULTIPLIER, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x), layer_op(layer, x, original + reference_delta(module) * MULTIPLIER),
                               atol=1e-5, rtol=1e-5)
    module.unmerge(MULTIPLIER)
    torch.testing.assert_close(layer.weight, original, atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_delta_equals_lycoris_and_its_forward(case):
    """Our tensors loaded into LyCORIS' module: its ΔW (get_weight) and its training forward agree with ours.

    LyCORIS 4.1.3's get_diff_weight / get_merged_weight multiply by alpha/dim a second time (get_weight already
    includes it), unlike its own forward and the A1111/ComfyUI loaders, so they are not the reference here."""
    cls, _, dim, kwargs = CASES[case]
    layer, ours = make(case)
    randomize(ours)
    their_layer = copy.deepcopy(layer)
    theirs = LYCORIS_CLASS[cls]("test", their_layer, MULTIPLIER, dim, ALPHA, **kwargs)
    theirs.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours.delta_weight(), theirs.get_weight(theirs.shape), atol=1e-6, rtol=1e-5)
    ours.multiplier = MULTIPLIER
    ours.apply_to()
    theirs.apply_to()
    x = sample_input(case)
    torch.testing.assert_close(layer(x), their_layer(x), atol=1e-5, rtol=1e-5)


def test_lokr_reads_lycoris_full_matrix_module_with_scale_one():
    """LyCORIS' full_matrix=true keeps both sides full at any dim and stores that dim as alpha: the dim we read
    back must rebuild full matrices, and alpha (≠ dim here) must not scale them."""
    layer = nn.Linear(256, 384)  # 384 = 16·24, 256 = 16·16: dim 2 would make w2 low-rank without full_matrix
    theirs = LycorisLokr("test", layer, 1.0, 2, 1.0, full_matrix=True)
    randomize(theirs)
    weights = theirs.state_dict()
    dim = LoKrModule.dim_from_weights(weights)
    ours = LoKrModule("test", layer, 1.0, dim, float(weights["alpha"]))
    ours.load_state_dict(weights)
    assert float(ours.alpha) == 2.0 and ours.dim == 12 and ours.scale == 1.0
    torch.testing.assert_close(ours.delta_weight(), theirs.get_weight(theirs.shape), atol=0, rtol=0)
    torch.testing.assert_close(ours.delta_weight(), reference_delta(ours), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", ["loha-linear", "loha-conv3x3", "loha-conv3x3-tucker"])
def test_loha_gradients_equal_plain_autograd(case):
    _, module = make(case)
    randomize(module)
    module.double()
    weights = torch.randn(module.org_module.weight.shape, dtype=torch.float64)
    ours = torch.autograd.grad((module.delta_weight() * weights).sum(), list(module.parameters()))
    plain = torch.autograd.grad((reference_delta(module).double() * weights).sum(), list(module.parameters()))
    for a, b in zip(ours, plain):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_hadamard_weight_backward_gradcheck_and_saves_only_factors():
    generator = torch.Generator().manual_seed(0)
    factors = [torch.randn(shape, dtype=torch.float64, generator=generator, requires_grad=True)
               for shape in ((7, 3), (3, 5), (7, 3), (3, 5))]
    assert torch.autograd.gradcheck(lambda *f: HadamardWeight.apply(*f, 0.75), factors)
    saved = HadamardWeight.apply(*factors, 0.75).grad_fn.saved_tensors
    assert [t.shape for t in saved] == [f.shape for f in factors]  # not the two 7×5 products


def test_tucker_hadamard_weight_backward_gradcheck():
    generator = torch.Generator().manual_seed(0)
    shapes = ((3, 3, 3, 3), (3, 6), (3, 4)) * 2  # core, out factor, in factor for each side
    factors = [torch.randn(s, dtype=torch.float64, generator=generator, requires_grad=True) for s in shapes]
    assert torch.autograd.gradcheck(lambda *f: TuckerHadamardWeight.apply(*f, 0.75), factors)
    assert len(TuckerHadamardWeight.apply(*factors, 0.75).grad_fn.saved_tensors) == 6


@pytest.mark.parametrize("case", ["loha-linear", "lokr-linear"])
def test_rank_dropout_zeroes_whole_output_rows_without_rescale(case):
    layer, module = make(case)
    randomize(module)
    x = sample_input(case)
    full = F.linear(x, reference_delta(module)).detach()
    module.rank_dropout = 0.5
    module.train()
    torch.manual_seed(3)
    dropped = module.adapter_forward(x).detach()
    kept = torch.isclose(dropped, full, atol=1e-6).all(dim=(0, 1))
    zero = (dropped == 0).all(dim=(0, 1))
    assert bool((kept | zero).all()) and kept.any() and zero.any()  # LyCORIS masks rows, does not rescale
    module.eval()
    torch.testing.assert_close(module.adapter_forward(x), full, atol=1e-6, rtol=1e-6)


def test_module_dropout_skips_the_adapter_while_training():
    layer, module = make("loha-linear")
    randomize(module)
    x = sample_input("loha-linear")
    before = layer(x)
    module.module_dropout = 1.0
    module.apply_to()
    module.train()
    assert torch.equal(layer(x), before)
    module.eval()
    assert not torch.allclose(layer(x), before)


def test_factorization_equals_lycoris():
    for factor in (-1, 0, 1, 2, 3, 4, 5, 8, 16, 64):
        for dimension in range(1, 1400):
            assert factorization(dimension, factor) == lycoris_factorization(dimension, factor), (dimension, factor)


# ---------------------------------------------------------------------------------------------- networks
NETWORKS = {
    "loha": (loha, 4, {}),
    "loha-tucker": (loha, 4, {"use_tucker": "true"}),
    "lokr": (lokr, 2, {}),
    "lokr-factor4": (lokr, 2, {"factor": "4"}),
    "lokr-tucker": (lokr, 2, {"use_tucker": "true"}),
    # dim 8: Linear and 1×1 layers 32/64 wide get two full matrices; conv_dim 2 and the 512-wide GEGLU a low-rank w2.
    "lokr-full-and-low-rank": (lokr, 8, {}),
    "lokr-decompose-both": (lokr, 2, {"decompose_both": "true"}),
}


@pytest.fixture
def saved_network(tiny_parts, tmp_path):
    """saved_network(name) -> (network with random tensors, its .safetensors file) on the tiny SD1 model."""

    def save(name: str):
        module, dim, args = NETWORKS[name]
        parts = tiny_parts["tiny-sd1"]
        network = module.create_network(1.0, dim, 2, None, parts.text_encoder, parts.unet, conv_dim="2", **args)
        randomize(network)
        file = tmp_path / f"{name}.safetensors"
        network.save_weights(file)
        return network, file

    return save


def shapes(state: dict) -> dict:
    return {k: tuple(v.shape) for k, v in state.items()}


def lycoris_name(key: str) -> str:
    # compatibility-notes item 3: lycoris-lora 4.1.x under transformers ≥ 5 names text-encoder modules
    # lora_te_encoder_…; our files keep sd-scripts' lora_te_text_model_encoder_….
    return key.replace("lora_te_text_model_encoder_", "lora_te_encoder_")


@pytest.mark.parametrize("name", list(NETWORKS))
def test_network_file_describes_and_rebuilds_identically(name, saved_network, tiny_parts):
    network, file = saved_network(name)
    module = NETWORKS[name][0]
    cls = network.module_class
    weights = load_file(str(file))
    assert shapes(weights) == shapes(network.state_dict())
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in weights)  # sd-scripts
    assert any(k.startswith("lora_unet_down_blocks_0_resnets_0_conv1.") for k in weights)  # conv_dim reached 3×3

    info = describe_network_file(weights, source=str(file))
    loras = {lora.lora_name: lora for lora in network.text_encoder_loras + network.unet_loras}
    assert (info.algorithm, info.module_class) == (cls.ALGORITHM, cls)
    assert info.dims == {n: lora.dim for n, lora in loras.items()}
    assert info.alphas == {n: float(lora.alpha) for n, lora in loras.items()}
    assert info.module_args == {k: v for k, v in network.options.items() if k in ("use_tucker", "factor", "decompose_both")}

    parts = tiny_parts["tiny-sd1"]
    rebuilt = module.create_network_from_weights(1.0, file, None, parts.text_encoder, parts.unet)
    assert shapes(rebuilt.state_dict()) == shapes(weights)
    rebuilt.load_weights(file)
    for lora in rebuilt.text_encoder_loras + rebuilt.unet_loras:
        assert torch.equal(lora.delta_weight(), loras[lora.lora_name].delta_weight()), lora.lora_name


@pytest.mark.parametrize("name", [n for n in NETWORKS if n != "lokr-tucker"])
def test_lycoris_reads_our_file_to_the_same_delta(name, saved_network, tiny_parts, monkeypatch):
    """LyCORIS' own loader builds every module from our file's tensors alone (its shape inference, factor
    recovery, alpha handling) and rebuilds the same ΔW. (4.1.3's loader cannot read Tucker LoKr at all, ours
    or its own — it takes w2_a.size(1) for the rank — so that layout is checked module by module above.)"""
    network, file = saved_network(name)
    parts = tiny_parts["tiny-sd1"]
    # Its default `full` preset stops on a diffusers UNet (compatibility-notes item 3); the preset is class state.
    for attr in ("ENABLE_CONV", "UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME",
                 "TEXT_ENCODER_TARGET_REPLACE_MODULE", "TEXT_ENCODER_TARGET_REPLACE_NAME", "MODULE_ALGO_MAP",
                 "NAME_ALGO_MAP", "USE_FNMATCH", "TARGET_EXCLUDE_NAME"):
        monkeypatch.setattr(LycorisNetworkKohya, attr, getattr(LycorisNetworkKohya, attr))
    LycorisNetworkKohya.apply_preset(PRESET["attn-mlp"])
    theirs, _ = lycoris_network_from_weights(1.0, None, None, parts.text_encoder, parts.unet,
                                             weights_sd={lycoris_name(k): v for k, v in load_file(str(file)).items()})
    ours = {lycoris_name(lora.lora_name): lora for lora in network.text_encoder_loras + network.unet_loras}
    their_modules = theirs.text_encoder_loras + theirs.unet_loras
    assert sorted(m.lora_name for m in their_modules) == sorted(ours)
    assert all(type(m) is LYCORIS_CLASS[network.module_class] for m in their_modules)
    for module in their_modules:
        torch.testing.assert_close(module.get_weight(module.shape), ours[module.lora_name].delta_weight(),
                                   atol=1e-6, rtol=1e-5, msg=module.lora_name)


# ---------------------------------------------------------------------------------------------- options
def test_network_args_are_typed_and_checked(tiny_parts):
    parts = tiny_parts["tiny-sd1"]
    net = lokr.create_network(1.0, 2, 1, None, parts.text_encoder, None, algo="LoKr", factor="4",
                              decompose_both="false")
    assert {(lora.w1_low_rank, lora.lokr_w1.shape[0]) for lora in net.text_encoder_loras} == {(False, 4)}
    with pytest.raises(UserError, match="algo=lokr.*networks.lokr"):
        loha.create_network(1.0, 4, 1, None, parts.text_encoder, None, algo="lokr")
    with pytest.raises(UserError, match="use_scalar"):
        lokr.create_network(1.0, 4, 1, None, parts.text_encoder, None, use_scalar="true")
    with pytest.raises(UserError, match="factor=four"):
        lokr.create_network(1.0, 4, 1, None, parts.text_encoder, None, factor="four")


@pytest.mark.parametrize("module, plus", [(loha, {"hada_w1_a", "hada_w2_a"}), (lokr, {"lokr_w2_a"})])
def test_loraplus_group_holds_the_out_side_factors(module, plus, tiny_parts):
    parts = tiny_parts["tiny-sd1"]
    net = module.create_network(1.0, 2, 1, None, parts.text_encoder, None, loraplus_lr_ratio="16")
    groups, descriptions = net.prepare_optimizer_params(1e-4, 1e-4, 1e-4)
    by_id = {id(p): n for lora in net.text_encoder_loras for n, p in lora.named_parameters()}
    plus_group = groups[descriptions.index("textencoder plus")]
    assert plus_group["lr"] == pytest.approx(1.6e-3)
    assert {by_id[id(p)] for p in plus_group["params"]} == plus


def test_neuron_dropout_is_reported_as_ignored(tiny_parts, caplog):
    parts = tiny_parts["tiny-sd1"]
    with caplog.at_level("WARNING", logger="networks.loha"):
        loha.create_network(1.0, 2, 1, None, parts.text_encoder, None, neuron_dropout=0.1)
    assert "--network_dropout is ignored by LoHa" in caplog.text
