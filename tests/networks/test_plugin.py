"""--network_module plugs in any sd-scripts-style module: ours, and LyCORIS' own `lycoris.kohya`."""

from __future__ import annotations

import copy

import pytest
import torch

from library.errors import UserError
from networks.plugin import create_network, load_network_module


def test_our_modules_are_created_the_way_sd_scripts_calls_them(tiny_parts):
    parts = copy.deepcopy(tiny_parts["tiny-sd1"])
    network = create_network("networks.lokr", 1.0, 4, 1, parts.vae, parts.text_encoder, parts.unet,
                             network_args=["algo=lokr", "factor=4", "conv_dim=2"])
    assert network.module_class.ALGORITHM == "lokr" and network.options["factor"] == 4
    network.apply_to(parts.text_encoder, parts.unet, True, True)
    groups, names = network.prepare_optimizer_params(1e-5, 1e-4, 1e-4)
    assert names == ["textencoder", "unet"] and sum(p.numel() for g in groups for p in g["params"]) > 0


def test_lycoris_kohya_plugs_in_with_the_same_calls(tiny_parts, tmp_path, monkeypatch):
    from lycoris.kohya import LycorisNetworkKohya

    parts = copy.deepcopy(tiny_parts["tiny-sd1"])
    # LyCORIS' default preset (test_lycoris_kohya.py has every documented one); presets are class state, so every
    # attribute a preset sets is restored after the test.
    for attr in ("ENABLE_CONV", "UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME",
                 "TEXT_ENCODER_TARGET_REPLACE_MODULE", "TEXT_ENCODER_TARGET_REPLACE_NAME", "MODULE_ALGO_MAP",
                 "NAME_ALGO_MAP", "USE_FNMATCH", "TARGET_EXCLUDE_NAME"):
        monkeypatch.setattr(LycorisNetworkKohya, attr, getattr(LycorisNetworkKohya, attr))
    network = create_network("lycoris.kohya", 1.0, 4, 1, parts.vae, parts.text_encoder, parts.unet,
                             network_args=["algo=loha"])
    network.apply_to(parts.text_encoder, parts.unet, True, True)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in {lora.lora_name for lora in network.loras}
    params = network.prepare_optimizer_params(1e-5, 1e-4, 1e-4)
    groups = params[0] if isinstance(params, tuple) else params
    assert sum(p.numel() for g in groups for p in g["params"]) > 0
    network.save_weights(str(tmp_path / "ly.safetensors"), torch.float32, {})
    from networks.files import describe_network_file, read_network_file

    weights, _ = read_network_file(tmp_path / "ly.safetensors")  # and its file is one we read
    assert describe_network_file(weights, source="ly").algorithm == "loha"


@pytest.mark.parametrize("name, message", [("networks.nope", "cannot import it"), ("json", "not a network module")])
def test_bad_network_module_is_a_clear_error(name, message):
    with pytest.raises(UserError, match=message):
        load_network_module(name)
