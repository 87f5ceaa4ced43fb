"""AUTOMATIC1111 hypernetworks: A1's .pt layout, round trips, hooks on the UNet's attentions, legacy files, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.attention_processor import Attention
from safetensors.torch import save_file
from torch import nn

from library.errors import UserError
from networks.hypernetwork import (
    ACTIVATIONS, Hypernetwork, load_hypernetwork, parse_dropout_structure, parse_layer_structure, parse_sizes,
    save_hypernetwork,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

A1_SIZES = (320, 640, 768, 1024, 1280)
FANCY = dict(layer_structure=(1, 2, 2, 1), activation_func="relu", add_layer_norm=True,
             dropout_structure=(0, 0.1, 0.1, 0))


@pytest.fixture
def unet(tiny_parts):
    """A private copy of the tiny SD 1.x UNet (hooks are registered on its projections)."""
    return copy.deepcopy(tiny_parts["tiny-sd1"].unet).requires_grad_(False).eval()


def _inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 7, 32, generator=generator)
    return sample, torch.tensor([10]), context


def _run(unet, inputs=None):
    sample, timestep, context = inputs or _inputs()
    return unet(sample, timestep, encoder_hidden_states=context).sample


def _randomised(network, seed=0, std=0.2):
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in network.parameters():
            param.normal_(0, std)
    return network.eval()


def _described(data: dict) -> dict:
    """The A1 dict as JSON: sizes -> k/v key -> shape, plus the settings under their own keys."""
    out = {}
    for key, value in data.items():
        if isinstance(key, int):
            out[str(key)] = {role: {k: list(t.shape) for k, t in sd.items()} for role, sd in zip("kv", value)}
        else:
            out[key] = value
    return out


def test_a1111_layout_golden(golden):
    torch.manual_seed(0)
    default = Hypernetwork(A1_SIZES).to_a1111(step=12, name="default", sd_checkpoint="abcdef1234",
                                              sd_checkpoint_name="model")
    golden("hypernetwork_a1111_default", _described(default))
    fancy = Hypernetwork((320, 768), **FANCY).to_a1111(step=0, name="fancy", optional_info="note")
    golden("hypernetwork_a1111_relu_norm_dropout", _described(fancy))


def _a1_sequential(dim, layer_structure, activation, norm, dropout, activate_output):
    """A1's layer list written out by hand: Linear, [activation], [LayerNorm], [Dropout] per step."""
    layers = []
    for i in range(len(layer_structure) - 1):
        width = int(dim * layer_structure[i + 1])
        layers.append(nn.Linear(int(dim * layer_structure[i]), width))
        if activation is not None and (i < len(layer_structure) - 2 or activate_output):
            layers.append(activation())
        if norm:
            layers.append(nn.LayerNorm(width))
        if dropout[i + 1] > 0:
            layers.append(nn.Dropout(dropout[i + 1]))
    return nn.Sequential(*layers)


@pytest.mark.parametrize("settings, by_hand", [
    ({}, ((1, 2, 1), None, False, (0, 0, 0), False)),
    (FANCY, ((1, 2, 2, 1), nn.ReLU, True, (0, 0.1, 0.1, 0), False)),
    (dict(FANCY, activate_output=True, add_layer_norm=False, activation_func="swish"),
     ((1, 2, 2, 1), nn.Hardswish, False, (0, 0.1, 0.1, 0), True)),
    (dict(layer_structure=(1, 1.5, 1), activation_func="gelu", dropout_structure=(0, 0.3, 0)),
     ((1, 1.5, 1), nn.GELU, False, (0, 0.3, 0), False)),
])
def test_saved_state_dicts_load_strictly_into_a1_layers_built_by_hand(settings, by_hand):
    data = Hypernetwork((320, 640), **settings).to_a1111(step=0, name="x")
    for size in (320, 640):
        for state in data[size]:
            _a1_sequential(size, *by_hand).load_state_dict(_strip(state), strict=True)


def _strip(state):
    # Our keys are "linear.<idx>.*" (the module's Sequential attribute); the bare Sequential has "<idx>.*".
    assert all(key.startswith("linear.") for key in state)
    return {key[len("linear."):]: value for key, value in state.items()}


