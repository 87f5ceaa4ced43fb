"""OFT (`networks.oft`, sd-scripts' format): where the modules go and how they are named, the rotation against
sd-scripts' formulas written out here, training, the file, merging, and the one-line refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import train_network
from library.data.demo import make_demo_dataset
from library.errors import UserError
from networks import oft
from networks.files import describe_network_file, read_network_file
from networks.network import network_from_weights
from networks.oft import OFTModule
from tests.models.test_full_size_layout import SD15_TEXT, SD15_UNET
from tools import merge_lora, svd_merge_lora

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _sd_scripts_rotation(blocks, constraint, multiplier):
    """sd-scripts' OFTModule.get_weight, step by step."""
    q = blocks - blocks.transpose(1, 2)
    norm = torch.norm(q.flatten())
    q = q * ((torch.clamp(norm, max=constraint) + 1e-8) / (norm + 1e-8))
    eye = torch.eye(blocks.shape[1]).unsqueeze(0).repeat(blocks.shape[0], 1, 1)
    r = torch.matmul(eye + q, (eye - q).inverse())
    return multiplier * (r - eye) + eye


def _sd_scripts_weight(weight, rotation):
    """sd-scripts' forward: each row block k of W becomes Σ_n R[k, n, m] W[k, n, p]."""
    k, n = rotation.shape[0], rotation.shape[1]
    blocks = weight.reshape(k, n, *weight.shape[1:])
    rotated = torch.stack([rotation[i].T @ blocks[i].reshape(n, -1) for i in range(k)])
    return rotated.reshape(weight.shape)


def _module(layer, dim=4, alpha=0.05, seed=1):
    module = OFTModule("oft_unet_test", layer, multiplier=1.0, dim=dim, alpha=alpha)
    with torch.no_grad():
        module.oft_blocks.copy_(torch.randn(module.oft_blocks.shape, generator=torch.Generator().manual_seed(seed)))
    return module


@pytest.mark.parametrize("layer", [nn.Linear(24, 40), nn.Conv2d(24, 40, 3, padding=1)], ids=["linear", "conv3x3"])
@pytest.mark.parametrize("multiplier", [1.0, 0.5])
def test_rotation_and_weight_equal_sd_scripts_formulas(layer, multiplier):
    module = _module(layer)
    assert module.oft_blocks.shape == (4, 10, 10) and float(module.alpha) == pytest.approx(0.05)
    expected_r = _sd_scripts_rotation(module.oft_blocks.detach(), 0.05 * 40, multiplier)
    torch.testing.assert_close(module.rotation(multiplier).detach(), expected_r, atol=1e-6, rtol=1e-5)
    module.multiplier = multiplier
    weight = layer.weight.detach()
    expected_w = _sd_scripts_weight(weight, expected_r)
    torch.testing.assert_close(module.merged_weight(weight).detach(), expected_w, atol=1e-6, rtol=1e-5)
    module.apply_to()
    x = torch.randn(2, 5, 24) if isinstance(layer, nn.Linear) else torch.randn(2, 24, 6, 6)
    op = (lambda w: nn.functional.linear(x, w, layer.bias)) if isinstance(layer, nn.Linear) else \
        (lambda w: nn.functional.conv2d(x, w, layer.bias, padding=1))
    torch.testing.assert_close(layer(x), op(expected_w), atol=1e-5, rtol=1e-5)


def test_the_rotation_is_orthogonal_and_keeps_each_blocks_column_norms():
    layer = nn.Linear(24, 40)
    module = _module(layer, alpha=10.0)  # unconstrained: a large rotation
    r = module.rotation(1.0).detach()
    torch.testing.assert_close(r @ r.transpose(1, 2), torch.eye(10).expand(4, 10, 10), atol=1e-5, rtol=0)
    rotated = module.merged_weight(layer.weight.detach()).detach()
    assert (rotated - layer.weight).abs().max() > 0.1
    for k in range(4):  # OFT's point: the angles between neurons in a block stay, so do their norms
        block, before = rotated[10 * k:10 * (k + 1)], layer.weight.detach()[10 * k:10 * (k + 1)]
        torch.testing.assert_close(block.norm(dim=0), before.norm(dim=0), atol=1e-5, rtol=1e-5)


