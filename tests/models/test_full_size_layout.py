"""Full-size SD 1.5 / SD 2.1 shapes: the files we write match sd-scripts' layout, and configs are inferred exactly.

The fast tests build the models on the meta device (shapes, no memory); the slow one uses real random weights.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from library.models import ldm_convert as lc
from library.models.components import Components
from library.models.sd1 import SD1, SD2
from library.models.ldm_configs import infer_text_config, infer_unet_config, infer_vae_config
from tests.conftest import GOLDEN

# The published diffusers configs of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1
# (only the fields that differ from diffusers' defaults), written out so the test needs no network.
SD15_UNET = {"block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768, "attention_head_dim": 8,
             "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
             "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "layers_per_block": 2,
             "in_channels": 4, "out_channels": 4, "norm_num_groups": 32, "use_linear_projection": False}
SD21_UNET = SD15_UNET | {"cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True}
SD_VAE = {"block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
          "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 2, "latent_channels": 4,
          "in_channels": 3, "out_channels": 3, "norm_num_groups": 32, "scaling_factor": 0.18215}
SD15_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
             "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "quick_gelu", "projection_dim": 768}
SD21_TEXT = SD15_TEXT | {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                         "num_hidden_layers": 23, "hidden_act": "gelu", "projection_dim": 512}


def _build(unet_cfg, text_cfg, v2: bool, device: str) -> Components:
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**SD_VAE)
        te = CLIPTextModel(CLIPTextConfig(**text_cfg))
    return Components(unet=unet, vae=vae, text_encoders=(te,), tokenizers=(None,), family=SD2 if v2 else SD1,
                      v_parameterization=False, source="test")


def _assert_inferred(ldm: dict, unet_cfg: dict, text_cfg: dict, v2: bool) -> None:
    unet = infer_unet_config(lc.strip_prefix(ldm, lc.UNET_PREFIX), v2=v2, source="t")
    assert {k: unet[k] for k in unet_cfg} == unet_cfg
    vae = infer_vae_config(lc.strip_prefix(ldm, lc.VAE_PREFIX), source="t", scaling_factor=SD1.latent_scale)
    assert {k: vae[k] for k in SD_VAE} == SD_VAE
    if v2:
        used, _ = lc.split_openclip(lc.strip_prefix(ldm, lc.OPENCLIP_PREFIX))
        te_sd = lc.openclip_to_transformers(used)
    else:
        te_sd = lc.clip_to_transformers(lc.strip_prefix(ldm, lc.CLIP_PREFIX))
    text = infer_text_config(te_sd, v2=v2, source="t")
    assert {k: text[k] for k in text_cfg} == text_cfg


def test_sd15_single_file_layout_equals_sd_scripts_golden():
    from library.models.saving import to_ldm_state_dict

    ldm = to_ldm_state_dict(_build(SD15_UNET, SD15_TEXT, v2=False, device="meta"))
    golden = json.loads((GOLDEN / "sd-scripts-sd15-single-file.json").read_text())["tensors"]
    assert {k: list(v.shape) for k, v in ldm.items()} == golden
    _assert_inferred(ldm, SD15_UNET, SD15_TEXT, v2=False)


def test_sd21_single_file_layout_and_inferred_configs():
    from library.models.saving import to_ldm_state_dict

    ldm = to_ldm_state_dict(_build(SD21_UNET, SD21_TEXT, v2=True, device="meta"))
    te = lc.strip_prefix(ldm, lc.OPENCLIP_PREFIX)
    # OpenCLIP ViT-H: 24 blocks (the 24th unused by SD 2.x), packed q/k/v, projection and logit scale present.
    assert {int(k.split(".")[2]) for k in te if k.startswith("transformer.resblocks.")} == set(range(24))
    assert te["transformer.resblocks.0.attn.in_proj_weight"].shape == (3072, 1024)
    assert te["positional_embedding"].shape == (77, 1024) and te["text_projection"].shape == (1024, 1024)
    assert ldm["model.diffusion_model.input_blocks.1.1.proj_in.weight"].shape == (320, 320)  # linear in SD 2.x
    _assert_inferred(ldm, SD21_UNET, SD21_TEXT, v2=True)


@pytest.mark.slow
def test_full_size_sd15_random_checkpoint_loads_with_sd15_configs(tmp_path):
    from safetensors.torch import save_file

    from library.models.loading import load_components
    from library.models.saving import to_ldm_state_dict

    torch.manual_seed(0)
    parts = _build(SD15_UNET, SD15_TEXT, v2=False, device="cpu")
    ldm = to_ldm_state_dict(parts, torch.float16)
    save_file(ldm, str(tmp_path / "sd15.safetensors"))
    del parts
    loaded = load_components(str(tmp_path / "sd15.safetensors"), dtype=torch.float16)
    assert {k: loaded.unet.config[k] for k in SD15_UNET} == SD15_UNET
    assert {k: loaded.vae.config[k] for k in SD_VAE} == SD_VAE
    assert {k: getattr(loaded.text_encoder.config, k) for k in SD15_TEXT} == SD15_TEXT
    again = to_ldm_state_dict(loaded)
    assert again.keys() == ldm.keys() and all(torch.equal(again[k], ldm[k]) for k in ldm)
