"""SDXL specifics beyond the family contract: diffusers reads our single files, adapter names and counts at full
size (built on the meta device), prompt-encoding details, size/crop conditioning, refusals."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from library.data.dataset import image_conditioning
from library.models.family import ImageConditioning, family_named
from library.models.loading import load_components
from library.models.saving import save_model
from library.models.sdxl import TE2_PREFIX, _clip_config, _pool, time_ids, unet_config
from networks.injection import text_encoder_targets, unet_targets

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SDXL = family_named("sdxl")


def test_diffusers_from_single_file_reads_our_file_exactly(tiny_parts, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    parts = tiny_parts["tiny-sdxl"]
    file = save_model(parts, tmp_path / "model.safetensors")
    folder = save_model(parts, tmp_path / "folder")  # only its configs are read
    pipe = StableDiffusionXLPipeline.from_single_file(str(file), config=str(folder), local_files_only=True)
    for ours, theirs in zip(parts.modules(), (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)):
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_text_projection_is_stored_as_sgm_uses_it(tiny_parts, tmp_path):
    """SGM computes x @ P; a Linear computes x @ W.T: the file holds W.T (diffusers, ComfyUI and A1111 read it so)."""
    parts = tiny_parts["tiny-sdxl"]
    file = save_model(parts, tmp_path / "model.safetensors")
    with safe_open(str(file), "pt") as f:
        stored = f.get_tensor(TE2_PREFIX + "text_projection")
        keys = set(f.keys())
    weight = parts.text_encoders[1].text_projection.weight
    assert not torch.equal(weight, weight.T)  # a symmetric matrix would not tell the orientations apart
    assert torch.equal(stored, weight.T)
    assert any(k.startswith(TE2_PREFIX + "transformer.resblocks.0.attn.in_proj_weight") for k in keys)
    assert any(k.startswith("conditioner.embedders.0.transformer.text_model.encoder.layers.11.") for k in keys)
    assert "model.diffusion_model.label_emb.0.0.weight" in keys


def _full_size_sdxl(device: str = "meta"):
    """SDXL base's UNet and two text encoders, unloaded (on `device`; bench/train_step.py builds its random file
    with this too)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config(block_out_channels=[320, 640, 1280], transformer_layers=[1, 2, 10],
                                                  cross_attention_dim=2048, pooled_dim=1280))
        te1 = CLIPTextModel(CLIPTextConfig(**_clip_config(vocab=49408, width=768, layers=12, mlp=3072,
                                                          act="quick_gelu", projection=768)))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**_clip_config(vocab=49408, width=1280, layers=32, mlp=5120,
                                                                        act="gelu", projection=1280)))
    return unet, te1, te2


def _expected_unet_names() -> set[str]:
    """From SDXL's block table (sd-scripts' sdxl_original_unet): Transformer2D blocks and their depths."""
    blocks = {**{f"input_blocks_{i}_1": 2 for i in (4, 5)}, **{f"input_blocks_{i}_1": 10 for i in (7, 8)},
              "middle_block_1": 10, **{f"output_blocks_{i}_1": 10 for i in (0, 1, 2)},
              **{f"output_blocks_{i}_1": 2 for i in (3, 4, 5)}}
    leaves = ("attn1_to_q", "attn1_to_k", "attn1_to_v", "attn1_to_out_0", "attn2_to_q", "attn2_to_k", "attn2_to_v",
              "attn2_to_out_0", "ff_net_0_proj", "ff_net_2")
    names = set()
    for block, depth in blocks.items():
        names |= {f"lora_unet_{block}_proj_in", f"lora_unet_{block}_proj_out"}
        names |= {f"lora_unet_{block}_transformer_blocks_{d}_{leaf}" for d in range(depth) for leaf in leaves}
    return names


