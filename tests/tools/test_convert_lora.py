"""tools/convert_lora.py: kohya -> diffusers folder or file that load_lora_weights uses as ours, back, and errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from library.models.checkpoint_io import read_state_dict
from networks import loha
from tests.networks.test_lora_layouts import assert_diffusers_acts_as_ours, assert_same_deltas, make_kohya_file
from tools import convert_lora

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def locon_file(tiny_parts, tmp_path):
    make_kohya_file(tiny_parts["tiny-sd1"], tmp_path / "locon.safetensors", "locon")
    return tmp_path / "locon.safetensors"


def _exit_2(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        convert_lora.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1, err
    return err


def test_folder_gets_diffusers_file_that_acts_as_ours_and_converts_back(tiny_parts, locon_file, tmp_path, caplog):
    out = convert_lora.main([str(locon_file), str(tmp_path / "as_diffusers")])
    assert out == tmp_path / "as_diffusers" / "pytorch_lora_weights.safetensors" and out.is_file()
    assert_diffusers_acts_as_ours(tiny_parts["tiny-sd1"], locon_file, tmp_path / "as_diffusers", caplog)

    back = convert_lora.main([str(tmp_path / "as_diffusers"), str(tmp_path / "back.safetensors")])
    original, back_sd = read_state_dict(locon_file)[0], read_state_dict(back)[0]
    assert_same_deltas(back_sd, original)
    with safe_open(str(back), "pt") as f:
        assert f.metadata()["ss_network_dim"] == f.metadata()["ss_network_alpha"] == "Dynamic"  # ranks 4 and 2


def test_safetensors_path_and_precision(tiny_parts, locon_file, tmp_path, caplog):
    out = convert_lora.main([str(locon_file), str(tmp_path / "mine.safetensors"), "--to", "diffusers",
                             "--save_precision", "fp16"])
    weights = read_state_dict(out)[0]
    assert {v.dtype for v in weights.values()} == {torch.float16}
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in weights)
    back = convert_lora.main([str(out), str(tmp_path / "back.pt"), "--to", "kohya", "--save_precision", "float"])
    assert {v.dtype for v in read_state_dict(back)[0].values()} == {torch.float32}


def test_diffusers_adapter_metadata_alpha_is_kept_going_back(tmp_path):
    down, up = torch.randn(2, 8), torch.randn(8, 2)
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps({"unet.r": 2, "unet.lora_alpha": 1})}
    path = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({f"{path}.lora_A.weight": down, f"{path}.lora_B.weight": up}, str(tmp_path / "d.safetensors"),
              metadata=metadata)
    back = read_state_dict(convert_lora.main([str(tmp_path / "d.safetensors"), str(tmp_path / "k.safetensors")]))[0]
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert float(back[f"{name}.alpha"]) == 2
    torch.testing.assert_close(back[f"{name}.lora_up.weight"] @ back[f"{name}.lora_down.weight"], up @ down * 0.5)


def test_loha_is_one_line_exit_2(tiny_parts, tmp_path, capsys):
    import copy

    parts = copy.deepcopy(tiny_parts["tiny-sd1"])
    loha.create_network(1.0, 2, 1, None, parts.text_encoder, parts.unet).save_weights(str(tmp_path / "h.safetensors"))
    assert "loha network; only LoRA/LoCon" in _exit_2([str(tmp_path / "h.safetensors"), str(tmp_path / "o")], capsys)


def test_other_mistakes_are_one_line_exit_2(locon_file, tmp_path, capsys):
    assert "already in the kohya layout" in _exit_2([str(locon_file), str(tmp_path / "x.safetensors"), "--to",
                                                     "kohya"], capsys)
    assert "a folder without pytorch_lora_weights" in _exit_2([str(tmp_path), str(tmp_path / "o")], capsys)
    convert_lora.main([str(locon_file), str(tmp_path / "d")])
    capsys.readouterr()
    assert "a kohya LoRA is one file" in _exit_2([str(tmp_path / "d"), str(tmp_path / "k")], capsys)
    save_file({"model.weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    assert "neither a kohya" in _exit_2([str(tmp_path / "model.safetensors"), str(tmp_path / "o")], capsys)
    assert "not a LoRA file" in _exit_2([str(locon_file), str(tmp_path / "model.safetensors")], capsys)
    assert (tmp_path / "model.safetensors").is_file()


def test_script_run_prints_only_the_error_line(tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    proc = subprocess.run([sys.executable, "tools/convert_lora.py", str(tmp_path / "none.safetensors"),
                           str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr


def test_convert_never_writes_over_its_input(locon_file, tmp_path, capsys):
    import shutil

    own = tmp_path / "mine.safetensors"
    shutil.copy(locon_file, own)
    before = own.read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        convert_lora.main([str(own), str(own)])
    assert exit_info.value.code == 2 and "is also an input; refusing to overwrite it" in capsys.readouterr().err
    assert own.read_bytes() == before
