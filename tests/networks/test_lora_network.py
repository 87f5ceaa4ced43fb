"""LoRA/LoCon networks: where adapters go and what they are named, files, the sd-scripts plug-in API, param groups."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from library.errors import UserError
from networks import lora
from networks.files import describe_network_file, read_network_file
from networks.injection import block_index
from tests.conftest import GOLDEN
from tests.models.test_full_size_layout import SD15_TEXT, SD15_UNET, SD21_TEXT, SD21_UNET


@pytest.fixture
def tiny(tiny_parts):
    """A private copy of the tiny SD 1.x model (adapters patch module forwards)."""
    return copy.deepcopy(tiny_parts["tiny-sd1"])


def _randomised(network, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in network.parameters():
            param.normal_(0, 0.05)
    return network


def _layout(network):
    return {k: list(v.shape) for k, v in network.state_dict().items()}


def test_tiny_model_layout_golden(tiny, golden):
    golden("lora_tiny_sd1_dim4", _layout(lora.create_network(1.0, 4, 2, None, tiny.text_encoder, tiny.unet)))
    locon = lora.create_network(1.0, 4, 2, None, tiny.text_encoder, tiny.unet, conv_dim="2", conv_alpha="1")
    golden("locon_tiny_sd1_dim4_conv2", _layout(locon))


def _meta_sd(unet_cfg, text_cfg):
    with torch.device("meta"):
        return UNet2DConditionModel(**unet_cfg), CLIPTextModel(CLIPTextConfig(**text_cfg))


def test_sd15_layout_equals_the_file_sd_scripts_writes():
    unet, te = _meta_sd(SD15_UNET, SD15_TEXT)
    network = lora.create_network(1.0, 16, 8, None, te, unet)
    assert (len(network.text_encoder_loras), len(network.unet_loras)) == (72, 192)
    reference = json.loads((GOLDEN / "sd-scripts-lora-sd15-rank16.json").read_text())["tensors"]
    assert _layout(network) == reference


def test_sd15_locon_adds_resnet_and_sampler_convolutions():
    unet, te = _meta_sd(SD15_UNET, SD15_TEXT)
    network = lora.create_network(1.0, 16, 8, None, te, unet, conv_dim="8", conv_alpha="4")
    # 22 ResNet blocks × (conv1, conv2, time_emb_proj) + 14 conv_shortcuts + 3 downsamplers + 3 upsamplers = 86
    assert len(network.unet_loras) == 192 + 86
    kernels = [m for m in network.unet_loras if m.lora_down.weight.shape[2:] == (3, 3)]
    assert len(kernels) == 22 * 2 + 6 and all(m.dim == 8 and m.scale == 0.5 for m in kernels)
    assert network.state_dict()["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"].shape == (320, 8, 1, 1)


def test_sd21_text_encoder_has_138_modules_and_linear_proj():
    unet, te = _meta_sd(SD21_UNET, SD21_TEXT)
    network = lora.create_network(1.0, 4, 1, None, te, unet)
    assert len(network.text_encoder_loras) == 23 * 6
    assert network.state_dict()["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape == (4, 320)


def test_save_and_rebuild_from_weights_is_exact(tiny, tmp_path):
    network = _randomised(lora.create_network(1.0, 4, 2, None, tiny.text_encoder, tiny.unet, conv_dim="2"))
    network.save_weights(str(tmp_path / "net.safetensors"), torch.float32, {"ss_network_dim": "4"})
    weights, metadata = read_network_file(tmp_path / "net.safetensors")
    assert metadata["ss_network_dim"] == "4" and len(metadata["sshs_model_hash"]) == 64
    rebuilt = lora.create_network_from_weights(1.0, str(tmp_path / "net.safetensors"), None, tiny.text_encoder, tiny.unet)
    rebuilt.load_weights(str(tmp_path / "net.safetensors"))
    assert _layout(rebuilt) == _layout(network)
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in network.state_dict().items())
    info = describe_network_file(weights, source="net")
    assert info.algorithm == "lora" and set(info.dims.values()) == {4, 2} and len(info.conv_modules) > 0


def test_save_precision_and_pt_format(tiny, tmp_path):
    network = _randomised(lora.create_network(1.0, 4, 2, None, tiny.text_encoder, tiny.unet))
    network.save_weights(str(tmp_path / "n.safetensors"), torch.float16, None)
    assert {v.dtype for v in load_file(str(tmp_path / "n.safetensors")).values()} == {torch.float16}
    network.save_weights(str(tmp_path / "n.pt"), torch.bfloat16, None)
    assert {v.dtype for v in torch.load(tmp_path / "n.pt").values()} == {torch.bfloat16}


def test_four_d_proj_weights_from_a_single_file_trained_sd2_lora_load_into_linear_layers(tiny_parts, tmp_path):
    sd2 = copy.deepcopy(tiny_parts["tiny-sd2"])
    network = _randomised(lora.create_network(1.0, 4, 2, None, sd2.text_encoder, sd2.unet))
    state = network.state_dict()
    # sd-scripts trained on a single-file SD 2.x base stores proj_in/out as 1×1 convolutions (4-D).
    four_d = {k: (v[..., None, None] if "proj_" in k and v.dim() == 2 else v) for k, v in state.items()}
    save_file(four_d, str(tmp_path / "sd2.safetensors"))
    rebuilt = lora.create_network_from_weights(1.0, str(tmp_path / "sd2.safetensors"), None, sd2.text_encoder, sd2.unet)
    rebuilt.load_weights(str(tmp_path / "sd2.safetensors"))
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in state.items())


def test_lycoris_style_text_encoder_names_are_read(tiny, tmp_path):
    network = _randomised(lora.create_network(1.0, 4, 2, None, tiny.text_encoder, tiny.unet))
    renamed = {k.replace("lora_te_text_model_encoder_", "lora_te_encoder_"): v for k, v in network.state_dict().items()}
    save_file(renamed, str(tmp_path / "ly.safetensors"))
    rebuilt = lora.create_network_from_weights(1.0, str(tmp_path / "ly.safetensors"), None, tiny.text_encoder, tiny.unet)
    assert len(rebuilt.text_encoder_loras) == 12


def test_files_that_are_not_networks_are_refused(tiny_files, tiny, tmp_path):
    with pytest.raises(UserError, match="not a LoRA/LyCORIS network file"):
        read_network_file(tiny_files["tiny-sd1"]["safetensors"])
    network = lora.create_network(1.0, 4, 2, None, tiny.text_encoder, tiny.unet)
    target = tmp_path / "model.safetensors"
    target.write_bytes(tiny_files["tiny-sd1"]["safetensors"].read_bytes())
    with pytest.raises(UserError, match="refusing to overwrite"):
        network.save_weights(str(target), None, None)
    assert target.read_bytes() == tiny_files["tiny-sd1"]["safetensors"].read_bytes()


def test_a_network_for_another_model_is_refused(tiny, tmp_path):
    save_file({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(4, 320),
               "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.zeros(320, 4)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(UserError, match="none of its 1 adapters matches"):
        lora.create_network_from_weights(1.0, str(tmp_path / "x.safetensors"), None, tiny.text_encoder, tiny.unet)


@pytest.mark.parametrize("args, message", [
    ({"conv_dimm": "4"}, "has no option 'conv_dimm' (did you mean 'conv_dim'?)"),
    ({"conv_dim": "four"}, "conv_dim=four: expected int"),
    ({"block_dims": "1,2,3"}, "needs 25 comma-separated values"),
])
def test_network_args_errors_name_the_key(tiny, args, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        lora.create_network(1.0, 4, 2, None, tiny.text_encoder, tiny.unet, **args)


def test_block_dims_follow_sd_scripts_block_indexing(tiny):
    dims = ["0"] + ["2"] * 11 + ["3"] + ["5"] * 12  # IN blocks 2, MID 3, OUT 5 (index 0 unused)
    network = lora.create_network(1.0, 4, 2, None, tiny.text_encoder, tiny.unet, block_dims=",".join(dims))
    for module in network.unet_loras:
        index = block_index(module.lora_name)
        assert module.dim == (2 if index < 12 else 3 if index == 12 else 5), module.lora_name
    assert {m.dim for m in network.text_encoder_loras} == {4}  # block dims do not touch the text encoder
    assert block_index("lora_unet_down_blocks_0_attentions_1_proj_in") == 2
    assert block_index("lora_unet_up_blocks_1_attentions_2_proj_out") == 12 + 1 + 5
    assert block_index("lora_unet_down_blocks_2_downsamplers_0_conv") == 1 + 8


def test_param_groups_lr_weights_and_loraplus(tiny):
    network = lora.create_network(1.0, 4, 2, None, tiny.text_encoder, tiny.unet, loraplus_lr_ratio="16")
    network.apply_to(tiny.text_encoder, tiny.unet)
    groups, names = network.prepare_optimizer_params(1e-5, 1e-4, 1e-3)
    assert names == ["textencoder", "textencoder plus", "unet", "unet plus"]
    assert [g["lr"] for g in groups] == [1e-5, 1.6e-4, 1e-4, 1.6e-3]
    ups = {id(p) for m in network.unet_loras for p in m.lora_up.parameters()}
    assert {id(p) for p in groups[3]["params"]} == ups

    weighted = lora.create_network(1.0, 4, 2, None, tiny.text_encoder, tiny.unet,
                                   down_lr_weight="zeros", mid_lr_weight="0.5", up_lr_weight="linear")
    groups, names = weighted.prepare_optimizer_params(None, 1e-4, None)
    lrs = dict(zip(names, (g.get("lr") for g in groups)))
    assert not any(n.startswith("unet ") and int(n.split()[1]) < 12 for n in names)  # zero-weight IN blocks: untrained
    assert lrs["unet 12"] == pytest.approx(5e-5)
    # the tiny UNet's last attention is OUT08 (block 21); the linear ramp gives it 8/11
    assert lrs["unet 21"] == pytest.approx(1e-4 * 8 / 11)


def test_apply_text_encoder_false_drops_those_modules(tiny):
    network = lora.create_network(1.0, 4, 2, None, tiny.text_encoder, tiny.unet)
    network.apply_to(tiny.text_encoder, tiny.unet, apply_text_encoder=False, apply_unet=True)
    assert network.text_encoder_loras == [] and not any(k.startswith("lora_te") for k in network.state_dict())


def test_merge_to_equals_applied_network(tiny):
    network = _randomised(lora.create_network(0.7, 4, 2, None, tiny.text_encoder, tiny.unet))
    merged = copy.deepcopy(tiny)
    network.apply_to(tiny.text_encoder, tiny.unet)
    x, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.randn(1, 77, 32)
    with torch.no_grad():
        applied = tiny.unet(x, t, ctx).sample
    other = lora.create_network_from_weights(0.7, None, None, merged.text_encoder, merged.unet,
                                             weights_sd=network.state_dict())
    other.merge_to(merged.text_encoder, merged.unet, network.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged.unet(x, t, ctx).sample, applied, atol=1e-5, rtol=0)