def test_the_constraint_caps_the_skew_part():
    layer = nn.Linear(24, 40)
    module = _module(layer, alpha=1e-3)
    q_norm = (module.oft_blocks - module.oft_blocks.transpose(1, 2)).flatten().norm()
    assert q_norm > 1  # far above the cap: 1e-3 · 40
    r = module.rotation(1.0).detach()
    # R − I ≈ 2Q for a small Q, so ‖R − I‖ ≈ 2 · the capped norm
    assert float((r - torch.eye(10)).flatten().norm()) == pytest.approx(2 * 1e-3 * 40, rel=1e-2)


def test_default_targets_are_the_attention_projections_of_the_unet_only(tiny_parts):
    parts = tiny_parts["tiny-sd1"]
    network = oft.create_network(1.0, 4, 1e-3, None, parts.text_encoder, parts.unet)
    names = [m.lora_name for m in network.unet_loras]
    assert not network.text_encoder_loras and names
    assert all(n.startswith("oft_unet_") for n in names)
    assert {n.rsplit("_attn", 1)[1] for n in names} == {"1_to_q", "1_to_k", "1_to_v", "1_to_out_0",
                                                       "2_to_q", "2_to_k", "2_to_v", "2_to_out_0"}
    every = oft.create_network(1.0, 4, 1e-3, None, parts.text_encoder, parts.unet, enable_all_linear="true",
                               enable_conv="true")
    more = {m.lora_name for m in every.unet_loras} - set(names)
    assert any(n.endswith("_proj_in") for n in more) and any(n.endswith("_ff_net_2") for n in more)
    assert any(n.endswith("_resnets_0_conv1") for n in more)  # 3×3 with enable_conv
    assert any(n.endswith("_time_emb_proj") for n in more)


