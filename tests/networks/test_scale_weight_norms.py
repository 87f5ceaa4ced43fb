"""--scale_weight_norms: sd-scripts' max-norm regularisation after each optimizer step, for every adapter, logged under
sd-scripts' names, without reading the device inside the step."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import train_network
from library.data.demo import make_demo_dataset
from library.errors import UserError
from networks import lora
from networks.files import read_network_file
from networks.network import AdapterNetwork, network_from_weights
from networks.registry import ALGORITHMS, module_class

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _sd_scripts_max_norm(modules: list[dict], max_norm: float):
    """sd-scripts' LoRANetwork.apply_max_norm_regularization, re-stated on {"up", "down", "alpha"} dicts."""
    keys_scaled, norms = 0, []
    for m in modules:
        up, down = m["up"], m["down"]
        if up.shape[2:] == (1, 1) and down.shape[2:] == (1, 1):
            updown = (up.squeeze(2).squeeze(2) @ down.squeeze(2).squeeze(2)).unsqueeze(2).unsqueeze(3)
        elif up.shape[2:] == (3, 3) or down.shape[2:] == (3, 3):
            updown = F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
        else:
            updown = up @ down
        updown = updown * (m["alpha"] / down.shape[0])
        norm = updown.norm().clamp(min=max_norm / 2)
        desired = torch.clamp(norm, max=max_norm)
        ratio = desired / norm
        if ratio != 1:
            keys_scaled += 1
            m["up"], m["down"] = up * ratio ** 0.5, down * ratio ** 0.5
        norms.append(float(updown.norm() * ratio))
    return keys_scaled, sum(norms) / len(norms), max(norms)


def _lora_network(layers: dict[str, nn.Module], dim=2, alpha=1.0) -> AdapterNetwork:
    modules = [lora.LoRAModule(f"lora_unet_{name}", layer, 1.0, dim, alpha) for name, layer in layers.items()]
    return AdapterNetwork(lora.LoRAModule, [], modules, multiplier=1.0)


def test_a_hand_computed_case():
    torch.manual_seed(0)
    network = _lora_network({"big": nn.Linear(2, 2, bias=False), "small": nn.Linear(2, 2, bias=False)}, dim=1,
                            alpha=1.0)
    big, small = network.unet_loras
    with torch.no_grad():
        big.lora_up.weight.copy_(torch.tensor([[3.0], [0.0]]))
        big.lora_down.weight.copy_(torch.tensor([[0.0, 4.0]]))  # ΔW = [[0, 12], [0, 0]]: norm 12
        small.lora_up.weight.copy_(torch.tensor([[1.0], [0.0]]))
        small.lora_down.weight.copy_(torch.tensor([[0.0, 1.0]]))  # norm 1: under max_norm / 2, never touched
    keys_scaled, mean_norm, max_norm = network.scale_weight_norms(3.0).tolist()
    # ratio 3/12 = 1/4: up and down each scaled by its square root, 1/2.
    assert torch.equal(big.lora_up.weight, torch.tensor([[1.5], [0.0]]))
    assert torch.equal(big.lora_down.weight, torch.tensor([[0.0, 2.0]]))
    assert torch.equal(small.lora_up.weight, torch.tensor([[1.0], [0.0]]))
    assert (keys_scaled, mean_norm, max_norm) == (1, 2.0, 3.0)
    assert network.apply_max_norm_regularization(3.0, "cpu") == (0, 2.0, 3.0)  # sd-scripts' API: numbers


