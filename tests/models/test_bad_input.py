"""Bad input ends with one line naming the file and the problem, exit code 2, no traceback — and loses nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from library.models.loading import load_components
from library.errors import UserError
from library.models.saving import save_single_file
from tests.conftest import ROOT
from tools import convert_model


def _bad_inputs(tmp: Path, tiny_files) -> dict[str, tuple[Path, str]]:
    """case -> (path given as the base model, phrase the error must contain)."""
    (tmp / "no_index").mkdir()
    (tmp / "no_index" / "unet").mkdir()
    lora = tmp / "my_lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4),
               "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}, str(lora))
    emb_pt = tmp / "embedding.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.zeros(2, 768)}, "name": "x", "step": 5}, emb_pt)
    emb_st = tmp / "embedding.safetensors"
    save_file({"emb_params": torch.zeros(2, 768)}, str(emb_st))
    truncated = tmp / "truncated.safetensors"
    truncated.write_bytes(tiny_files["tiny-sd1"]["safetensors"].read_bytes()[:100_000])
    truncated_ckpt = tmp / "truncated.ckpt"
    truncated_ckpt.write_bytes(tiny_files["tiny-sd1"]["ckpt"].read_bytes()[:100_000])
    unknown = tmp / "unknown.safetensors"
    save_file({"transformer.blocks.0.weight": torch.zeros(2, 2)}, str(unknown))
    sdxl = tmp / "sdxl.safetensors"
    save_file({"conditioner.embedders.0.model.ln_final.weight": torch.zeros(2),
               "model.diffusion_model.label_emb.0.0.weight": torch.zeros(2, 2)}, str(sdxl))  # the refiner's layout
    vae = tmp / "vae.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(2, 3, 3, 3), "decoder.conv_in.weight": torch.zeros(2, 4, 3, 3)},
              str(vae))
    (tmp / "sdxl_folder").mkdir()
    (tmp / "sdxl_folder" / "model_index.json").write_text(
        '{"_class_name": "StableDiffusionXLImg2ImgPipeline", "text_encoder": [null, null]}')
    return {
        "missing": (tmp / "nope" / "model.safetensors", "no such file"),
        "no_model_index": (tmp / "no_index", "no model_index.json"),
        "lora": (lora, "LoRA"),
        "embedding_pt": (emb_pt, "textual-inversion embedding"),
        "embedding_safetensors": (emb_st, "textual-inversion embedding"),
        "truncated": (truncated, "truncated or corrupt"),
        "truncated_ckpt": (truncated_ckpt, "truncated or corrupt"),
        "unknown_architecture": (unknown, "unknown architecture"),
        "sdxl": (sdxl, "an SDXL refiner"),
        "vae": (vae, "a VAE, not a full model"),
        "sdxl_folder": (tmp / "sdxl_folder", "an SDXL refiner"),
    }


CASES = ["missing", "no_model_index", "lora", "embedding_pt", "embedding_safetensors", "truncated", "truncated_ckpt",
         "unknown_architecture", "sdxl", "vae", "sdxl_folder"]


@pytest.mark.parametrize("case", CASES)
def test_bad_base_model_is_one_line_exit_2(case, tiny_files, tmp_path, capsys):
    path, phrase = _bad_inputs(tmp_path, tiny_files)[case]
    with pytest.raises(SystemExit) as exit_info:
        convert_model.main([str(path), str(tmp_path / "out" / "model.safetensors")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert str(path) in err and phrase in err, err
    assert not (tmp_path / "out").exists()  # nothing half-done left behind


def test_real_process_prints_no_traceback(tiny_files, tmp_path):
    path, _ = _bad_inputs(tmp_path, tiny_files)["lora"]
    proc = subprocess.run([sys.executable, "tools/convert_model.py", str(path), str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {path}: this file is a LoRA")


def test_v2_flag_on_sd1_model_is_a_clear_error(tiny_files):
    with pytest.raises(UserError, match="--v2 was given but this is an SD 1.x model"):
        load_components(str(tiny_files["tiny-sd1"]["safetensors"]), v2=True)


def test_old_lightning_ckpt_is_read_without_running_its_pickles(tiny_files, tmp_path, monkeypatch):
    """Old .ckpt files pickle Lightning callbacks; they load (classes stubbed) without Lightning installed."""
    import types

    fake = types.ModuleType("pytorch_lightning.callbacks")

    class ModelCheckpoint:  # stands in for the real Lightning class when the file is written
        pass

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = "pytorch_lightning.callbacks", "ModelCheckpoint"
    fake.ModelCheckpoint = ModelCheckpoint
    monkeypatch.setitem(sys.modules, "pytorch_lightning", types.ModuleType("pytorch_lightning"))
    monkeypatch.setitem(sys.modules, "pytorch_lightning.callbacks", fake)
    sd = torch.load(tiny_files["tiny-sd1"]["ckpt"], weights_only=True)["state_dict"]
    torch.save({"state_dict": sd, "callbacks": {"cb": ModelCheckpoint()}}, tmp_path / "old.ckpt")
    monkeypatch.delitem(sys.modules, "pytorch_lightning.callbacks")
    monkeypatch.delitem(sys.modules, "pytorch_lightning")
    parts = load_components(str(tmp_path / "old.ckpt"))
    assert parts.unet.config.cross_attention_dim == 32


def test_ckpt_with_code_in_its_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    torch.save({"state_dict": {"x": Evil()}}, tmp_path / "evil.ckpt")
    with pytest.raises(UserError, match="cannot be read safely"):
        load_components(str(tmp_path / "evil.ckpt"))


def test_saving_over_a_lora_refuses_and_keeps_it(tiny_parts, tmp_path):
    lora = tmp_path / "keep.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 2)}, str(lora))
    before = lora.read_bytes()
    with pytest.raises(UserError, match="refusing to overwrite"):
        save_single_file(tiny_parts["tiny-sd1"], lora)
    assert lora.read_bytes() == before


def test_saving_over_an_older_checkpoint_replaces_it(tiny_parts, tiny_files, tmp_path):
    dst = tmp_path / "model.safetensors"
    dst.write_bytes(tiny_files["tiny-sd2"]["safetensors"].read_bytes())
    save_single_file(tiny_parts["tiny-sd1"], dst)
    assert load_components(str(dst)).family.name == "sd1"


def test_failed_write_leaves_old_file_and_no_temp_files(tiny_parts, tiny_files, tmp_path, monkeypatch):
    import library.models.saving as saving

    dst = tmp_path / "model.safetensors"
    dst.write_bytes(tiny_files["tiny-sd2"]["safetensors"].read_bytes())
    before = dst.read_bytes()

    def crash(sd, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(saving, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_single_file(tiny_parts["tiny-sd1"], dst)
    assert dst.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
