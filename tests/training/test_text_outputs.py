"""--cache_text_encoder_outputs_to_disk: sd-scripts' SDXL files, reused across runs, re-encoded when stale."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sdxl_train_network
from library.models.family import TextConditioning
from library.training.text_outputs import OUR_KEY, TextOutputFiles
from tests.helpers import tiny_lora_flags

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _files(parts, skip_check=False):
    encoder = parts.family.prompt_encoder(parts, clip_skip=None, max_token_length=None)
    return TextOutputFiles(parts, encoder.encoder_identity(), skip_check=skip_check), encoder


def test_sdxl_files_have_sd_scripts_keys_and_read_back_exactly(tiny_parts, tmp_path):
    parts = tiny_parts["tiny-sdxl"]
    files, encoder = _files(parts)
    with torch.no_grad():
        row = encoder.conditioning(["a sks dog"]).rows()[0]
    files.write(tmp_path / "img.png", "a sks dog", row)
    assert files.path(tmp_path / "img.png") == tmp_path / "img_te_outputs.npz"
    with np.load(tmp_path / "img_te_outputs.npz") as npz:
        shapes = {name: npz[name].shape for name in npz.files}
        assert all(npz[name].dtype == np.float32 for name in ("hidden_state1", "hidden_state2", "pool2"))
    assert shapes == {"hidden_state1": (77, 32), "hidden_state2": (77, 64), "pool2": (64,), OUR_KEY: ()}
    back = files.read(tmp_path / "img.png", "a sks dog")
    assert torch.equal(back.hidden, row.hidden) and torch.equal(back.pooled, row.pooled)
    assert files.read(tmp_path / "img.png", "an edited caption") is None  # stale: encoded again


def test_a_file_without_our_key_is_trusted_only_with_skip_cache_check(tiny_parts, tmp_path):
    parts = tiny_parts["tiny-sdxl"]
    files, _ = _files(parts)
    arrays = {"hidden_state1": np.ones((77, 32), np.float32), "hidden_state2": np.ones((77, 64), np.float32),
              "pool2": np.ones(64, np.float32)}
    np.savez(tmp_path / "img_te_outputs.npz", **arrays)  # as sd-scripts writes it
    assert files.read(tmp_path / "img.png", "x") is None
    trusted = _files(parts, skip_check=True)[0].read(tmp_path / "img.png", "x")
    assert isinstance(trusted, TextConditioning) and trusted.hidden.shape == (77, 96) and float(trusted.pooled[0]) == 1


def test_sd_families_write_their_own_file_name(tiny_parts, tmp_path):
    files, encoder = _files(tiny_parts["tiny-sd1"])
    with torch.no_grad():
        files.write(tmp_path / "img.png", "cat", encoder.conditioning(["cat"]).rows()[0])
    assert (tmp_path / "img_sd_te_outputs.npz").is_file() and not (tmp_path / "img_te_outputs.npz").exists()


def test_a_second_run_reuses_the_files_and_trains_the_same(image_folder, tmp_path):
    data = image_folder(count=2, repeats=1).parent  # 2 steps of batch 1: one epoch, every image used once
    flags = ["--network_train_unet_only", "--cache_text_encoder_outputs_to_disk", "--resolution", "64"]

    def run(out):
        argv = tiny_lora_flags(data, tmp_path / out, *flags, steps=2, seed=3)
        argv[argv.index("tiny-sd1")] = "tiny-sdxl"
        argv[argv.index("--resolution") + 1] = "64"
        return sdxl_train_network.main(argv)

    first = run("a")
    cached = sorted(data.rglob("*_te_outputs.npz"))
    assert len(cached) == 2
    stamps = [p.stat().st_mtime_ns for p in cached]
    second = run("b")
    assert [p.stat().st_mtime_ns for p in cached] == stamps  # read, not rewritten
    from safetensors.torch import load_file

    a, b = load_file(str(first.final_file)), load_file(str(second.final_file))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_every_caption_is_cached_before_the_first_step_and_the_encoders_released(image_folder, tmp_path, capsys):
    data = image_folder(count=3, repeats=10).parent
    argv = tiny_lora_flags(data, tmp_path / "a", "--network_train_unet_only", "--cache_text_encoder_outputs_to_disk",
                           steps=1, seed=3)
    argv[argv.index("tiny-sd1")] = "tiny-sdxl"
    result = sdxl_train_network.main(argv)
    assert len(sorted(data.rglob("*_te_outputs.npz"))) == 3  # one step used one image; all three were written
    assert all(p.is_meta for te in result.method.parts.text_encoders for p in te.parameters())
    assert "text encoders released" in capsys.readouterr().out


def test_the_text_encoders_stay_when_the_run_samples(image_folder, tmp_path):
    (tmp_path / "p.txt").write_text("a sks dog --w 64 --h 64 --s 2 --d 1\n")
    argv = tiny_lora_flags(image_folder(count=1).parent, tmp_path / "a", "--network_train_unet_only",
                           "--cache_text_encoder_outputs", "--sample_prompts", str(tmp_path / "p.txt"),
                           "--sample_every_n_steps", "1", steps=1, seed=3)
    argv[argv.index("tiny-sd1")] = "tiny-sdxl"
    result = sdxl_train_network.main(argv)
    assert not any(p.is_meta for te in result.method.parts.text_encoders for p in te.parameters())
    assert list((tmp_path / "a" / "sample").glob("*.png"))


def _lora(result):
    from safetensors.torch import load_file

    return load_file(str(result.final_file))


def test_without_the_flag_a_frozen_encoder_with_fixed_captions_is_released_and_trains_the_same(
        image_folder, tmp_path, monkeypatch, capsys):
    # Such a run encoded each caption once anyway (in memory, the first time a batch had it); encoding them all up
    # front lets the encoder go before the first step (0.49 GB on SD 1.5 in float32), and the LoRA is bit-identical.
    import train_network
    from library.methods.diffusion_method import DiffusionMethod

    data = image_folder(count=3, repeats=2).parent
    flags = ["--network_train_unet_only", "--train_batch_size", "2", "--validation_split", "0.34",
             "--validate_every_n_steps", "1"]
    released = train_network.main(tiny_lora_flags(data, tmp_path / "a", *flags, steps=3, seed=3))
    assert all(p.is_meta for te in released.method.parts.text_encoders for p in te.parameters())
    assert "text encoders released" in capsys.readouterr().out
    monkeypatch.setattr(DiffusionMethod, "_caching_frees_text_encoders", lambda self: False)  # as before: lazily
    kept = train_network.main(tiny_lora_flags(data, tmp_path / "b", *flags, steps=3, seed=3))
    assert not any(p.is_meta for te in kept.method.parts.text_encoders for p in te.parameters())
    a, b = _lora(released), _lora(kept)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert released.validation_losses == kept.validation_losses and released.validation_losses


@pytest.mark.parametrize("flags", [["--network_train_unet_only", "--shuffle_caption"], []],
                         ids=["captions-vary", "text-encoder-trained"])
def test_the_encoder_stays_where_it_is_still_needed(image_folder, tmp_path, flags):
    import train_network

    result = train_network.main(tiny_lora_flags(image_folder(count=2).parent, tmp_path / "a", *flags, steps=1, seed=3))
    assert not any(p.is_meta for te in result.method.parts.text_encoders for p in te.parameters())


def test_the_flag_with_held_out_images_validates_with_the_encoder_gone(image_folder, tmp_path):
    # Validation batches ran the released (meta) text encoder on their captions: a traceback at the first validation.
    import train_network

    argv = tiny_lora_flags(image_folder(count=3).parent, tmp_path / "a", "--network_train_unet_only",
                           "--cache_text_encoder_outputs", "--validation_split", "0.34", "--validate_every_n_steps",
                           "1", steps=2, seed=3)
    result = train_network.main(argv)
    assert result.validation_losses and all(loss == loss for _, _, loss in result.validation_losses)
