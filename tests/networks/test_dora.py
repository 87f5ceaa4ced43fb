"""DoRA (LyCORIS' dora_wd=True) on LoRA, LoHa and LoKr: the maths against lycoris-lora 4.1.3's own modules and
against the formula loaders apply, the file layout, training through train_network, merging and the tools that
cannot handle it without the model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from lycoris.modules.locon import LoConModule as LycorisLoCon
from lycoris.modules.loha import LohaModule as LycorisLoha
from safetensors.torch import load_file
from torch import nn

import train_network
from library.data.demo import make_demo_dataset
from library.errors import UserError
from networks import lora
from networks.files import describe_network_file, read_network_file
from networks.loha import LoHaModule
from networks.lokr import LoKrModule
from networks.lora import LoRAModule
from networks.network import network_from_weights
from tools import merge_lora, resize_lora, svd_merge_lora

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAYERS = {"linear": lambda: nn.Linear(24, 40), "conv3x3": lambda: nn.Conv2d(24, 40, 3, padding=1)}


def _input(kind):
    return torch.randn(2, 5, 24) if kind == "linear" else torch.randn(2, 24, 6, 6)


def _layer_op(layer, x, weight):
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, weight, layer.bias, layer.stride, layer.padding)
    return F.linear(x, weight, layer.bias)


def _decomposed(cls, kind, *, seed=0, on_output=False, **kwargs):
    torch.manual_seed(seed)
    layer = LAYERS[kind]()
    module = cls("lora_unet_test", layer, multiplier=1.0, dim=4, alpha=2, dora_wd=True, wd_on_output=on_output,
                 **kwargs)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name != "dora_scale":
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
        module.dora_scale.mul_(1 + 0.2 * torch.rand(module.dora_scale.shape, generator=generator))
    return layer, module


def reference_weight(weight, delta, magnitude, multiplier, *, on_output=False):
    """What A1111's and ComfyUI's DoRA code computes, written out here: V = W + ΔW, each input column of V scaled to
    the stored magnitude (each output row with wd_on_output), strength m as W + m·(that − W)."""
    combined = weight + delta
    if on_output:
        norm = combined.flatten(1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))
    else:
        norm = combined.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (weight.dim() - 2))
    decomposed = combined * magnitude / (norm + torch.finfo(weight.dtype).eps)
    return weight + multiplier * (decomposed - weight)


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("on_output", [False, True], ids=["per-input", "per-output"])
def test_magnitude_starts_as_the_weight_norm_in_the_layout_loaders_read(kind, on_output):
    torch.manual_seed(0)
    layer = LAYERS[kind]()
    module = LoRAModule("lora_unet_test", layer, dim=4, alpha=2, dora_wd=True, wd_on_output=on_output)
    weight = layer.weight.detach()
    if on_output:  # LyCORIS' default: (out, 1, …)
        expected = torch.stack([weight[o].norm() for o in range(weight.shape[0])]).reshape(40, *[1] * (weight.dim() - 1))
    else:  # A1111's and ComfyUI's layout: (1, in, …)
        expected = torch.stack([weight[:, i].norm() for i in range(weight.shape[1])]).reshape(1, 24, *[1] * (weight.dim() - 2))
    assert module.dora_scale.dtype == torch.float32
    torch.testing.assert_close(module.dora_scale.detach(), expected)
    assert "dora_scale" in module.state_dict()


@pytest.mark.parametrize("cls", [LoRAModule, LoHaModule, LoKrModule])
@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("multiplier", [1.0, 0.6])
def test_runtime_and_merged_weight_equal_the_loaders_formula(cls, kind, multiplier):
    layer, module = _decomposed(cls, kind)
    module.multiplier = multiplier
    weight = layer.weight.detach().clone()
    expected = reference_weight(weight, module.delta_weight().detach(), module.dora_scale.detach(), multiplier)
    torch.testing.assert_close(module.merged_weight(weight).detach(), expected, atol=1e-6, rtol=1e-6)
    module.apply_to()
    x = _input(kind)
    torch.testing.assert_close(layer(x), _layer_op(layer, x, expected), atol=1e-5, rtol=1e-5)
    # DoRA is not W + ΔW: the rescaling matters in this test's numbers.
    assert not torch.allclose(expected, weight + module.delta_weight().detach() * multiplier, atol=1e-3)


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("on_output", [False, True], ids=["per-input", "per-output"])
def test_lora_dora_equals_lycoris_locon_forward_and_merge(kind, on_output):
    layer, ours = _decomposed(LoRAModule, kind, on_output=on_output)
    theirs = _theirs(LycorisLoCon, layer, ours, on_output)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
           {k: tuple(v.shape) for k, v in theirs.custom_state_dict().items()}
    weight = layer.weight.detach()
    their_weight, _ = theirs.get_merged_weight(multiplier=1)
    torch.testing.assert_close(ours.merged_weight(weight).detach(), their_weight.detach(), atol=1e-6, rtol=1e-6)
    _assert_same_forward(layer, ours, theirs, _input(kind))


def _theirs(lycoris_class, layer, ours, on_output):
    """lycoris-lora's own module of that kind over the same layer, holding our module's tensors."""
    theirs = lycoris_class("lora_unet_test", layer, 1.0, 4, 2, weight_decompose=True, wd_on_out=on_output)
    theirs.load_state_dict({k: v.detach().clone() for k, v in ours.state_dict().items()}, strict=False)
    return theirs


def _assert_same_forward(layer, ours, theirs, x):
    theirs.apply_to()
    expected = layer(x)
    theirs.restore()
    ours.apply_to()
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_loha_dora_equals_lycoris_loha_forward():
    """(Through its forward: 4.1.3's LoHa get_merged_weight applies alpha/dim twice.)"""
    layer, ours = _decomposed(LoHaModule, "linear")
    _assert_same_forward(layer, ours, _theirs(LycorisLoha, layer, ours, False), _input("linear"))


def test_the_magnitude_and_the_factors_learn():
    layer, module = _decomposed(LoRAModule, "linear")
    module.apply_to()
    module.train()
    layer(_input("linear")).square().mean().backward()
    grads = {name: p.grad for name, p in module.named_parameters()}
    assert set(grads) == {"dora_scale", "lora_down.weight", "lora_up.weight"}
    assert all(g is not None and g.abs().max() > 0 for g in grads.values())
    assert [p for p in module.parameter_factors()] == [module.lora_down.weight, module.lora_up.weight]


def test_unmerge_restores_the_weight_exactly():
    layer, module = _decomposed(LoRAModule, "conv3x3")
    before = layer.weight.detach().clone()
    module.merge_to(0.7)
    assert not torch.equal(layer.weight.detach(), before)
    module.unmerge()
    assert torch.equal(layer.weight.detach(), before)


def test_network_args_reach_every_module_and_the_file_reads_back(tiny_parts, tmp_path):
    parts = copy.deepcopy(tiny_parts["tiny-sd1"])
    network = lora.create_network(1.0, 4, 2, None, parts.text_encoder, parts.unet, conv_dim="2", dora_wd="true")
    modules = network.text_encoder_loras + network.unet_loras
    assert modules and all(m.dora_scale is not None and not m.wd_on_output for m in modules)
    file = tmp_path / "dora.safetensors"
    network.save_weights(file)
    weights = load_file(str(file))
    assert sum(k.endswith(".dora_scale") for k in weights) == len(modules)
    info = describe_network_file(weights, source=str(file))
    assert info.module_args == {"dora_wd": True} and info.label == "LoCon (DoRA)"
    assert "DoRA" in info.needs_base_weights
    again = network_from_weights(1.0, file, parts.text_encoder, parts.unet)
    again.load_weights(file)
    for a, b in zip(modules, again.text_encoder_loras + again.unet_loras):
        assert torch.equal(a.dora_scale, b.dora_scale) and b.dora_scale is not None
    on_output = lora.create_network(1.0, 4, 2, None, parts.text_encoder, None, dora_wd="1", wd_on_output="1")
    on_output.save_weights(tmp_path / "out.safetensors")
    info = describe_network_file(load_file(str(tmp_path / "out.safetensors")), source="x")
    assert info.module_args == {"dora_wd": True, "wd_on_output": True}
    with pytest.raises(UserError, match="dora_wd=maybe: expected"):
        lora.create_network(1.0, 4, 2, None, parts.text_encoder, None, dora_wd="maybe")


@pytest.fixture(scope="module")
def trained_dora(tmp_path_factory):
    root = tmp_path_factory.mktemp("dora")
    make_demo_dataset(root / "data", count=2, size=32)
    train_network.main(["--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", str(root / "data"),
                        "--caption_extension", ".txt", "--resolution", "32", "--output_dir", str(root / "out"),
                        "--output_name", "dora", "--train_batch_size", "2", "--max_train_steps", "3",
                        "--learning_rate", "1e-2", "--network_dim", "4", "--network_alpha", "2", "--seed", "1",
                        "--max_data_loader_n_workers", "0", "--network_args", "dora_wd=True"])
    return root / "out" / "dora.safetensors"


def test_training_writes_a_dora_file_whose_magnitudes_moved(trained_dora, tiny_parts):
    weights, metadata = read_network_file(trained_dora)
    scales = {k: v for k, v in weights.items() if k.endswith(".dora_scale")}
    assert scales and len(scales) == sum(k.endswith(".lora_down.weight") for k in weights)
    assert "dora_wd" in metadata["ss_network_args"]
    fresh = lora.create_network(1.0, 4, 2, None, tiny_parts["tiny-sd1"].text_encoder, tiny_parts["tiny-sd1"].unet,
                                dora_wd="true").state_dict()
    moved = [k for k, v in scales.items() if not torch.allclose(v, fresh[k])]
    assert moved  # the magnitude trained (it starts as the base weight's norm)


def test_merging_into_a_model_applies_the_decomposition(trained_dora, tiny_files, tmp_path):
    """merge_lora --sd_model writes the weights the runtime network computes (not W + ΔW)."""
    from library.models.loading import load_components

    out = tmp_path / "merged.safetensors"
    model = tiny_files["tiny-sd1"]["safetensors"]
    merge_lora.main(["--sd_model", str(model), "--models", str(trained_dora), "--ratios", "0.8", "--save_to", str(out)])
    base = load_components(str(model))
    merged = load_components(str(out))
    network = network_from_weights(0.8, trained_dora, base.text_encoder, base.unet)
    network.load_weights(trained_dora)
    checked = 0
    for module in network.text_encoder_loras + network.unet_loras:
        if module.lora_name.endswith("attn1_to_q"):
            name = module.lora_name.removeprefix("lora_unet_")
            path = next(p for p, _ in merged.unet.named_parameters() if p.replace(".", "_") == f"{name}_weight")
            expected = reference_weight(module.org_module.weight.detach(), module.delta_weight().detach(),
                                        module.dora_scale.detach(), 0.8)
            torch.testing.assert_close(dict(merged.unet.named_parameters())[path].detach(), expected,
                                       atol=1e-6, rtol=1e-5)
            checked += 1
    assert checked


@pytest.mark.parametrize("tool, argv", [
    (merge_lora, ["--models", "{f}", "{f}", "--save_to", "{o}"]),
    (svd_merge_lora, ["--models", "{f}", "--save_to", "{o}", "--new_rank", "2"]),
    (resize_lora, ["--model", "{f}", "--save_to", "{o}", "--new_rank", "2"]),
], ids=["merge_lora", "svd_merge_lora", "resize_lora"])
def test_tools_working_on_delta_alone_refuse_dora(tool, argv, trained_dora, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    with pytest.raises(SystemExit) as exit_info:
        tool.main([a.format(f=trained_dora, o=out) for a in argv])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err, err
    assert "a DoRA network (dora_scale) rescales the base weights, so its change depends on the model" in err, err
    assert not out.exists()
