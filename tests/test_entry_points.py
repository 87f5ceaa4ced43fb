"""The entry scripts and tools/convert_model.py run end to end on the tiny models, and their outputs reload."""

from __future__ import annotations


import pytest

from library.models.checkpoint_io import read_state_dict
from library.models.loading import load_components
from tests.helpers import assert_same_tensors
from tools import convert_model


def test_convert_model_chain_single_to_diffusers_to_ckpt_fp16(tiny_files, tmp_path, capsys):
    src = tiny_files["tiny-sd1"]["safetensors"]
    convert_model.main([str(src), str(tmp_path / "as_diffusers")])
    assert (tmp_path / "as_diffusers" / "model_index.json").is_file()
    convert_model.main([str(tmp_path / "as_diffusers"), str(tmp_path / "back.ckpt"), "--save_precision", "fp16"])
    original, _ = read_state_dict(src)
    assert_same_tensors(read_state_dict(tmp_path / "back.ckpt")[0], {k: v.half() for k, v in original.items()})
    assert "wrote" in capsys.readouterr().out


def test_convert_model_replaces_an_older_diffusers_folder_whole(tiny_files, tmp_path):
    dst = tmp_path / "model"
    convert_model.main([str(tiny_files["tiny-sd2"]["safetensors"]), str(dst)])
    (dst / "stale.txt").write_text("from the old model")
    convert_model.main([str(tiny_files["tiny-sd1"]["safetensors"]), str(dst)])
    assert not (dst / "stale.txt").exists() and load_components(str(dst)).family.name == "sd1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp or backup folders left


def test_convert_model_refuses_to_overwrite_a_non_model_folder(tiny_files, tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "me.jpg").write_bytes(b"jpeg")
    with pytest.raises(SystemExit) as exit_info:
        convert_model.main([str(tiny_files["tiny-sd1"]["safetensors"]), str(tmp_path / "photos")])
    assert exit_info.value.code == 2
    assert (tmp_path / "photos" / "me.jpg").read_bytes() == b"jpeg"
    assert "refusing to overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("script, flags", [("train_textual_inversion", ["--token_string", "mychar"]),
                                           ("train_hypernetwork", []), ("train_db", [])])
def test_scripts_without_a_base_model_are_one_line_exit_2(script, flags, tmp_path, capsys):
    # In this process: a real trainer process ending in one line is tests/test_wrapper_scripts.py's bad-option test.
    import importlib

    from library.data.demo import make_demo_dataset

    make_demo_dataset(tmp_path, count=2, size=32)
    with pytest.raises(SystemExit) as info:
        importlib.import_module(script).main(["--train_data_dir", str(tmp_path), "--caption_extension", ".txt",
                                              "--output_dir", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert err.strip() == ("error: --pretrained_model_name_or_path is required: a .safetensors/.ckpt file, "
                           "a diffusers folder, or tiny-sd1 for the built-in demo model")


def test_generated_image_folder_follows_sd_scripts_convention(image_folder):
    from PIL import Image

    folder = image_folder(repeats=5, class_tokens="ohwx cat", count=3)
    assert folder.name == "5_ohwx cat"
    images = sorted(folder.glob("*.png"))
    assert len(images) == 3
    for image in images:
        with Image.open(image) as im:
            assert im.mode == "RGB" and min(im.size) >= 64
        assert image.with_suffix(".txt").read_text().startswith("ohwx cat")
