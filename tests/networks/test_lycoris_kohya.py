"""`--network_module lycoris.kohya` as LyCORIS documents it: its presets build sd-scripts' modules under sd-scripts'
names (`lora_te_text_model_encoder_…`, `lora_unet_…`), and its files load again (ours and LyCORIS' loaders)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import train_network
from library.data.demo import make_demo_dataset
from library.models.checkpoint_io import read_state_dict
from networks.files import describe_network_file
from networks.registry import algo_modules

pytest.importorskip("lycoris")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
# LyCORIS' documented command lines (README / docs/Guidelines: network_module, conv_dim, conv_alpha, algo).
DOCUMENTED = {
    "default": ["conv_dim=4", "conv_alpha=1"],
    "loha": ["conv_dim=4", "conv_alpha=1", "algo=loha"],
    "lokr": ["conv_dim=4", "conv_alpha=1", "algo=lokr"],
    "locon": ["conv_dim=4", "conv_alpha=1", "algo=locon"],
}
OUR_MODULE = {"default": "networks.lora", **algo_modules()}  # each command line's algo -> the module we train it with
# LyCORIS' `full` preset = sd-scripts' LoCon layers plus these four (targeted by name in the preset).
FULL_PRESET_EXTRA = {"lora_unet_conv_in", "lora_unet_conv_out", "lora_unet_time_embedding_linear_1",
                     "lora_unet_time_embedding_linear_2"}


def sd_scripts_names() -> tuple[set[str], set[str]]:
    """(text-encoder, UNet) module names sd-scripts' LoCon writes for tiny-sd1 (pinned golden of our LoCon)."""
    keys = json.loads((GOLDEN / "locon_tiny_sd1_dim4_conv2.json").read_text())
    names = {key.partition(".")[0] for key in keys}
    return {n for n in names if n.startswith("lora_te_")}, {n for n in names if n.startswith("lora_unet_")}


@pytest.fixture(autouse=True)
def restore_lycoris_presets(monkeypatch):
    """LyCORIS keeps the preset as class state; put every attribute a preset sets back after each test."""
    from lycoris.kohya import LycorisNetworkKohya

    for attr in ("ENABLE_CONV", "UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME",
                 "TEXT_ENCODER_TARGET_REPLACE_MODULE", "TEXT_ENCODER_TARGET_REPLACE_NAME", "MODULE_ALGO_MAP",
                 "NAME_ALGO_MAP", "USE_FNMATCH", "TARGET_EXCLUDE_NAME"):
        monkeypatch.setattr(LycorisNetworkKohya, attr, getattr(LycorisNetworkKohya, attr))


@pytest.fixture
def data(tmp_path):
    make_demo_dataset(tmp_path / "data", count=2, size=32)
    return tmp_path / "data"


def _train(data, out, network_args, *extra, steps=2):
    flags = ["--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", str(data), "--caption_extension",
             ".txt", "--resolution", "32", "--output_dir", str(out), "--output_name", "ly", "--train_batch_size", "2",
             "--max_train_steps", str(steps), "--learning_rate", "1e-3", "--network_dim", "4", "--network_alpha", "1",
             "--seed", "1", "--max_data_loader_n_workers", "0", "--network_module", "lycoris.kohya",
             "--network_args", *network_args, *extra]
    return train_network.main(flags)


@pytest.mark.parametrize("command", list(DOCUMENTED))
def test_documented_command_lines_write_sd_scripts_names(command, data, tmp_path, tiny_parts):
    result = _train(data, tmp_path / "out", DOCUMENTED[command])
    assert result.global_step == 2
    weights, metadata = read_state_dict(tmp_path / "out" / "ly.safetensors")
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert all(key.startswith(("lora_unet_", "lora_te_")) for key in weights)
    assert not [key for key in weights if key.startswith("lora_te_encoder_")]
    names = {key.partition(".")[0] for key in weights}
    te_names, unet_names = sd_scripts_names()
    # The default preset wraps CLIP's attention and MLP layers: sd-scripts' 6 per layer (72 for SD 1.5).
    assert {n for n in names if n.startswith("lora_te_")} == te_names
    assert all("_text_model_encoder_layers_" in n for n in te_names) and len(te_names) == 12
    assert {n for n in names if n.startswith("lora_unet_")} == unet_names | FULL_PRESET_EXTRA
    # Our loader (generation, merge tools) takes the file as it is: every module lands on a layer of the model.
    from networks.plugin import create_network_from_weights

    info = describe_network_file(weights, source="ly")
    assert info.algorithm == {"default": "lora", "locon": "lora"}.get(command, command)
    parts = copy.deepcopy(tiny_parts["tiny-sd1"])
    ours, _ = create_network_from_weights(OUR_MODULE[command], 1.0, tmp_path / "out" / "ly.safetensors", None,
                                          parts.text_encoder, parts.unet)
    assert {lora.lora_name for lora in ours.text_encoder_loras + ours.unet_loras} == names


