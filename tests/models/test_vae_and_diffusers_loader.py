"""--vae replacement from every VAE layout, and diffusers' own single-file loader reading our files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from library.models import ldm_convert as lc
from library.models.loading import load_components
from library.models.saving import save_single_file
from library.models.tiny import build_tiny
from tests.helpers import assert_same_tensors


@pytest.fixture(scope="module")
def other_vae():
    return build_tiny("tiny-sd1", seed=7).vae


def _write_vae(kind: str, vae, tmp_path):
    if kind == "diffusers_folder":
        vae.save_pretrained(tmp_path / "vae_folder")
        return tmp_path / "vae_folder"
    ldm = lc.vae_to_ldm(vae.state_dict(), vae.config)
    if kind == "ldm_ckpt":  # like vae-ft-mse-840000-ema-pruned.ckpt: bare ldm keys in a state_dict
        torch.save({"state_dict": ldm}, tmp_path / "vae.ckpt")
        return tmp_path / "vae.ckpt"
    if kind == "ldm_prefixed":
        save_file(lc.add_prefix(ldm, lc.VAE_PREFIX), str(tmp_path / "vae.safetensors"))
        return tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    return tmp_path / "diffusion_pytorch_model.safetensors"


@pytest.mark.parametrize("kind", ["ldm_ckpt", "ldm_prefixed", "diffusers_file", "diffusers_folder"])
def test_vae_replaces_the_models_vae(kind, other_vae, tiny_files, tmp_path):
    vae_path = _write_vae(kind, other_vae, tmp_path)
    parts = load_components(str(tiny_files["tiny-sd1"]["safetensors"]), vae=str(vae_path))
    assert_same_tensors(parts.vae.state_dict(), other_vae.state_dict())
    # and the replaced VAE is what a saved checkpoint carries
    save_single_file(parts, tmp_path / "with_vae.safetensors")
    assert_same_tensors(load_components(str(tmp_path / "with_vae.safetensors")).vae.state_dict(), other_vae.state_dict())


def test_a_lora_as_vae_is_a_clear_error(tiny_files, tmp_path):
    from library.errors import UserError

    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(tmp_path / "l.safetensors"))
    with pytest.raises(UserError, match="not a VAE"):
        load_components(str(tiny_files["tiny-sd1"]["safetensors"]), vae=str(tmp_path / "l.safetensors"))


@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sd2"])
def test_diffusers_single_file_loader_reads_our_file_with_identical_weights(name, tiny_parts, tiny_files, tmp_path):
    from diffusers import StableDiffusionPipeline

    save_single_file(tiny_parts[name], tmp_path / "ours.safetensors")
    # `config` points at a local diffusers folder of the same architecture, so diffusers needs no network.
    pipe = StableDiffusionPipeline.from_single_file(str(tmp_path / "ours.safetensors"),
                                                    config=str(tiny_files[name]["diffusers"]), local_files_only=True)
    for part in ("unet", "vae", "text_encoder"):
        assert_same_tensors(getattr(pipe, part).state_dict(), getattr(tiny_parts[name], part).state_dict())
