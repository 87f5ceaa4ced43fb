"""networks/lora_layouts.py: kohya LoRA/LoCon -> diffusers/peft layout loads in diffusers and acts as ours; and back."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from library.errors import UserError
from networks import loha, lora
from networks.injection import text_encoder_targets, unet_targets
from networks.lora_layouts import kohya_name, kohya_to_peft, peft_module_path, peft_scales, peft_to_kohya
from tests.conftest import GOLDEN

pytestmark = pytest.mark.usefixtures("one_torch_thread")
# LoRA alpha 2 of rank 4 (scale 0.5); LoCon adds 3×3 convs at rank 2, alpha 1 (another scale and another rank).
NETWORKS = {"lora": {}, "locon": {"conv_dim": "2", "conv_alpha": "1"}}


def make_kohya_file(parts, path, kind: str = "lora", seed: int = 0):
    """Save a LoRA/LoCon with seeded non-zero weights, built on a copy of `parts`; returns the kohya tensors."""
    model = copy.deepcopy(parts)
    network = lora.create_network(1.0, 4, 2, None, model.text_encoder, model.unet, **NETWORKS[kind])
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in network.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    network.save_weights(str(path), torch.float32, {})
    return network.state_dict()


def diffusers_pipeline(parts):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    parts = copy.deepcopy(parts)
    return StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                   unet=parts.unet, scheduler=DDIMScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def assert_diffusers_acts_as_ours(parts, kohya_file, diffusers_path, caplog):
    """Load `diffusers_path` with load_lora_weights and compare with our network applied from `kohya_file`."""
    ours = copy.deepcopy(parts)
    network = lora.create_network_from_weights(1.0, str(kohya_file), None, ours.text_encoder, ours.unet)
    network.load_weights(str(kohya_file))
    network.apply_to(ours.text_encoder, ours.unet)
    pipe = diffusers_pipeline(parts)
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(str(diffusers_path))
    assert not [r for r in caplog.records if "lora" in r.getMessage().lower()], "diffusers warned about keys"
    assert _count_injected(pipe.unet) == len(network.unet_loras)
    assert _count_injected(pipe.text_encoder) == len(network.text_encoder_loras)

    ids = parts.tokenizer(["a photo of sks dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    x, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([321])
    with torch.no_grad():
        te_ours, te_theirs = ours.text_encoder(ids)[0], pipe.text_encoder(ids)[0]
        assert (te_ours - parts.text_encoder(ids)[0]).abs().max() > 1e-3  # the adapter does something
        torch.testing.assert_close(te_theirs, te_ours, atol=1e-5, rtol=0)
        unet_ours, unet_theirs = ours.unet(x, t, te_ours).sample, pipe.unet(x, t, te_ours).sample
        assert (unet_ours - parts.unet(x, t, te_ours).sample).abs().max() > 1e-3
        torch.testing.assert_close(unet_theirs, unet_ours, atol=1e-5, rtol=0)


def delta_weights(kohya: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each module's ΔW = up·down·alpha/rank, as a (out, in·k·k) matrix in float64."""
    out = {}
    for key in kohya:
        if key.endswith(".lora_down.weight"):
            name = key.removesuffix(".lora_down.weight")
            down, up = kohya[key].double(), kohya[f"{name}.lora_up.weight"].double()
            scale = float(kohya[f"{name}.alpha"]) / down.shape[0]
            out[name] = up.flatten(1) @ down.flatten(1) * scale
    return out


def assert_same_deltas(a: dict, b: dict) -> None:
    da, db = delta_weights(a), delta_weights(b)
    assert da.keys() == db.keys()
    for name in da:
        assert float((da[name] - db[name]).norm() / db[name].norm()) < 1e-6, name


def _count_injected(model) -> int:
    return len([n for n, _ in model.named_modules() if n.endswith("lora_A")])


@pytest.mark.parametrize("kind", list(NETWORKS))
def test_diffusers_load_lora_weights_of_converted_file_matches_ours(kind, tiny_parts, tmp_path, caplog):
    parts = tiny_parts["tiny-sd1"]
    kohya = make_kohya_file(parts, tmp_path / "kohya.safetensors", kind)
    unet_sd, te_sd, info = kohya_to_peft(kohya)
    assert info.algorithm == "lora" and bool(info.conv_modules) == (kind == "locon")
    assert all(k.startswith("text_encoder.text_model.encoder.layers.") for k in te_sd)  # the hub files' spelling
    (tmp_path / "diffusers").mkdir()
    save_file({**unet_sd, **te_sd}, str(tmp_path / "diffusers" / "pytorch_lora_weights.safetensors"))
    assert_diffusers_acts_as_ours(parts, tmp_path / "kohya.safetensors", tmp_path / "diffusers", caplog)