def test_lycoris_reloads_its_file_from_sd_scripts_names(data, tmp_path, tiny_parts, capsys):
    """--network_weights / --dim_from_weights: LyCORIS' create_network_from_weights finds every module again."""
    from networks.plugin import create_network_from_weights

    _train(data, tmp_path / "out", DOCUMENTED["loha"])
    file = tmp_path / "out" / "ly.safetensors"
    weights, _ = read_state_dict(file)
    parts = copy.deepcopy(tiny_parts["tiny-sd1"])
    network, _ = create_network_from_weights("lycoris.kohya", 1.0, file, None, parts.text_encoder, parts.unet)
    assert {lora.lora_name for lora in network.text_encoder_loras} == sd_scripts_names()[0]
    assert len(network.text_encoder_loras) + len(network.unet_loras) == len({k.partition(".")[0] for k in weights})

    _train(data, tmp_path / "again", DOCUMENTED["loha"], "--network_weights", str(file), "--dim_from_weights",
           steps=1)
    _train(data, tmp_path / "same", DOCUMENTED["loha"], "--network_weights", str(file), steps=1)
    # --base_weights: merged into the model before training (sd-scripts' merge_to with dtype and device)
    merged = _train(data, tmp_path / "merged", DOCUMENTED["loha"], "--base_weights", str(file), steps=1)
    base = tiny_parts["tiny-sd1"].unet.conv_in.weight
    assert not torch.equal(merged.method.parts.unet.conv_in.weight.detach().cpu(), base)
    with pytest.raises(SystemExit) as stopped:  # LyCORIS would drop them silently (strict=False)
        _train(data, tmp_path / "other", DOCUMENTED["lokr"], "--network_weights", str(file), steps=1)
    assert stopped.value.code == 2 and "852 of its tensors fit no module" in capsys.readouterr().err


def test_presets_build_what_they_build_under_sd_scripts(tiny_parts):
    """attn-only matches sd-scripts' class CrossAttention (diffusers calls it Attention); full-lin names
    time_embedding's layers once."""
    from networks.plugin import create_network

    parts = tiny_parts["tiny-sd1"]
    network = create_network("lycoris.kohya", 1.0, 4, 1, None, parts.text_encoder, parts.unet,
                             network_args=["preset=attn-only"])
    unet = {lora.lora_name for lora in network.unet_loras}
    assert unet and all("_attn1_" in n or "_attn2_" in n for n in unet)
    assert {lora.lora_name for lora in network.text_encoder_loras} == {
        n for n in sd_scripts_names()[0] if "_self_attn_" in n}
    network = create_network("lycoris.kohya", 1.0, 4, 1, None, parts.text_encoder, parts.unet,
                             network_args=["preset=full-lin"])
    names = [lora.lora_name for lora in network.unet_loras]
    assert names.count("lora_unet_time_embedding_linear_1") == 1


def test_views_hold_the_models_own_layers(tiny_parts):
    from networks.plugin_trees import text_encoder_view, unet_view

    parts = tiny_parts["tiny-sd1"]
    te = dict(text_encoder_view(parts.text_encoder).named_modules())
    assert te["text_model.encoder.layers.0.self_attn.q_proj"] is parts.text_encoder.encoder.layers[0].self_attn.q_proj
    unet = dict(unet_view(parts.unet).named_modules())
    assert unet["time_embedding.linear_1"] is parts.unet.time_embedding.linear_1
    assert type(unet["down_blocks.0.attentions.0.transformer_blocks.0.attn1"]).__name__ == "CrossAttention"
    assert {n for n, p in unet_view(parts.unet).named_parameters()} == {n for n, p in parts.unet.named_parameters()}
    assert torch.equal(unet["conv_in"].weight, parts.unet.conv_in.weight)