def test_full_size_adapter_names_and_counts_equal_sd_scripts():
    unet, te1, te2 = _full_size_sdxl()
    unet_side, (te1_side, te2_side) = SDXL.unet_targets, SDXL.text_encoder_targets
    names = [t.lora_name for t in unet_targets(unet, unet_side, include_conv=False)]
    assert len(names) == len(set(names)) == 722
    assert set(names) == _expected_unet_names()
    te1_names = [t.lora_name for t in text_encoder_targets(te1, te1_side)]
    te2_names = [t.lora_name for t in text_encoder_targets(te2, te2_side)]
    assert (len(te1_names), len(te2_names)) == (72, 192)
    assert "lora_te1_text_model_encoder_layers_11_mlp_fc2" in te1_names
    assert "lora_te2_text_model_encoder_layers_31_self_attn_q_proj" in te2_names
    conv = {t.lora_name for t in unet_targets(unet, unet_side, include_conv=True)} - set(names)
    assert {"lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_input_blocks_1_0_out_layers_3",
            "lora_unet_input_blocks_1_0_emb_layers_1", "lora_unet_input_blocks_4_0_skip_connection",
            "lora_unet_input_blocks_3_0_op", "lora_unet_output_blocks_2_2_conv",
            "lora_unet_middle_block_2_in_layers_2"} <= conv
    assert not any("time_embed" in n or "label_emb" in n or n.endswith(("input_blocks_0_0", "out_2")) for n in conv)


def test_pooled_output_is_taken_at_the_first_eos():
    te2 = SDXL.build_tiny("tiny-sdxl").text_encoders[1]
    hidden = torch.randn(2, 5, 64)
    ids = torch.tensor([[49406, 320, 49407, 49407, 49407], [49406, 49409, 49407, 0, 0]])  # a TI token above EOS
    pooled = _pool(te2, hidden, ids, eos=49407)
    with torch.no_grad():
        assert torch.equal(pooled, te2.text_projection(hidden[[0, 1], [2, 2]]))


@pytest.mark.parametrize("max_token_length, tokens", [(None, 77), (150, 152), (225, 227)])
def test_prompt_encoding_concatenates_te1_layer_11_and_te2_penultimate(tiny_parts, max_token_length, tokens):
    parts = tiny_parts["tiny-sdxl"]
    te1, te2 = parts.text_encoders
    encoder = SDXL.prompt_encoder(parts, clip_skip=None, max_token_length=max_token_length)
    with torch.no_grad():
        text = encoder.conditioning(["a photo of sks dog"])
    assert text.hidden.shape == (1, tokens, 32 + 64) and text.pooled.shape == (1, 64)
    if max_token_length is None:
        ids1, ids2 = encoder.tokenize(["a photo of sks dog"])
        with torch.no_grad():
            layer11 = te1(ids1[:, 0], output_hidden_states=True).hidden_states[11]
            penultimate = te2(ids2[:, 0], output_hidden_states=True).hidden_states[-2]
        assert torch.equal(text.hidden, torch.cat([layer11, penultimate], dim=-1))
        assert ids2[0, 0, -1] == 0 and ids1[0, 0, -1] == 49407  # TE2 pads with "!" (0), TE1 with EOS


def test_size_conditioning_is_sd_scripts_letterbox_crop_in_hw_order():
    # sd-scripts#1443's example: bucket 512x2048 (w, h), image 512x4096 -> crop_ltrb (128, 0, 384, 2048).
    c = image_conditioning((512, 4096), (512, 2048), flipped=False)
    assert c == ImageConditioning(original_size=(4096, 512), crop_top_left=(0, 128), target_size=(2048, 512))
    flipped = image_conditioning((512, 4096), (512, 2048), flipped=True)
    assert flipped.crop_top_left == (0, 512 - 384)
    ids = time_ids([c, flipped], "cpu", torch.float32)
    assert ids.tolist() == [[4096, 512, 0, 128, 2048, 512], [4096, 512, 0, 128, 2048, 512]]


def test_time_ids_change_the_prediction(tiny_parts):
    parts = tiny_parts["tiny-sdxl"]
    text = SDXL.prompt_encoder(parts, clip_skip=None, max_token_length=None).conditioning(["a"])
    latents, t = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    with torch.no_grad():
        a = SDXL.predict(parts.unet, latents, t, text, [ImageConditioning((32, 32), (0, 0), (32, 32))])
        b = SDXL.predict(parts.unet, latents, t, text, [ImageConditioning((64, 32), (0, 0), (32, 32))])
    assert not torch.equal(a, b)


