"""Export self-test (#21 item 1): after each save, one line says which loaders (diffusers, ComfyUI, AUTOMATIC1111)
find every module of the file; a module one of them would skip is named. The same check runs on any file with
`tools/check_lora_weights.py --loaders BASE`."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import train_network
from library.data.demo import make_demo_dataset
from library.formats.loader_check import a1111_target, check_network, report_lines
from library.models.family import families
from networks import lora
from tests.models.test_full_size_layout import SD15_TEXT, SD15_UNET, SD21_TEXT, SD21_UNET
from tools import check_lora_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAMILY = {f.name: f for f in families()}


def _full_size(unet_config, text_config, family):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet, te = UNet2DConditionModel(**unet_config), CLIPTextModel(CLIPTextConfig(**text_config))
    return SimpleNamespace(family=FAMILY[family], unet=unet, text_encoders=[te], text_encoder=te)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_full_size_locon_and_lycoris_extras_map_in_every_loader(family):
    """SD 1.5 / 2.1 shapes: sd-scripts' LoCon targets, plus what LyCORIS' full preset adds (conv_in, conv_out, the
    time embedding), named as sd-scripts / LyCORIS name them: all found by all three loaders' rules."""
    parts = _full_size(*((SD15_UNET, SD15_TEXT) if family == "sd1" else (SD21_UNET, SD21_TEXT)), family)
    network = lora.create_network(1.0, 4, 1, None, parts.text_encoder, parts.unet, conv_dim="4")
    names = list(network.state_dict())
    plain = {k: torch.tensor(1.0) if k.endswith(".alpha") else torch.zeros(1) for k in names}
    assert all(not r.unmatched for r in check_network(plain, parts, "lora"))  # diffusers too: its own converter
    for extra in ("conv_in", "conv_out", "time_embedding_linear_1", "time_embedding_linear_2"):
        names += [f"lora_unet_{extra}.{rest}" for rest in ("lora_down.weight", "lora_up.weight", "alpha")]
    weights = {k: torch.tensor(1.0) if k.endswith(".alpha") else torch.zeros(1) for k in names}
    results = check_network(weights, parts, "lora")
    assert {r.loader: r.unmatched for r in results if r.loader != "diffusers"} == {"ComfyUI": [], "A1111": []}
    modules = len({k.partition(".")[0] for k in weights})
    assert all(r.total == modules for r in results)


def test_a1111_rules_give_its_compvis_names():
    assert a1111_target("lora_unet_down_blocks_1_resnets_0_conv_shortcut", "sd1") == \
        "diffusion_model_input_blocks_4_0_skip_connection"
    assert a1111_target("lora_unet_up_blocks_0_upsamplers_0_conv", "sd1") == "diffusion_model_output_blocks_2_1_conv"
    assert a1111_target("lora_unet_mid_block_resnets_1_time_emb_proj", "sd1") == \
        "diffusion_model_middle_block_2_emb_layers_1"
    assert a1111_target("lora_te_text_model_encoder_layers_3_self_attn_q_proj", "sd2") == \
        "model_transformer_resblocks_3_attn_q_proj"
    assert a1111_target("lora_te2_text_model_encoder_layers_3_mlp_fc1", "sdxl") == \
        "1_model_transformer_resblocks_3_mlp_c_fc"
    assert a1111_target("lora_te1_text_model_encoder_layers_3_mlp_fc1", "sdxl") == \
        "0_transformer_text_model_encoder_layers_3_mlp_fc1"
    assert a1111_target("oft_unet_input_blocks_4_1_proj_in", "sdxl") == "diffusion_model_input_blocks_4_1_proj_in"


@pytest.mark.parametrize("model", ["tiny-sd1", "tiny-sd2", "tiny-sdxl"])
def test_each_save_says_every_module_maps(model, tmp_path, capsys):
    import sdxl_train_network

    make_demo_dataset(tmp_path / "data", count=2, size=32)
    trainer = sdxl_train_network if model == "tiny-sdxl" else train_network
    trainer.main(["--pretrained_model_name_or_path", model, "--train_data_dir", str(tmp_path / "data"),
                  "--caption_extension", ".txt", "--resolution", "32", "--output_dir", str(tmp_path / "out"),
                  "--output_name", "net", "--train_batch_size", "2", "--max_train_steps", "1", "--seed", "1",
                  "--max_data_loader_n_workers", "0", "--network_args", "conv_dim=2"])
    out = capsys.readouterr().out
    modules = len({k.partition(".")[0] for k in load_file(str(tmp_path / "out" / "net.safetensors"))})
    assert f"saved net.safetensors: {modules}/{modules} modules map in diffusers, ComfyUI, A1111\n" in out


