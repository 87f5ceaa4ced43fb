"""Load -> save round trips are tensor-exact for tiny SD 1.x and SD 2.x, in every direction and format."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.models import ldm_convert as lc
from library.models.checkpoint_io import read_state_dict
from library.models.loading import load_components
from library.models.saving import save_diffusers, save_single_file, to_ldm_state_dict
from tests.helpers import assert_same_tensors

MODELS = ["tiny-sd1", "tiny-sd2"]


def _module_tensors(parts) -> dict[str, torch.Tensor]:
    out = {}
    for name in ("unet", "vae", "text_encoder"):
        out |= {f"{name}.{k}": v for k, v in getattr(parts, name).state_dict().items()}
    return out


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("fmt", ["safetensors", "ckpt", "diffusers"])
def test_every_format_loads_the_same_weights(name, fmt, tiny_parts, tiny_files):
    loaded = load_components(str(tiny_files[name][fmt]))
    assert loaded.family.name == ("sd2" if name == "tiny-sd2" else "sd1")
    assert_same_tensors(_module_tensors(loaded), _module_tensors(tiny_parts[name]))
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.unet.config) == public(tiny_parts[name].unet.config)
    assert loaded.text_encoder.config.num_hidden_layers == tiny_parts[name].text_encoder.config.num_hidden_layers


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("src_fmt, dst_name", [("safetensors", "out.safetensors"), ("ckpt", "out.ckpt"),
                                                ("safetensors", "out.ckpt"), ("ckpt", "out.safetensors")])
def test_single_file_round_trip_is_exact(name, src_fmt, dst_name, tiny_files, tmp_path):
    src = tiny_files[name][src_fmt]
    save_single_file(load_components(str(src)), tmp_path / dst_name)
    original, _ = read_state_dict(src)
    written, _ = read_state_dict(tmp_path / dst_name)
    assert_same_tensors(written, original)


@pytest.mark.parametrize("name", MODELS)
def test_diffusers_to_single_file_to_diffusers_is_exact(name, tiny_files, tmp_path):
    src = tiny_files[name]["diffusers"]
    save_single_file(load_components(str(src)), tmp_path / "mid.safetensors")
    save_diffusers(load_components(str(tmp_path / "mid.safetensors")), tmp_path / "back")
    for part in ("unet", "vae", "text_encoder"):
        original = load_file(str(src / part / _weights(src / part)))
        again = load_file(str(tmp_path / "back" / part / _weights(tmp_path / "back" / part)))
        assert_same_tensors(again, original)
    # The pipeline folder is complete: diffusers itself loads it.
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "back"), local_files_only=True)
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def _weights(folder) -> str:
    names = [p.name for p in folder.glob("*.safetensors")]
    assert len(names) == 1, names
    return names[0]


def test_sd2_unused_openclip_tensors_survive_a_round_trip(tiny_files, tmp_path):
    """The last OpenCLIP block, text_projection and logit_scale are never used by SD 2.x but must be kept."""
    original, _ = read_state_dict(tiny_files["tiny-sd2"]["safetensors"])
    last_block = [k for k in original if k.startswith("cond_stage_model.model.transformer.resblocks.2.")]
    assert last_block and "cond_stage_model.model.text_projection" in original
    parts = load_components(str(tiny_files["tiny-sd2"]["safetensors"]))
    assert parts.text_encoder.config.num_hidden_layers == 2  # penultimate-layer conditioning: 3 blocks -> 2 layers
    # Make the unused tensors distinctive, so a dummy written in their place would show.
    parts.text_encoder_extras = {k: v + 1 for k, v in parts.text_encoder_extras.items()}
    written = to_ldm_state_dict(parts)
    for key in last_block + ["cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale"]:
        assert torch.equal(written[key], original[key] + 1), key


def test_sd2_from_diffusers_gets_dummy_last_block_like_sd_scripts(tiny_files):
    parts = load_components(str(tiny_files["tiny-sd2"]["diffusers"]))
    written = to_ldm_state_dict(parts)
    prefix = "cond_stage_model.model.transformer.resblocks."
    for key in [k for k in written if k.startswith(prefix + "1.")]:
        assert torch.equal(written[key.replace(prefix + "1.", prefix + "2.")], written[key])
    assert written["cond_stage_model.model.text_projection"].shape == (32, 32)


@pytest.mark.parametrize("precision, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16), ("float", torch.float32)])
def test_save_precision(precision, dtype, tiny_files, tmp_path):
    src = tiny_files["tiny-sd1"]["safetensors"]
    save_single_file(load_components(str(src)), tmp_path / "m.safetensors", precision=precision)
    original, _ = read_state_dict(src)
    written, _ = read_state_dict(tmp_path / "m.safetensors")
    assert_same_tensors(written, {k: v.to(dtype) for k, v in original.items()})


def test_default_precision_keeps_the_source_dtype(tiny_files, tmp_path):
    src = tiny_files["tiny-sd1"]["safetensors"]
    half = {k: v.half() for k, v in read_state_dict(src)[0].items()}
    save_file(half, str(tmp_path / "half.safetensors"))
    parts = load_components(str(tmp_path / "half.safetensors"))
    assert parts.unet.dtype == torch.float32  # trained in float32 ...
    save_single_file(parts, tmp_path / "again.ckpt", precision=None)
    assert_same_tensors(read_state_dict(tmp_path / "again.ckpt")[0], half)  # ... saved back as it came


def test_ckpt_wrapper_ema_schedule_buffers_and_missing_text_model_prefix(tiny_files, tmp_path):
    """Real-world single files: nested state_dict, model_ema.*, schedule buffers, `transformer.` without `text_model.`."""
    original, _ = read_state_dict(tiny_files["tiny-sd1"]["safetensors"])
    messy = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
             for k, v in original.items()}
    messy |= {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(10),
              "betas": torch.linspace(0, 1, 1000), "alphas_cumprod": torch.linspace(1, 0, 1000),
              "cond_stage_model.transformer.embeddings.position_ids": torch.arange(77)[None]}
    messy |= {"model_ema." + k.removeprefix(lc.UNET_PREFIX).replace(".", ""): v + 1
              for k, v in original.items() if k.startswith(lc.UNET_PREFIX)}
    torch.save({"state_dict": {"state_dict": messy}, "epoch": 3, "global_step": 100}, tmp_path / "messy.ckpt")
    save_single_file(load_components(str(tmp_path / "messy.ckpt")), tmp_path / "clean.safetensors")
    assert_same_tensors(read_state_dict(tmp_path / "clean.safetensors")[0], original)


def test_ckpt_written_with_epoch_and_step(tiny_parts, tmp_path):
    save_single_file(tiny_parts["tiny-sd1"], tmp_path / "m.ckpt", epoch=4, global_step=321)
    raw = torch.load(tmp_path / "m.ckpt", weights_only=True)
    assert (raw["epoch"], raw["global_step"]) == (4, 321)
    assert any(k.startswith(lc.UNET_PREFIX) for k in raw["state_dict"])


def test_safetensors_carries_modelspec_metadata(tiny_parts, tmp_path):
    save_single_file(tiny_parts["tiny-sd2"], tmp_path / "my model.safetensors")
    _, meta = read_state_dict(tmp_path / "my model.safetensors")
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-512"
    assert meta["modelspec.title"] == "my model"
    assert meta["modelspec.prediction_type"] == "epsilon"


def test_v_parameterization_is_carried_into_saved_files(tiny_files, tmp_path):
    parts = load_components(str(tiny_files["tiny-sd2"]["safetensors"]), v_parameterization=True)
    assert parts.base_model_version == "sd_v2_v"
    save_single_file(parts, tmp_path / "v.safetensors")
    assert read_state_dict(tmp_path / "v.safetensors")[1]["modelspec.architecture"] == "stable-diffusion-v2-768-v"
    save_diffusers(parts, tmp_path / "v_folder")
    # A diffusers folder says it in its scheduler config, so no flag is needed to load it back.
    assert load_components(str(tmp_path / "v_folder")).v_parameterization is True
    assert load_components(str(tiny_files["tiny-sd2"]["diffusers"])).v_parameterization is False
