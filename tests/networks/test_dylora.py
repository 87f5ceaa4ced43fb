"""DyLoRA (`networks.dylora`, sd-scripts' format: a plain LoRA file): blocks of `unit` ranks learn one at a time,
the forward's rank scaling, the LoRA file layout both ways, training, and the one-line refusals."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

import train_network
from library.data.demo import make_demo_dataset
from library.errors import UserError
from networks import dylora, lora
from networks.dylora import DyLoRAModule
from networks.files import describe_network_file, read_network_file
from networks.lora import LoRAModule

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _randomised(module, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return module


@pytest.mark.parametrize("layer", [nn.Linear(24, 40), nn.Conv2d(24, 40, 1), nn.Conv2d(24, 40, 3, padding=1)],
                         ids=["linear", "conv1x1", "conv3x3"])
def test_state_dict_is_loras_and_the_adapter_is_that_lora(layer):
    torch.manual_seed(0)
    ours = _randomised(DyLoRAModule("lora_unet_x", layer, dim=6, alpha=3, unit=2))
    plain = LoRAModule("lora_unet_x", layer, dim=6, alpha=3)
    state = ours.state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in plain.state_dict().items()}
    plain.load_state_dict(state)
    torch.testing.assert_close(ours.delta_weight(), plain.delta_weight(), atol=1e-7, rtol=0)
    again = DyLoRAModule("lora_unet_x", layer, dim=6, alpha=3, unit=2)
    again.load_state_dict(plain.state_dict())  # a LoRA file loads into DyLoRA (resuming), block by block
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), ours.parameters()))
    x = torch.randn(2, 5, 24) if isinstance(layer, nn.Linear) else torch.randn(2, 24, 6, 6)
    ours.eval(), plain.eval()  # outside training: all ranks, no rank scaling, as any LoRA loader runs the file
    torch.testing.assert_close(ours.adapter_forward(x), plain.adapter_forward(x), atol=1e-6, rtol=1e-5)


def test_only_the_chosen_block_learns_and_the_output_is_scaled_for_it():
    layer = nn.Linear(24, 40)
    torch.manual_seed(0)
    module = _randomised(DyLoRAModule("lora_unet_x", layer, dim=6, alpha=3, unit=2))
    module.apply_to()
    module.train()
    x = torch.randn(2, 5, 24)
    module.choose_block(1)  # ranks 2..3 learn
    out = module.adapter_forward(x)
    module.eval()
    full = module.adapter_forward(x).detach()
    module.train()
    torch.testing.assert_close(out.detach(), full * math.sqrt(6 / 4), atol=1e-6, rtol=1e-5)  # sd-scripts: √(dim/(b+unit))
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.1, weight_decay=0.1)
    before = [p.detach().clone() for p in module.parameters()]
    layer(x).square().mean().backward()
    grads = [p.grad for p in module.parameters()]
    assert [g is not None for g in grads] == [False, True, False, False, True, False]  # A.0-2, B.0-2
    optimizer.step()
    changed = [not torch.equal(b, p) for b, p in zip(before, module.parameters())]
    assert changed == [False, True, False, False, True, False]  # no weight decay or momentum on the others


def test_the_network_draws_a_block_per_module_every_step(tiny_parts):
    parts = copy.deepcopy(tiny_parts["tiny-sd1"])
    network = dylora.create_network(1.0, 8, 4, None, parts.text_encoder, parts.unet, unit="2")
    seen = set()
    for _ in range(12):
        network.on_step_start(parts.text_encoder, parts.unet)
        blocks = [m.trained_block for m in network.unet_loras]
        assert all(0 <= b < 4 for b in blocks)
        for m in network.unet_loras[:3]:
            assert [p.requires_grad for p in m.lora_A] == [i == m.trained_block for i in range(4)]
        seen.update(blocks)
    assert seen == {0, 1, 2, 3}
    groups, names = network.prepare_optimizer_params(1e-4, 1e-4, 1e-4, loraplus_lr_ratio=None)
    assert sum(len(g["params"]) for g in groups) == len(list(network.parameters()))


def test_loraplus_puts_every_up_block_in_the_plus_group(tiny_parts):
    parts = copy.deepcopy(tiny_parts["tiny-sd1"])
    network = dylora.create_network(1.0, 4, 4, None, parts.text_encoder, None, unit="2", loraplus_lr_ratio="4")
    groups, names = network.prepare_optimizer_params(1e-4, 1e-4, 1e-4)
    plus = dict(zip(names, groups))["textencoder plus"]
    ups = {id(p) for m in network.text_encoder_loras for p in m.lora_B}
    assert {id(p) for p in plus["params"]} == ups and plus["lr"] == pytest.approx(4e-4)


def test_max_norm_caps_the_joined_delta(tiny_parts):
    parts = copy.deepcopy(tiny_parts["tiny-sd1"])
    network = _randomised(dylora.create_network(1.0, 4, 4, None, parts.text_encoder, None, unit="1"))
    network.scale_weight_norms(0.05)
    norms = [float(m.delta_weight().detach().norm()) for m in network.text_encoder_loras]
    assert max(norms) == pytest.approx(0.05, rel=1e-4)


def test_option_mistakes_are_one_line_errors(tiny_parts):
    parts = tiny_parts["tiny-sd1"]
    with pytest.raises(UserError, match="rank 6, not a multiple of unit=4"):
        dylora.create_network(1.0, 6, 1, None, parts.text_encoder, parts.unet, unit="4")
    with pytest.raises(UserError, match="conv_dim=2: DyLoRA adapts 3×3 convolutions at network_dim"):
        dylora.create_network(1.0, 4, 1, None, parts.text_encoder, parts.unet, conv_dim="2")
    with pytest.raises(UserError, match="networks.dylora has no option 'block_dims'"):
        dylora.create_network(1.0, 4, 1, None, parts.text_encoder, parts.unet, block_dims="4")


@pytest.fixture(scope="module")
def trained_dylora(tmp_path_factory):
    root = tmp_path_factory.mktemp("dylora")
    make_demo_dataset(root / "data", count=2, size=32)
    common = ["--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", str(root / "data"),
              "--caption_extension", ".txt", "--resolution", "32", "--output_dir", str(root / "out"),
              "--train_batch_size", "2", "--learning_rate", "1e-2", "--network_module", "networks.dylora",
              "--network_dim", "4", "--network_alpha", "2", "--seed", "1", "--max_data_loader_n_workers", "0"]
    train_network.main(common + ["--output_name", "dy", "--max_train_steps", "8", "--network_args", "unit=2"])
    return root, common


def test_training_writes_a_lora_file_every_block_of_which_learned(trained_dylora, tiny_parts):
    root, _ = trained_dylora
    file = root / "out" / "dy.safetensors"
    weights, metadata = read_network_file(file)
    info = describe_network_file(weights, source=str(file))
    assert info.algorithm == "lora" and set(info.dims.values()) == {4}
    assert metadata["ss_network_module"] == "networks.dylora" and json.loads(metadata["ss_network_args"])["unit"] == "2"
    ups = [v for k, v in weights.items() if k.endswith(".lora_up.weight")]
    # up starts at zero; over 8 steps, with one of two blocks drawn per module and step, both blocks learned
    first = sum(bool(u[:, :2].abs().max() > 0) for u in ups)
    second = sum(bool(u[:, 2:].abs().max() > 0) for u in ups)
    assert first > len(ups) // 2 and second > len(ups) // 2
    parts = copy.deepcopy(tiny_parts["tiny-sd1"])
    as_lora = lora.create_network_from_weights(1.0, file, None, parts.text_encoder, parts.unet)
    as_lora.load_weights(file)  # a plain LoRA loader takes it as it is


def test_resuming_from_the_file_keeps_training_dylora(trained_dylora):
    root, common = trained_dylora
    train_network.main(common + ["--output_name", "dy2", "--max_train_steps", "1", "--network_args", "unit=2",
                                 "--network_weights", str(root / "out" / "dy.safetensors"), "--dim_from_weights"])
    weights, metadata = read_network_file(root / "out" / "dy2.safetensors")
    assert metadata["ss_network_module"] == "networks.dylora"
    before, _ = read_network_file(root / "out" / "dy.safetensors")
    assert weights.keys() == before.keys() and any(not torch.equal(weights[k], before[k]) for k in weights)


def test_extract_lora_from_dylora_cuts_the_first_ranks_as_sd_scripts(trained_dylora, tmp_path, capsys):
    """sd-scripts' command line: --model --save_to --unit; outputs <stem>-<rank:04d> below the largest rank, the
    first ranks of each module, alphas kept."""
    from tools import extract_lora_from_dylora

    root, _ = trained_dylora
    source = root / "out" / "dy.safetensors"
    written = extract_lora_from_dylora.main(["--model", str(source), "--save_to", str(tmp_path / "cut.safetensors"),
                                             "--unit", "2"])
    assert [p.name for p in written] == ["cut-0002.safetensors"]
    full, _ = read_network_file(source)
    cut, metadata = read_network_file(written[0])
    assert cut.keys() == full.keys() and metadata["ss_network_dim"] == "2"
    assert metadata["ss_training_comment"].startswith("split from DyLoRA, rank 4 to 2;")
    for key, value in cut.items():
        if key.endswith(".lora_down.weight"):
            assert torch.equal(value, full[key][:2])
        elif key.endswith(".lora_up.weight"):
            assert torch.equal(value, full[key][:, :2])
        else:
            assert torch.equal(value, full[key])
    with pytest.raises(SystemExit) as exit_info:
        extract_lora_from_dylora.main(["--model", str(source), "--save_to", str(tmp_path / "x.safetensors"),
                                       "--unit", "3"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "not a multiple of --unit 3" in err