def test_linear_and_convolutions_equal_sd_scripts_formula():
    torch.manual_seed(1)
    layers = {"linear": nn.Linear(6, 5), "conv1x1": nn.Conv2d(6, 5, 1), "conv3x3": nn.Conv2d(4, 5, 3, padding=1),
              "tiny": nn.Linear(6, 5)}
    network = _lora_network(layers, dim=3, alpha=2.0)
    with torch.no_grad():
        for module in network.unet_loras:
            scale = 0.01 if module.lora_name.endswith("tiny") else 1.0
            for param in module.parameters():
                param.copy_(torch.randn(param.shape) * scale)
    reference = [{"up": m.lora_up.weight.detach().clone(), "down": m.lora_down.weight.detach().clone(),
                  "alpha": 2.0} for m in network.unet_loras]
    expected = _sd_scripts_max_norm(reference, 0.8)
    stats = network.scale_weight_norms(0.8).tolist()
    assert stats[0] == expected[0] == 3
    assert stats[1:] == pytest.approx(expected[1:], rel=1e-5)
    for module, ref in zip(network.unet_loras, reference):
        torch.testing.assert_close(module.lora_up.weight, ref["up"], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(module.lora_down.weight, ref["down"], rtol=1e-6, atol=1e-7)
        assert float(module.delta_weight().detach().norm()) <= 0.8 * (1 + 1e-5)


# Every registered algorithm with 3×3 convolutions, and the options that change an algorithm's factors.
MAX_NORM_CASES = {
    **{name: (name, {"conv_dim": "2", "conv_alpha": "1"}) for name in ALGORITHMS
       if module_class(name).MAX_NORM and name != "dylora"},
    "dylora": ("dylora", {"conv_dim": "4", "unit": "2"}),  # its conv_dim must equal network_dim
    "lora-dora": ("lora", {"conv_dim": "2", "dora_wd": "true"}),  # the magnitude is not a factor: left alone
    "loha-tucker": ("loha", {"conv_dim": "2", "use_tucker": "true"}),
    "lokr-factor4": ("lokr", {"factor": "4"}),
    "lokr-both-tucker": ("lokr", {"conv_dim": "2", "decompose_both": "true", "use_tucker": "true"}),
}


@pytest.mark.parametrize("case", MAX_NORM_CASES)
def test_every_adapter_ends_at_most_max_norm_and_small_ones_are_untouched(tiny_parts, case):
    algorithm, args = MAX_NORM_CASES[case]
    parts = copy.deepcopy(tiny_parts["tiny-sd1"])
    create_network = importlib.import_module(module_class(algorithm).MODULE).create_network
    network = create_network(1.0, 4, 2, None, parts.text_encoder, parts.unet, **args)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in network.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    loras = network.text_encoder_loras + network.unet_loras
    deltas = [m.delta_weight().detach() for m in loras]
    before = torch.stack([d.norm() for d in deltas])
    max_norm = float(before.median())
    untouched = [{k: v.clone() for k, v in m.state_dict().items()} for m in loras]
    keys_scaled, _, largest = network.scale_weight_norms(max_norm).tolist()
    after = torch.stack([m.delta_weight().detach().norm() for m in loras])
    assert keys_scaled == int((before > max_norm).sum()) > 0
    assert float(after.max()) <= max_norm * (1 + 1e-4) and largest == pytest.approx(float(after.max()), rel=1e-4)
    for m, old, delta, norm in zip(loras, untouched, deltas, before):
        if norm <= max_norm:
            assert all(torch.equal(v, old[k]) for k, v in m.state_dict().items()), m.lora_name
        else:  # ΔW keeps its direction; its length becomes max_norm
            torch.testing.assert_close(m.delta_weight().detach(), delta * (max_norm / norm), rtol=1e-4, atol=1e-6)


def test_the_step_reads_nothing_back_from_the_device(monkeypatch):
    """On a GPU, float()/item()/tolist()/bool() of a device tensor waits for it; the step must do none of them (the
    logged numbers are read once, with the loss). On the CPU the same calls are caught by making them fail."""
    torch.manual_seed(2)
    network = _lora_network({"a": nn.Linear(8, 8), "b": nn.Conv2d(4, 4, 3, padding=1)}, dim=2, alpha=1.0)
    for module in network.unet_loras:
        module.apply_to()
    x, image = torch.randn(2, 8), torch.randn(1, 4, 6, 6)
    network.unet_loras[0].org_module(x)  # the first use reads alpha once
    network.unet_loras[1].org_module(image)

    def refuse(*_args, **_kwargs):
        raise AssertionError("a device tensor was read on the host")

    for name in ("__float__", "__bool__", "item", "tolist", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    network.unet_loras[0].org_module(x).sum().backward()
    network.unet_loras[1].org_module(image).sum().backward()
    stats = network.scale_weight_norms(0.1)
    monkeypatch.undo()
    assert stats.shape == (3,)


def test_refused_where_it_cannot_apply(tiny_parts):
    from library.methods.network_method import _max_norm

    class Config(dict):
        pass

    network = object()
    with pytest.raises(UserError, match="networks.other cannot apply max-norm regularisation"):
        _max_norm(Config(scale_weight_norms=1.0), network, "networks.other")
    assert _max_norm(Config(scale_weight_norms=0.0), network, "networks.other") is None  # sd-scripts: 0 is off


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two 2-step LoRA runs, without and with --scale_weight_norms."""
    root = tmp_path_factory.mktemp("max-norm")
    make_demo_dataset(root / "data", count=2, size=32)

    def run(name, *extra):
        return train_network.main([
            "--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", str(root / "data"),
            "--caption_extension", ".txt", "--resolution", "32", "--output_dir", str(root / name), "--output_name",
            "net", "--train_batch_size", "2", "--max_train_steps", "2", "--learning_rate", "1e-2", "--network_dim",
            "4", "--network_alpha", "4", "--seed", "1", "--max_data_loader_n_workers", "0", *extra])

    return root, run("plain"), run("max-norm", "--scale_weight_norms", "0.2")


def test_a_training_run_applies_it_after_each_step_and_logs_sd_scripts_scalars(runs, tiny_parts):
    root, plain, limited = runs
    a, b = load_file(str(root / "plain" / "net.safetensors")), load_file(str(root / "max-norm" / "net.safetensors"))
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    assert plain.losses[0] == limited.losses[0] and plain.losses[1] != limited.losses[1]  # step 2 starts scaled
    parts = copy.deepcopy(tiny_parts["tiny-sd1"])
    path = root / "max-norm" / "net.safetensors"
    network = network_from_weights(1.0, path, parts.text_encoder, parts.unet)
    network.load_weights(path)
    norms = [float(m.delta_weight().detach().norm()) for m in network.text_encoder_loras + network.unet_loras]
    assert max(norms) <= 0.2 * (1 + 1e-4)
    unlimited = [float(m.delta_weight().detach().norm()) for m in plain.method.network.text_encoder_loras
                 + plain.method.network.unet_loras]
    logs = limited.method.step_logs()
    assert set(logs) == {"max_norm/keys_scaled", "max_norm/max_key_norm", "norm/avg_key_norm"}
    assert 0 < logs["max_norm/keys_scaled"] <= len(norms) and logs["max_norm/max_key_norm"] <= 0.2 * (1 + 1e-4)
    assert logs["norm/avg_key_norm"] == pytest.approx(sum(norms) / len(norms), rel=1e-4)
    assert max(unlimited) > 0.2 and plain.method.step_logs() == {}
    _, metadata = read_network_file(path)
    assert metadata["ss_scale_weight_norms"] == "0.2"


def test_the_scalars_reach_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    make_demo_dataset(tmp_path / "data", count=2, size=32)
    train_network.main(["--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", str(tmp_path / "data"),
                        "--caption_extension", ".txt", "--resolution", "32", "--output_dir", str(tmp_path / "o"),
                        "--output_name", "net", "--train_batch_size", "2", "--max_train_steps", "1",
                        "--learning_rate", "1e-2", "--seed", "1", "--max_data_loader_n_workers", "0",
                        "--scale_weight_norms", "0.01", "--logging_dir", str(tmp_path / "logs")])
    scalars = {}
    for run in {p.parent for p in (tmp_path / "logs").rglob("events.out.tfevents.*")}:
        events = EventAccumulator(str(run))
        events.Reload()
        scalars |= {tag: events.Scalars(tag) for tag in events.Tags()["scalars"]}
    assert {"max_norm/keys_scaled", "max_norm/max_key_norm", "norm/avg_key_norm"} <= set(scalars)
    assert scalars["max_norm/keys_scaled"][0].value > 0  # after one step at 1e-2 every adapter is above 0.01