@pytest.mark.parametrize("kind", list(NETWORKS))
def test_round_trip_keeps_every_modules_delta_weight(kind, tiny_parts, tmp_path):
    kohya = make_kohya_file(tiny_parts["tiny-sd2"], tmp_path / "kohya.safetensors", kind)
    unet_sd, te_sd, _ = kohya_to_peft(kohya)
    back = peft_to_kohya(unet_sd, te_sd)
    assert back.keys() == kohya.keys()
    assert all(float(back[k]) == back[k.replace(".alpha", ".lora_down.weight")].shape[0]
               for k in back if k.endswith(".alpha"))  # alpha = rank: the scale sits in lora_up now
    assert_same_deltas(back, kohya)


def test_lora_b_holds_the_scale_and_lora_a_is_lora_down(tiny_parts, tmp_path):
    kohya = make_kohya_file(tiny_parts["tiny-sd1"], tmp_path / "kohya.safetensors")
    unet_sd, _, _ = kohya_to_peft(kohya)
    name, path = "lora_unet_mid_block_attentions_0_proj_in", "unet.mid_block.attentions.0.proj_in"
    assert torch.equal(unet_sd[f"{path}.lora_A.weight"], kohya[f"{name}.lora_down.weight"])
    torch.testing.assert_close(unet_sd[f"{path}.lora_B.weight"], kohya[f"{name}.lora_up.weight"] * 0.5)


@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sd2"])
def test_every_target_maps_to_its_module_path_and_back(name, tiny_parts):
    parts = tiny_parts[name]
    checked = 0
    unet_side, (te_side,) = parts.family.unet_targets, parts.family.text_encoder_targets
    for component, model, targets in (("unet", parts.unet, unet_targets(parts.unet, unet_side, include_conv=True)),
                                      ("text_encoder", parts.text_encoder,
                                       text_encoder_targets(parts.text_encoder, te_side))):
        paths = {id(m): n for n, m in model.named_modules()}
        for target in targets:
            got_component, path = peft_module_path(target.lora_name)
            expected = paths[id(target.module)]
            assert (got_component, path) == (component, expected if component == "unet" else f"text_model.{expected}")
            assert kohya_name(component, path) == target.lora_name
            checked += 1
    assert checked > 100


def test_sd_scripts_sd15_names_all_map_and_come_back():
    golden = json.loads((GOLDEN / "sd-scripts-lora-sd15-rank16.json").read_text())["tensors"]
    names = {k.removesuffix(".lora_down.weight") for k in golden if k.endswith(".lora_down.weight")}
    assert len(names) == 72 + 192  # text encoder, UNet
    for name in names:
        assert kohya_name(*peft_module_path(name)) == name


def test_text_encoder_paths_in_transformers_5_spelling_are_read_too():
    assert kohya_name("text_encoder", "encoder.layers.3.self_attn.out_proj") == \
        "lora_te_text_model_encoder_layers_3_self_attn_out_proj"


def test_peft_scales_follow_lora_alpha_and_patterns():
    config = {"r": 4, "lora_alpha": 2, "rank_pattern": {"conv1": 2}, "alpha_pattern": {"conv1": 4}}
    scales = peft_scales(["unet.a.to_q", "unet.b.resnets.0.conv1"], config, "unet")
    assert scales == {"unet.a.to_q": 0.5, "unet.b.resnets.0.conv1": 2.0}


def test_loha_and_unknown_modules_are_user_errors(tiny_parts):
    parts = copy.deepcopy(tiny_parts["tiny-sd1"])
    network = loha.create_network(1.0, 2, 1, None, parts.text_encoder, parts.unet)
    with pytest.raises(UserError, match="loha network; only LoRA/LoCon"):
        kohya_to_peft(network.state_dict(), source="x.safetensors")
    stray = {"lora_unet_time_embedding_linear_1.lora_down.weight": torch.zeros(2, 4),
             "lora_unet_time_embedding_linear_1.lora_up.weight": torch.zeros(4, 2)}
    with pytest.raises(UserError, match="lora_unet_time_embedding_linear_1 is not a module"):
        kohya_to_peft(stray)
    with pytest.raises(UserError, match="not a module"):
        peft_to_kohya({"unet.conv_in.lora_A.weight": torch.zeros(2, 4),
                       "unet.conv_in.lora_B.weight": torch.zeros(4, 2)}, {})


def test_extra_tensors_of_a_module_are_refused_not_dropped():
    name = "lora_unet_mid_block_attentions_0_proj_in"
    sd = {f"{name}.lora_down.weight": torch.zeros(2, 4), f"{name}.lora_up.weight": torch.zeros(4, 2),
          f"{name}.dora_scale": torch.ones(1, 4)}
    with pytest.raises(UserError, match="dora_scale is not a plain LoRA tensor"):
        kohya_to_peft(sd)