def test_a_loaded_sdxl_file_keeps_logit_scale_and_round_trips_bytes(tiny_parts, tmp_path):
    from safetensors.torch import load_file, save_file

    parts = tiny_parts["tiny-sdxl"]
    first = save_model(parts, tmp_path / "a.safetensors")
    sd = load_file(str(first))
    sd[TE2_PREFIX + "logit_scale"] = torch.tensor(4.6)
    save_file(sd, str(tmp_path / "b.safetensors"))
    again = save_model(load_components(str(tmp_path / "b.safetensors")), tmp_path / "c.safetensors")
    resaved = load_file(str(again))
    assert resaved.keys() == sd.keys() and all(torch.equal(resaved[k], sd[k]) for k in sd)


def test_third_party_network_modules_see_sd_scripts_sgm_named_sdxl_unet(tiny_parts):
    """sd-scripts hands a --network_module its own SDXL UNet (SGM paths, its class names) and both text encoders."""
    from networks.plugin import network_trees

    parts = tiny_parts["tiny-sdxl"]
    text_encoders, unet = network_trees("lycoris.kohya", parts.network_text_encoder, parts.unet)
    modules = dict(unet.named_modules())
    assert type(unet).__name__ == "SdxlUNet2DConditionModel"
    assert modules["input_blocks.4.1.transformer_blocks.0.attn1.to_q"] is \
        parts.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    assert type(modules["input_blocks.4.1"]).__name__ == "Transformer2DModel"
    assert type(modules["input_blocks.4.0"]).__name__ == "ResnetBlock2D"
    assert type(modules["input_blocks.3.0"]).__name__ == "Downsample2D" and "input_blocks.3.0.op" in modules
    assert type(modules["output_blocks.2.2"]).__name__ == "Upsample2D" and "output_blocks.2.2.conv" in modules
    assert type(modules["input_blocks.4.1.transformer_blocks.0.attn2"]).__name__ == "CrossAttention"
    assert not any(n.startswith(("down_blocks", "up_blocks", "mid_block", "conv_in")) for n in modules)
    # Every weight of the UNet is in the view, once, as the same tensor object (nothing copied).
    assert {id(p) for p in unet.parameters()} == {id(p) for p in parts.unet.parameters()}
    assert len(list(unet.parameters())) == len(list(parts.unet.parameters()))
    assert [dict(te.named_modules())["text_model.encoder.layers.0.self_attn.q_proj"] for te in text_encoders] == [
        te.text_model.encoder.layers[0].self_attn.q_proj if hasattr(te, "text_model") else
        te.encoder.layers[0].self_attn.q_proj for te in parts.text_encoders]
    assert network_trees("networks.lora", parts.network_text_encoder, parts.unet)[1] is parts.unet