def test_sd15_names_and_shapes_are_sd_scripts():
    """sd-scripts' OFT on SD 1.5: 16 transformer blocks × 2 attentions × 4 projections, blocks of out/dim."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet, te = UNet2DConditionModel(**SD15_UNET), CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
    network = oft.create_network(1.0, 8, 1e-3, None, te, unet)
    state = network.state_dict()
    assert len(network.unet_loras) == 128 and len(state) == 256
    assert state["oft_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.oft_blocks"].shape == (8, 40, 40)
    assert state["oft_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0.oft_blocks"].shape == (8, 160, 160)
    assert state["oft_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_q.alpha"].item() == pytest.approx(1e-3)


def test_sdxl_modules_get_sgm_names(tiny_parts):
    parts = tiny_parts["tiny-sdxl"]
    network = oft.create_network(1.0, 4, 1e-3, None, list(parts.text_encoders), parts.unet)
    names = [m.lora_name for m in network.unet_loras]
    assert names and not network.text_encoder_loras
    assert all(n.startswith(("oft_unet_input_blocks_", "oft_unet_middle_block_", "oft_unet_output_blocks_"))
               for n in names)


def test_option_mistakes_are_one_line_errors(tiny_parts):
    parts = tiny_parts["tiny-sd1"]
    with pytest.raises(UserError, match=r"--network_dim 3: OFT splits .* use one of 1, 2, 4, 8, 16, 32"):
        oft.create_network(1.0, 3, 1e-3, None, parts.text_encoder, parts.unet)
    with pytest.raises(UserError, match="networks.oft has no option 'conv_dim'"):
        oft.create_network(1.0, 4, 1e-3, None, parts.text_encoder, parts.unet, conv_dim="4")
    with pytest.raises(UserError, match="must be above 0"):
        oft.create_network(1.0, 4, 0, None, parts.text_encoder, parts.unet)


@pytest.fixture(scope="module")
def trained_oft(tmp_path_factory):
    root = tmp_path_factory.mktemp("oft")
    make_demo_dataset(root / "data", count=2, size=32)
    common = ["--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", str(root / "data"),
              "--caption_extension", ".txt", "--resolution", "32", "--output_dir", str(root / "out"),
              "--train_batch_size", "2", "--max_train_steps", "3", "--learning_rate", "1e-2",
              "--network_module", "networks.oft", "--network_dim", "4", "--network_alpha", "0.01", "--seed", "1",
              "--max_data_loader_n_workers", "0"]
    train_network.main(common + ["--output_name", "oft", "--network_args", "enable_conv=True"])
    return root, common


def test_training_writes_sd_scripts_keys_and_metadata(trained_oft):
    root, _ = trained_oft
    weights, metadata = read_network_file(root / "out" / "oft.safetensors")
    assert weights and all(k.startswith("oft_unet_") and k.endswith((".oft_blocks", ".alpha")) for k in weights)
    assert any(k.endswith("_resnets_0_conv1.oft_blocks") for k in weights)
    alphas = {float(v) for k, v in weights.items() if k.endswith(".alpha")}
    assert len(alphas) == 1 and alphas.pop() == pytest.approx(0.01)
    assert metadata["ss_network_module"] == "networks.oft" and metadata["ss_network_dim"] == "4"
    assert sum(bool(v.abs().max() > 0) for k, v in weights.items() if k.endswith(".oft_blocks")) > len(weights) // 4


def test_the_file_reads_back_and_merges_as_it_runs(trained_oft, tiny_files, tiny_parts, tmp_path):
    from library.models.loading import load_components

    root, _ = trained_oft
    file = root / "out" / "oft.safetensors"
    info = describe_network_file(load_file(str(file)), source=str(file))
    assert (info.algorithm, info.label, info.needs_base_weights is not None) == ("oft", "OFT", True)
    model = tiny_files["tiny-sd1"]["safetensors"]
    out = tmp_path / "merged.safetensors"
    merge_lora.main(["--sd_model", str(model), "--models", str(file), "--ratios", "0.7", "--save_to", str(out)])
    base, merged = load_components(str(model)), load_components(str(out))
    network = network_from_weights(0.7, file, base.text_encoder, base.unet)
    network.load_weights(file)
    merged_params = dict(merged.unet.named_parameters())
    for module in network.unet_loras[:6]:
        path = next(p for p in merged_params if "oft_unet_" + p.replace(".", "_") == f"{module.lora_name}_weight")
        torch.testing.assert_close(merged_params[path].detach(), module.merged_weight(module.org_module.weight).detach(),
                                   atol=1e-6, rtol=1e-5)


def test_resuming_from_the_file_continues_training(trained_oft):
    root, common = trained_oft
    train_network.main(common + ["--output_name", "again", "--network_args", "enable_conv=True", "--network_weights",
                                 str(root / "out" / "oft.safetensors"), "--max_train_steps", "1"])
    assert (root / "out" / "again.safetensors").exists()


def test_refusals(trained_oft, tmp_path, capsys):
    root, common = trained_oft
    lycoris_style = {k.replace("oft_unet_", "lora_unet_"): v for k, v in load_file(str(root / "out" / "oft.safetensors")).items()}
    save_file(lycoris_style, str(tmp_path / "diag_oft.safetensors"))
    with pytest.raises(UserError, match="a LyCORIS diag-OFT/BOFT network, which networks.oft .* lycoris.kohya"):
        read_network_file(tmp_path / "diag_oft.safetensors")
    for extra, message in ((["--scale_weight_norms", "1"], "--scale_weight_norms: OFT (networks.oft) has no weight norm"),
                           (["--network_args", "conv_dim=4"], "networks.oft has no option 'conv_dim'")):
        with pytest.raises(SystemExit) as exit_info:
            train_network.main(common + ["--output_name", "refused"] + extra)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and message in err and "\n" not in err, err
    assert not (root / "out" / "refused.safetensors").exists()
    with pytest.raises(SystemExit):  # it needs the model: an OFT's change is a rotation of the base weights
        svd_merge_lora.main(["--models", str(root / "out" / "oft.safetensors"), "--save_to",
                             str(tmp_path / "svd.safetensors"), "--new_rank", "2"])
    err = capsys.readouterr().err
    assert "an OFT network changes the base weights by more than adding ΔW; svd_merge_lora works on ΔW alone" in err
    assert not (tmp_path / "svd.safetensors").exists()


def test_merging_into_a_copy_then_unmerging_restores_the_model(tiny_parts):
    parts = copy.deepcopy(tiny_parts["tiny-sd1"])
    network = oft.create_network(0.9, 4, 0.05, None, parts.text_encoder, parts.unet)
    with torch.no_grad():
        for p in network.parameters():
            p.normal_(0, 0.1)
    before = {k: v.clone() for k, v in parts.unet.state_dict().items()}
    network.merge_to(parts.text_encoder, parts.unet)
    changed = [k for k, v in parts.unet.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) == len(network.unet_loras)
    for module in network.unet_loras:
        module.unmerge()
    assert all(torch.equal(v, before[k]) for k, v in parts.unet.state_dict().items())