def test_a_misnamed_module_is_named_for_every_loader(tiny_parts, tmp_path, capsys):
    parts = copy.deepcopy(tiny_parts["tiny-sd1"])
    network = lora.create_network(1.0, 4, 1, None, parts.text_encoder, parts.unet)
    file = tmp_path / "net.safetensors"
    network.save_weights(file)
    weights = load_file(str(file))
    good = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    bad = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_qq"
    renamed = {k.replace(good + ".", bad + "."): v for k, v in weights.items()}
    save_file(renamed, str(tmp_path / "bad.safetensors"))
    check_lora_weights.main([str(tmp_path / "bad.safetensors"), "--loaders", "tiny-sd1"])
    out = capsys.readouterr().out
    total = len({k.partition(".")[0] for k in renamed})
    assert f"diffusers {total - 1}/{total}; ComfyUI {total - 1}/{total}; A1111 {total - 1}/{total}" in out
    for loader in ("diffusers", "ComfyUI", "A1111"):
        assert f"warning: {loader} would not load 1 module: {bad}\n" in out
    check_lora_weights.main([str(file), "--loaders", "tiny-sd1"])
    assert f"{total}/{total} modules map in diffusers, ComfyUI, A1111" in capsys.readouterr().out


def test_what_a_loader_does_not_read_is_a_note_not_a_warning():
    lines = report_lines("saved x", [
        SimpleNamespace(loader="diffusers", total=3, unmatched=["a", "b", "c"], note="diffusers does not read loha "
                        "files", checked=True, mapped=0),
        SimpleNamespace(loader="ComfyUI", total=3, unmatched=[], note=None, checked=True, mapped=3)])
    assert lines == ["saved x: 3/3 modules map in ComfyUI; diffusers 0/3", "note: diffusers does not read loha files"]


# ---- embeddings and hypernetworks ---------------------------------------------------------------------------------
def test_embedding_files_are_read_back_as_the_readers_read_them(tiny_parts, tmp_path):
    from library.formats import embedding_files as files
    from library.formats.reader_check import embedding_readers, report

    sd1, sdxl = tiny_parts["tiny-sd1"], tiny_parts["tiny-sdxl"]
    width = sd1.text_encoder.config.hidden_size
    a1111 = files.save_a1111(tmp_path / "a.pt", torch.randn(2, width), name="a", step=1)
    assert report("saved a.pt", *embedding_readers(a1111, sd1)) == [
        f"saved a.pt: an embedding of 2 vectors, width {width} loads in diffusers, ComfyUI, A1111"]
    kohya = files.save_kohya(tmp_path / "k.safetensors", torch.randn(1, width + 16))
    lines = report("saved k.safetensors", *embedding_readers(kohya, sd1))
    assert lines[1] == f"warning: no reader would load it: the model's text encoder is {width} wide"
    widths = [te.config.hidden_size for te in sdxl.text_encoders]
    pair = files.save_sdxl(tmp_path / "x.safetensors", {"clip_l": torch.randn(1, widths[0]),
                                                        "clip_g": torch.randn(1, widths[1])})
    what, readers, _ = embedding_readers(pair, sdxl)
    assert readers == ["diffusers", "ComfyUI", "A1111"] and f"widths {widths[0]} + {widths[1]}" in what
    assert embedding_readers(a1111, sdxl)[1] == []  # a one-encoder embedding on SDXL: nobody applies it


def test_a_hypernetwork_applies_only_where_the_context_width_is_among_its_sizes(tiny_parts, tmp_path):
    from library.formats.reader_check import hypernetwork_readers
    from networks.hypernetwork import Hypernetwork, save_hypernetwork

    parts = tiny_parts["tiny-sd1"]
    context = parts.unet.config.cross_attention_dim
    fits = save_hypernetwork(tmp_path / "fits.pt", Hypernetwork([context, 2 * context]), step=1, name="fits")
    assert hypernetwork_readers(fits, parts)[1] == ["ComfyUI", "A1111"]
    other = save_hypernetwork(tmp_path / "other.pt", Hypernetwork([context + 8]), step=1, name="other")
    what, readers, why = hypernetwork_readers(other, parts)
    assert readers == [] and why == [f"the model's cross-attention context is {context} wide; nothing would apply"]