def test_file_is_plain_data_loadable_with_weights_only(tmp_path):
    path = save_hypernetwork(tmp_path / "hn.pt", Hypernetwork((32,)), step=3, name="hn")
    data = torch.load(path, weights_only=True)
    assert type(data[32]) is tuple and all(type(sd) is dict for sd in data[32])
    tensors = [t for sd in data[32] for t in sd.values()]
    assert all(t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu" for t in tensors)
    assert data["layer_structure"] == [1, 2, 1] and all(type(n) is int for n in data["layer_structure"])
    assert (data["step"], data["name"], data["use_dropout"], data["last_layer_dropout"]) == (3, "hn", False, False)
    half = Hypernetwork((32,)).to_a1111(step=0, name="h", dtype=torch.float16)
    assert all(t.dtype == torch.float16 for sd in half[32] for t in sd.values())


def test_round_trip_keeps_weights_settings_and_unet_output(tmp_path, unet):
    settings = dict(FANCY, weight_init="KaimingNormal", activate_output=True)
    original = _randomised(Hypernetwork((32, 64), **settings))
    path = save_hypernetwork(tmp_path / "hn.pt", original, step=7, name="mine", sd_checkpoint="0123456789",
                             sd_checkpoint_name="tiny", optional_info="hello")
    reloaded, info = Hypernetwork.from_a1111(torch.load(path, weights_only=True))
    reloaded.eval()
    assert info == {"step": 7, "name": "mine", "sd_checkpoint": "0123456789", "sd_checkpoint_name": "tiny",
                    "optional_info": "hello"}
    for attr in ("sizes", "layer_structure", "activation_func", "weight_init", "add_layer_norm", "activate_output",
                 "dropout_structure"):
        assert getattr(reloaded, attr) == getattr(original, attr), attr
    ours, theirs = original.state_dict(), reloaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    with torch.no_grad():
        original.apply_to(unet)
        expected = _run(unet)
        original.remove()
        reloaded.apply_to(unet)
        assert torch.equal(_run(unet), expected)
    assert load_hypernetwork(path)[1]["name"] == "mine"


def _zero_last_linear(network):
    with torch.no_grad():
        for modules in network.layers.values():
            for module in modules:
                last = [layer for layer in module.linear if isinstance(layer, nn.Linear)][-1]
                last.weight.zero_()
                last.bias.zero_()
    return network


@torch.no_grad()
def test_zero_network_or_multiplier_leaves_the_unet_output_exactly_unchanged(unet):
    plain = _run(unet)
    # No LayerNorm: one after the last Linear would turn its zeros into its bias.
    network = _randomised(Hypernetwork((32, 64), **dict(FANCY, add_layer_norm=False)))
    assert network.apply_to(unet) > 0
    assert not torch.equal(_run(unet), plain)
    network.multiplier = 0.0
    assert all(m.multiplier == 0.0 for pair in network.layers.values() for m in pair)
    assert torch.equal(_run(unet), plain)
    network.multiplier = 1.0
    _zero_last_linear(network)
    assert torch.equal(_run(unet), plain)
    network.remove()

    other = _randomised(Hypernetwork((32, 64)), seed=1)
    other.apply_to(unet)
    assert not torch.equal(_run(unet), plain)
    other.remove()
    assert torch.equal(_run(unet), plain)


def test_only_enabled_widths_are_hooked(unet):
    widths = [m.to_k.in_features for m in unet.modules() if isinstance(m, Attention)]
    assert set(widths) == {32, 64}
    for sizes in ((32,), (32, 64), (768,)):
        network = Hypernetwork(sizes)
        assert network.apply_to(unet) == sum(w in sizes for w in widths)
        with pytest.raises(RuntimeError):
            network.apply_to(unet)
        network.remove()
    assert all(not m._forward_pre_hooks for m in unet.modules())


@pytest.mark.parametrize("mode", ["plain", "checkpointing", "autocast"])
def test_gradients_reach_the_hypernetwork_only(unet, mode):
    if mode == "checkpointing":
        unet.enable_gradient_checkpointing()
        unet.train()
    network = Hypernetwork((32, 64), **FANCY)
    network.apply_to(unet)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
        out = _run(unet)
    assert out.isfinite().all()
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in network.parameters())
    assert not any(p.requires_grad for p in unet.parameters())
    network.remove()


def test_hook_computes_in_the_network_dtype_and_returns_the_input_dtype():
    attention = nn.Module()
    attention.to_k, attention.to_v = nn.Linear(32, 8).to(torch.bfloat16), nn.Linear(32, 8).to(torch.bfloat16)
    network = _randomised(Hypernetwork((32,)))
    assert network.apply_to(attention) == 1
    x = torch.randn(2, 5, 32).to(torch.bfloat16)
    hk, hv = network.pair(32)
    with torch.no_grad():
        k, v = attention.to_k(x), attention.to_v(x)
        network.remove()
        assert torch.equal(k, attention.to_k(hk(x.float()).to(torch.bfloat16)))
        assert torch.equal(v, attention.to_v(hv(x.float()).to(torch.bfloat16)))


def test_initialisation_follows_a1():
    torch.manual_seed(0)
    module = Hypernetwork((320,), **FANCY).pair(320)[0]
    norms = [layer for layer in module.linear if isinstance(layer, nn.LayerNorm)]
    # A1 draws LayerNorm weights from N(0, 0.01) like the Linear ones, instead of ones.
    assert all(0.005 < n.weight.std() < 0.02 and not n.bias.any() for n in norms)
    linears = [layer for layer in module.linear if isinstance(layer, nn.Linear)]
    assert all(0.008 < lin.weight.std() < 0.012 and not lin.bias.any() for lin in linears)
    kaiming = Hypernetwork((320,), weight_init="KaimingNormal").pair(320)[0].linear[0]
    assert 0.06 < kaiming.weight.std() < 0.1  # sqrt(2 / 320) = 0.079