def test_a_v_pred_marker_makes_a_v_prediction_model(tiny_parts, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    file = save_model(tiny_parts["tiny-sdxl"], tmp_path / "a.safetensors")
    sd = load_file(str(file))
    assert load_components(str(file)).v_parameterization is False
    save_file(sd | {"v_pred": torch.tensor([])}, str(tmp_path / "v.safetensors"))
    loaded = load_components(str(tmp_path / "v.safetensors"))
    assert loaded.v_parameterization is True
    assert "v-prediction SDXL" in capsys.readouterr().out
    with safe_open(str(save_model(loaded, tmp_path / "again.safetensors")), "pt") as f:
        assert "v_pred" in f.keys()  # kept for ComfyUI


def test_gen_img_generates_with_an_sdxl_lora_and_refuses_sd_embeddings(tiny_parts, tmp_path, capsys):
    from safetensors.torch import save_file

    from networks.lora import create_network
    from tools import gen_img

    parts = SDXL.build_tiny("tiny-sdxl")
    network = create_network(1.0, 4, 4, None, parts.network_text_encoder, parts.unet)
    lora = tmp_path / "l.safetensors"
    network.save_weights(str(lora))
    args = ["--ckpt", "tiny-sdxl", "--prompt", "a cat", "--outdir", str(tmp_path / "out"), "--W", "64", "--H", "64",
            "--steps", "2", "--scale", "5", "--seed", "1", "--device", "cpu"]
    gen_img.main(args + ["--network_weights", str(lora)])
    assert len(list((tmp_path / "out").glob("*.png"))) == 1
    save_file({"emb_params": torch.zeros(1, 32)}, str(tmp_path / "e.safetensors"))
    with pytest.raises(SystemExit) as exit_info:
        gen_img.main(args + ["--textual_inversion_embeddings", str(tmp_path / "e.safetensors")])
    assert exit_info.value.code == 2 and "SDXL embeddings" in capsys.readouterr().err


@pytest.mark.parametrize("script, model, phrase", [
    ("train_network", "tiny-sdxl", "trains SD 1.x / SD 2.x models; use sdxl_train_network.py"),
    ("sdxl_train_network", "tiny-sd1", "trains SDXL models; use train_network.py"),
    ("train_textual_inversion", "tiny-sdxl", "trains SD 1.x / SD 2.x models; use sdxl_train_textual_inversion.py"),
    ("train_db", "tiny-sdxl", "trains SD 1.x / SD 2.x models; use sdxl_train.py"),
    ("train_hypernetwork", "tiny-sdxl", "SDXL is not supported by this script yet"),
])
def test_each_script_refuses_a_family_it_does_not_train(script, model, phrase, image_folder, tmp_path, capsys):
    import importlib

    from tests.helpers import tiny_lora_flags

    flags = tiny_lora_flags(image_folder(count=1).parent, tmp_path / "out", steps=1)
    flags[flags.index("tiny-sd1")] = model
    if script in ("train_db", "train_textual_inversion", "train_hypernetwork"):
        flags = [f for f in flags if f not in ("--network_dim", "4")]
        flags += ["--token_string", "mychar", "--init_word", "cat"] if script == "train_textual_inversion" else []
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(script).main(flags)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and phrase in err, err


def test_block_wise_network_args_use_sd_scripts_23_sdxl_blocks(tiny_parts):
    """block_dims & co. take 23 values on SDXL (embeddings, input_blocks 0-8, middle_block 0-2, output_blocks 0-8,
    out); down/up_lr_weight 9 and mid_lr_weight 3 (sd-scripts' networks/lora.py with is_sdxl)."""
    from library.errors import UserError
    from networks.injection import sgm_block_index
    from networks.lora import create_network

    parts = tiny_parts["tiny-sdxl"]
    dims = ["0"] + ["2"] * 9 + ["3"] * 3 + ["5"] * 9 + ["0"]
    network = create_network(1.0, 4, 4, None, parts.network_text_encoder, parts.unet, block_dims=",".join(dims))
    assert network.unet_loras
    for module in network.unet_loras:
        index = sgm_block_index(module.lora_name)
        assert module.dim == (2 if index <= 9 else 3 if index <= 12 else 5), module.lora_name
    assert {m.dim for m in network.text_encoder_loras} == {4}
    # The adapter-name map agrees with sdxl_train.py's --block_lr map of the same layers (derived from module paths).
    block_of = parts.family.unet_block_of(parts.unet)
    for module in network.unet_loras:
        path = next(n for n, m in parts.unet.named_modules() if m is module.org_module)
        assert block_of(path + ".weight") == sgm_block_index(module.lora_name), module.lora_name
    with pytest.raises(UserError, match="block_dims: needs 23 comma-separated values for SDXL models"):
        create_network(1.0, 4, 4, None, parts.network_text_encoder, parts.unet, block_dims=",".join(["4"] * 25))

    weighted = create_network(1.0, 4, 4, None, parts.network_text_encoder, parts.unet, conv_dim="2",
                              down_lr_weight="zeros", mid_lr_weight="0.5,0.25", up_lr_weight="linear")
    groups, names = weighted.prepare_optimizer_params(None, 1e-4, None)
    lrs = dict(zip(names, (g.get("lr") for g in groups)))
    assert not any(n.startswith("unet ") and 1 <= int(n.split()[1]) <= 9 for n in names)  # zero-weight IN blocks
    assert lrs["unet 10"] == pytest.approx(5e-5) and lrs["unet 11"] == pytest.approx(2.5e-5)
    assert lrs["unet 12"] == pytest.approx(1e-4)  # mid_lr_weight padded with 1.0 to 3 values, as sd-scripts does
    assert lrs["unet 21"] == pytest.approx(1e-4) and lrs["unet 17"] == pytest.approx(1e-4 * 4 / 8)
    assert "unet 13" not in lrs  # linear ramp: output_blocks 0 weighs 0


