"""train_db.py end to end on the tiny model: full fine-tuning with regularisation images, what changes and what
does not, the saved model reloading here and in diffusers, class images, EMA, .ckpt contents and resume."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import train_db
from library.data.demo import make_demo_dataset
from library.models.loading import load_components
from library.models.saving import save_diffusers


@pytest.fixture
def data(tmp_path):
    make_demo_dataset(tmp_path / "train", count=4, size=32, folder="2_sks shape")
    make_demo_dataset(tmp_path / "reg", count=2, size=32, seed=1, folder="1_shape")
    return tmp_path


def _flags(data, out, *extra, steps=2, save_as="safetensors"):
    return ["--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", str(data / "train"),
            "--reg_data_dir", str(data / "reg"), "--prior_loss_weight", "1.0", "--caption_extension", ".txt",
            "--resolution", "32", "--output_dir", str(out), "--output_name", "db", "--train_batch_size", "2",
            "--max_train_steps", str(steps), "--learning_rate", "1e-3", "--seed", "3", "--max_data_loader_n_workers",
            "0", *(["--save_model_as", save_as] if save_as else []), *extra]


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fine_tunes_with_reg_images_and_the_file_reloads_here_and_in_diffusers(data, tiny_parts, tmp_path, capsys):
    base = tiny_parts["tiny-sd1"]
    result = train_db.main(_flags(data, tmp_path / "out"))
    out = capsys.readouterr().out
    assert "4 training images (8 with repeats), 2 regularisation images" in out
    assert result.global_step == 2 and result.final_file == tmp_path / "out" / "db.safetensors"
    trained = result.method.parts

    # What trains changed (UNet, text encoder by default as in sd-scripts); the VAE did not.
    assert not _same(_state(trained.unet), _state(base.unet))
    assert not _same(_state(trained.text_encoder), _state(base.text_encoder))
    assert _same(_state(trained.vae), _state(base.vae))

    reloaded = load_components(str(result.final_file))
    for name in ("unet", "text_encoder", "vae"):
        assert _same(_state(getattr(reloaded, name)), _state(getattr(trained, name))), name

    from diffusers import StableDiffusionPipeline

    config_folder = save_diffusers(base, tmp_path / "tiny-config")  # diffusers' loader needs the model's configs
    pipe = StableDiffusionPipeline.from_single_file(str(result.final_file), config=str(config_folder),
                                                    local_files_only=True, safety_checker=None)
    assert _same(_state(pipe.unet), _state(trained.unet))
    assert _same(_state(pipe.vae), _state(trained.vae))

    metadata = _metadata(result.final_file)
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1"  # a checkpoint, not "/lora"
    assert metadata["ss_prior_loss_weight"] == "1.0" and metadata["ss_steps"] == "2"
    assert metadata["ss_num_reg_images"] == "2" and metadata["ss_learning_rate"] == "0.001"


def _metadata(path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_text_encoder_is_untouched_when_not_trained_and_after_its_stop_step(data, tiny_parts, tmp_path):
    base = tiny_parts["tiny-sd1"]
    never = train_db.main(_flags(data, tmp_path / "never", "--stop_text_encoder_training", "-1"))
    assert _same(_state(never.method.parts.text_encoder), _state(base.text_encoder))
    assert not _same(_state(never.method.parts.unet), _state(base.unet))

    one = train_db.main(_flags(data, tmp_path / "one", steps=1))
    stopped = train_db.main(_flags(data, tmp_path / "stopped", "--stop_text_encoder_training", "1", steps=3))
    # Trained for exactly one step, then frozen: as the text encoder of a one-step run, to the bit.
    assert _same(_state(stopped.method.parts.text_encoder), _state(one.method.parts.text_encoder))
    assert not _same(_state(stopped.method.parts.text_encoder), _state(base.text_encoder))
    assert not _same(_state(stopped.method.parts.unet), _state(one.method.parts.unet))


def test_learning_rate_te_sets_the_text_encoder_group(data, tiny_parts, tmp_path):
    result = train_db.main(_flags(data, tmp_path / "out", "--learning_rate_te", "0", "--optimizer_type", "SGD",
                                  steps=1))
    _, descriptions = result.method.param_groups()
    assert descriptions == ["unet", "textencoder"]
    # lr 0 for the text encoder (plain SGD: no weight decay), --learning_rate for the UNet.
    assert _same(_state(result.method.parts.text_encoder), _state(tiny_parts["tiny-sd1"].text_encoder))
    assert not _same(_state(result.method.parts.unet), _state(tiny_parts["tiny-sd1"].unet))


def test_ckpt_carries_epoch_and_global_step(data, tmp_path):
    result = train_db.main(_flags(data, tmp_path / "out", steps=2, save_as="ckpt"))
    saved = torch.load(result.final_file, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 2 and saved["epoch"] == 1
    assert any(k.startswith("model.diffusion_model.") for k in saved["state_dict"])


def test_ema_weights_are_saved_and_raw_ones_beside_them_on_request(data, tmp_path):
    result = train_db.main(_flags(data, tmp_path / "out", "--use_ema", "--ema_decay", "0.5", "--ema_save", "both",
                                  steps=3))
    method = result.method
    ema_file, raw_file = tmp_path / "out" / "db.safetensors", tmp_path / "out" / "db-raw.safetensors"
    ema_unet = load_components(str(ema_file)).unet.state_dict()
    raw_unet = load_components(str(raw_file)).unet.state_dict()
    assert _same(raw_unet, _state(method.parts.unet))  # the model keeps its raw weights
    assert not _same(ema_unet, raw_unet)
    # The saved EMA is the shadow the EMA holds.
    shadow = dict(zip([n for n, p in method.parts.unet.named_parameters()], method.ema.shadow_params))
    assert all(torch.equal(ema_unet[name], shadow[name]) for name in shadow)


def test_resume_continues_exactly_like_the_uninterrupted_run(data, tmp_path):
    common = ["--save_every_n_steps", "2", "--save_state", "--optimizer_type", "AdamW"]
    full = train_db.main(_flags(data, tmp_path / "a", *common, steps=4))
    state = tmp_path / "a" / "db-step00000002-state"
    assert (tmp_path / "a" / "db-step00000002.safetensors").is_file() and state.is_dir()
    resumed = train_db.main(_flags(data, tmp_path / "b", *common, "--resume", str(state), steps=4))
    assert resumed.losses == full.losses[2:]
    a, b = load_file(str(tmp_path / "a" / "db.safetensors")), load_file(str(tmp_path / "b" / "db.safetensors"))
    assert _same(a, b)


def test_diffusers_folder_output_and_default_format_follows_the_input(data, tmp_path):
    flags = [a if a != "db" else "db_v1.5" for a in _flags(data, tmp_path / "out", save_as=None)]
    result = train_db.main(flags)  # the name's dot is no file extension: a diffusers output is a folder
    assert result.final_file == tmp_path / "out" / "db_v1.5" and (result.final_file / "model_index.json").is_file()
    assert _same(_state(load_components(str(result.final_file)).unet), _state(result.method.parts.unet))


def test_class_images_fill_an_empty_reg_folder_once_and_join_the_training(data, tmp_path, capsys):
    reg = data / "class" / "1_shape"
    reg.mkdir(parents=True)
    flags = [a if a != str(data / "reg") else str(data / "class") for a in _flags(data, tmp_path / "out", steps=1)]
    flags += ["--num_class_images", "2", "--class_infer_steps", "2", "--class_prompt", "a shape"]
    train_db.main(flags)
    out = capsys.readouterr().out
    assert sorted(p.name for p in reg.glob("*.png")) == ["class_00000.png", "class_00001.png"]
    assert (reg / "class_00000.txt").read_text() == "a shape"
    assert "class images: generating 2" in out and "2 regularisation images" in out
    before = {p: p.stat().st_mtime_ns for p in reg.iterdir()}
    train_db.main(flags)
    assert "class images: generating" not in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in reg.iterdir()} == before


@pytest.mark.parametrize("optimizer", ["AdamW", "AdamW8bit"])
def test_fused_backward_pass_trains_the_same_weights(data, tmp_path, optimizer):
    common = ["--optimizer_type", optimizer, "--max_grad_norm", "0", "--stop_text_encoder_training", "-1"]
    usual = train_db.main(_flags(data, tmp_path / "usual", *common, steps=2))
    fused = train_db.main(_flags(data, tmp_path / "fused", *common, "--fused_backward_pass", steps=2))
    assert fused.losses == usual.losses
    assert _same(_state(fused.method.parts.unet), _state(usual.method.parts.unet))


def test_full_bf16_trains_in_bf16_and_save_precision_sets_the_file_dtype(data, tmp_path):
    result = train_db.main(_flags(data, tmp_path / "out", "--mixed_precision", "bf16", "--full_bf16",
                                  "--save_precision", "fp16", steps=1))
    assert result.method.parts.unet.dtype == torch.bfloat16
    assert {v.dtype for v in load_file(str(result.final_file)).values() if v.is_floating_point()} == {torch.float16}


def test_adafactor_with_fused_backward_and_samples_during_training(data, tmp_path):
    (tmp_path / "p.txt").write_text("sks shape --w 32 --h 32 --s 1 --d 5\n")
    result = train_db.main(_flags(data, tmp_path / "out", "--optimizer_type", "AdaFactor", "--fused_backward_pass",
                                  "--sample_prompts", str(tmp_path / "p.txt"), "--sample_every_n_steps", "1", steps=2))
    assert result.global_step == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert len(list((tmp_path / "out" / "sample").glob("db_00000[12]_00_*_5.png"))) == 2


def test_no_token_padding_encodes_each_batch_at_its_longest_caption(data, tiny_parts, tmp_path, capsys):
    parts = tiny_parts["tiny-sd1"]
    encoder = parts.family.prompt_encoder(parts, clip_skip=None, max_token_length=225)
    captions = ["a cat", "a photo of a red cat on a mat"]
    with torch.no_grad():
        short = encoder.unpadded(captions).hidden
        full = encoder.conditioning(captions).hidden
    # BOS + 9 tokens + EOS; CLIP's causal attention makes the states before the padding those of the padded run.
    assert short.shape == (2, 11, full.shape[-1]) and full.shape[1] == 227
    torch.testing.assert_close(short, full[:, :11], rtol=1e-5, atol=1e-5)
    padded = train_db.main(_flags(data, tmp_path / "a")).losses
    unpadded = train_db.main(_flags(data, tmp_path / "b", "--no_token_padding")).losses
    assert len(unpadded) == 2 and unpadded != padded
    with pytest.raises(SystemExit) as exit_info:
        train_db.main(_flags(data, tmp_path / "c", "--no_token_padding", "--weighted_captions"))
    assert exit_info.value.code == 2
    assert "--no_token_padding cannot be used with --weighted_captions" in capsys.readouterr().err