def test_activation_table_is_a1s():
    assert ACTIVATIONS["swish"] is nn.Hardswish and ACTIVATIONS["gelu"] is nn.GELU and ACTIVATIONS["mish"] is nn.Mish
    assert isinstance(Hypernetwork((32,), activation_func="silu").pair(32)[0].linear[1], nn.SiLU)
    with pytest.raises(UserError, match="--hypernetwork_activation_func"):
        Hypernetwork((32,), activation_func="wobble")
    with pytest.raises(UserError, match="--hypernetwork_weight_init"):
        Hypernetwork((32,), weight_init="Zeros")


def test_nai_era_file_loads_with_a1s_defaults():
    torch.manual_seed(0)
    old = {f"linear{i}.{p}": torch.randn(*shape) for i, p, shape in
           [(1, "weight", (64, 32)), (1, "bias", (64,)), (2, "weight", (32, 64)), (2, "bias", (32,))]}
    network, info = Hypernetwork.from_a1111({32: (old, dict(old)), "step": 5})
    assert network.activate_output is True and network.activation_func is None
    assert network.layer_structure == (1, 2, 1) and network.dropout_structure == (0, 0, 0)
    assert torch.equal(network.pair(32)[1].linear[1].weight, old["linear2.weight"])
    assert info == {"step": 5, "name": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                    "optional_info": None}


def test_use_dropout_flags_derive_the_dropout_structure():
    source = Hypernetwork((32,), layer_structure=(1, 2, 2, 1), dropout_structure=(0, 0.3, 0, 0))
    data = source.to_a1111(step=0, name="x")
    del data["dropout_structure"]
    data.update(use_dropout=True, last_layer_dropout=False)
    assert Hypernetwork.from_a1111(data)[0].dropout_structure == (0, 0.3, 0, 0)
    data["use_dropout"] = False
    with pytest.raises(UserError, match="does not match its layer_structure"):
        Hypernetwork.from_a1111(data)  # no dropout → no linear.3; linear.4 becomes linear.2
    source = Hypernetwork((32,), layer_structure=(1, 2, 2, 1), dropout_structure=(0, 0.3, 0.3, 0))
    data = source.to_a1111(step=0, name="x")
    del data["dropout_structure"]
    assert Hypernetwork.from_a1111(data)[0].dropout_structure == (0, 0.3, 0.3, 0)


@pytest.mark.parametrize("value", ["", "2,2,1", "1,2", "1,2,x", "1,-2,1", "1", "1,nan,1", "1, 0, 1"])
def test_bad_layer_structures(value):
    with pytest.raises(UserError, match="--hypernetwork_layer_structure") as err:
        parse_layer_structure(value)
    assert "\n" not in str(err.value)


def test_good_structures_parse():
    assert parse_layer_structure("1, 1.5, 1") == (1, 1.5, 1)
    assert parse_layer_structure([1.0, 2.0, 1.0]) == (1, 2, 1)
    assert parse_dropout_structure(None, (1, 2, 1)) == (0, 0, 0)
    assert parse_dropout_structure("0, 0.1, 0", (1, 2, 1)) == (0, 0.1, 0)
    assert parse_sizes("320, 640,768") == (320, 640, 768)


@pytest.mark.parametrize("value", ["0,0.1", "0.1,0.1,0", "0,0.1,0.2", "0,1,0", "0,-0.1,0", "0,a,0"])
def test_bad_dropout_structures(value):
    with pytest.raises(UserError, match="--hypernetwork_dropout_structure"):
        parse_dropout_structure(value, (1, 2, 1))


@pytest.mark.parametrize("value", ["", "320,abc", "320.5", "0", "-320", "320;640"])
def test_bad_sizes(value):
    with pytest.raises(UserError, match="--hypernetwork_sizes"):
        parse_sizes(value)


def _one_line_error(path, match):
    with pytest.raises(UserError, match=match) as err:
        load_hypernetwork(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_load_errors(tmp_path):
    _one_line_error(tmp_path / "missing.pt", "no such")
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(tmp_path / "lora.safetensors"))
    _one_line_error(tmp_path / "lora.safetensors", "not an AUTOMATIC1111 hypernetwork")
    torch.save({"foo": torch.zeros(2)}, tmp_path / "foo.pt")
    _one_line_error(tmp_path / "foo.pt", "not an AUTOMATIC1111 hypernetwork")
    (tmp_path / "junk.pt").write_bytes(b"not a pickle at all")
    _one_line_error(tmp_path / "junk.pt", "not a loadable")
    data = Hypernetwork((32,)).to_a1111(step=0, name="x")
    data["layer_structure"] = [1, 3, 1]
    torch.save(data, tmp_path / "edited.pt")
    _one_line_error(tmp_path / "edited.pt", "does not match its layer_structure")
