"""sdxl_train.py end to end on tiny-sdxl: full fine-tuning with and without the text encoders (each at its own rate),
--block_lr, the saved single file reloading here and in diffusers, fused backward, resume, sd-scripts' documented
command line, and the options that belong to train_db.py / sdxl_train.py refused in the other script."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import sdxl_train
import train_db
from library.data.demo import make_demo_dataset
from library.models.checkpoint_io import read_state_dict
from library.models.loading import load_components
from library.models.saving import save_diffusers

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def data(tmp_path):
    make_demo_dataset(tmp_path / "train", count=4, size=32, folder="2_sks shape")
    make_demo_dataset(tmp_path / "reg", count=2, size=32, seed=1, folder="1_shape")
    return tmp_path


def _flags(data, out, *extra, steps=2, model="tiny-sdxl"):
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", str(data / "train"),
            "--reg_data_dir", str(data / "reg"), "--prior_loss_weight", "1.0", "--caption_extension", ".txt",
            "--resolution", "32", "--output_dir", str(out), "--output_name", "xl", "--train_batch_size", "2",
            "--max_train_steps", str(steps), "--learning_rate", "1e-3", "--seed", "3", "--max_data_loader_n_workers",
            "0", "--save_model_as", "safetensors", *extra]


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _refusal(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert stopped.value.code == 2 and len(err.splitlines()) == 1, err
    return err


def test_unet_only_by_default_and_the_file_reloads_here_and_in_diffusers(data, tiny_parts, tmp_path):
    base = tiny_parts["tiny-sdxl"]
    result = sdxl_train.main(_flags(data, tmp_path / "out"))
    trained = result.method.parts
    assert result.global_step == 2 and result.final_file == tmp_path / "out" / "xl.safetensors"
    # sd-scripts' sdxl_train.py trains the U-Net only unless --train_text_encoder: both encoders bit-identical.
    assert not _same(_state(trained.unet), _state(base.unet))
    for ours, theirs in zip(trained.text_encoders, base.text_encoders):
        assert _same(_state(ours), _state(theirs))
    assert _same(_state(trained.vae), _state(base.vae))
    assert result.method.param_groups()[1] == ["unet"]

    weights, metadata = read_state_dict(result.final_file)
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert any(k.startswith("conditioner.embedders.1.model.transformer.resblocks.") for k in weights)
    reloaded = load_components(str(result.final_file))
    assert reloaded.family.name == "sdxl"
    for name in ("unet", "vae"):
        assert _same(_state(getattr(reloaded, name)), _state(getattr(trained, name))), name
    for ours, again in zip(trained.text_encoders, reloaded.text_encoders):
        assert _same(_state(again), _state(ours))

    from diffusers import StableDiffusionXLPipeline

    config = save_diffusers(base, tmp_path / "tiny-config")  # diffusers' single-file loader needs the configs
    pipe = StableDiffusionXLPipeline.from_single_file(str(result.final_file), config=str(config),
                                                     local_files_only=True)
    torch.manual_seed(0)
    x, t = torch.randn(1, 4, 4, 4), torch.tensor([500])
    context = torch.randn(1, 77, base.unet.config.cross_attention_dim)
    pooled = torch.randn(1, base.text_encoders[1].config.projection_dim)
    cond = {"text_embeds": pooled, "time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]])}
    with torch.no_grad():
        ours = trained.unet(x, t, context, added_cond_kwargs=cond).sample
        theirs = pipe.unet(x, t, context, added_cond_kwargs=cond).sample
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_text_encoders_train_on_request_each_at_its_rate(data, tiny_parts, tmp_path):
    base = tiny_parts["tiny-sdxl"]
    both = sdxl_train.main(_flags(data, tmp_path / "both", "--train_text_encoder", steps=1))
    assert both.method.param_groups()[1] == ["unet", "textencoder1", "textencoder2"]
    for ours, theirs in zip(both.method.parts.text_encoders, base.text_encoders):
        assert not _same(_state(ours), _state(theirs))
    # --learning_rate_te2 0: text encoder 2 stays frozen (sd-scripts: a rate of 0 does not train it).
    one = sdxl_train.main(_flags(data, tmp_path / "one", "--train_text_encoder", "--learning_rate_te1", "1e-3",
                                 "--learning_rate_te2", "0", steps=1))
    groups, names = one.method.param_groups()
    assert names == ["unet", "textencoder1"] and groups[1]["lr"] == 1e-3
    te1, te2 = one.method.parts.text_encoders
    assert not _same(_state(te1), _state(base.text_encoders[0]))
    assert _same(_state(te2), _state(base.text_encoders[1]))


def test_block_lr_trains_each_block_at_its_rate_and_zero_freezes_it(data, tiny_parts, tmp_path):
    base = tiny_parts["tiny-sdxl"].unet
    rates = ["1e-3"] * 23
    frozen = {0, 1, 11, 22}  # time/label embeddings, conv_in (input_blocks.0), middle block's attention, out
    for index in frozen:
        rates[index] = "0"
    result = sdxl_train.main(_flags(data, tmp_path / "out", "--block_lr", ",".join(rates), "--optimizer_type",
                                    "SGD", steps=1))
    unet = result.method.parts.unet
    groups, names = result.method.param_groups()
    assert len(groups) == 19 and names[0] == "unet_block02" and names[-1] == "unet_block21"
    block_of = result.method.parts.family.unet_block_of(unet)
    before = dict(base.named_parameters())
    for name, param in unet.named_parameters():
        unchanged = torch.equal(param.detach(), before[name].detach())
        if block_of(name) in frozen:
            assert unchanged, name
    moved = {block_of(n) for n, p in unet.named_parameters() if not torch.equal(p.detach(), before[n].detach())}
    assert moved and not moved & frozen and len(moved) > 10


def test_block_lr_needs_23_values(data, tmp_path, capsys):
    err = _refusal(sdxl_train.main, _flags(data, tmp_path / "out", "--block_lr", ",".join(["1e-4"] * 25)), capsys)
    assert "block_lr" in err and "23" in err


def test_fused_backward_pass_equals_the_plain_step(data, tmp_path):
    common = ["--optimizer_type", "AdaFactor", "--optimizer_args", "scale_parameter=False", "relative_step=False",
              "warmup_init=False", "--max_grad_norm", "0"]
    usual = sdxl_train.main(_flags(data, tmp_path / "usual", *common))
    fused = sdxl_train.main(_flags(data, tmp_path / "fused", *common, "--fused_backward_pass"))
    assert fused.losses == usual.losses
    assert _same(_state(fused.method.parts.unet), _state(usual.method.parts.unet))


def test_fused_optimizer_groups_equal_the_plain_step_for_any_per_parameter_optimizer(data, tmp_path, capsys):
    """sd-scripts' --fused_optimizer_groups N: N groups stepped inside backward, each once all its gradients are
    there; for AdamW (per-parameter) that is the usual step exactly. Clipping is per group, so it is off here."""
    common = ["--optimizer_type", "AdamW", "--max_grad_norm", "0", "--train_text_encoder"]
    usual = sdxl_train.main(_flags(data, tmp_path / "usual", *common))
    grouped = sdxl_train.main(_flags(data, tmp_path / "grouped", *common, "--fused_optimizer_groups", "4"))
    assert grouped.losses == usual.losses
    for ours, theirs in ((grouped.method.parts.unet, usual.method.parts.unet),
                         *zip(grouped.method.parts.text_encoders, usual.method.parts.text_encoders)):
        assert _same(_state(ours), _state(theirs))
    capsys.readouterr()  # the runs' progress bars
    err = _refusal(sdxl_train.main, _flags(data, tmp_path / "both", "--fused_optimizer_groups", "4",
                                           "--fused_backward_pass"), capsys)
    assert "give one" in err
    err = _refusal(sdxl_train.main, _flags(data, tmp_path / "acc", "--fused_optimizer_groups", "4",
                                           "--gradient_accumulation_steps", "2"), capsys)
    assert "--fused_optimizer_groups" in err and "accumulate" in err


def test_resume_continues_exactly_like_the_uninterrupted_run(data, tmp_path):
    common = ["--save_every_n_steps", "1", "--save_state", "--optimizer_type", "AdamW"]
    full = sdxl_train.main(_flags(data, tmp_path / "a", *common, steps=2))
    state = tmp_path / "a" / "xl-step00000001-state"
    assert state.is_dir()
    resumed = sdxl_train.main(_flags(data, tmp_path / "b", *common, "--resume", str(state), steps=2))
    assert resumed.losses == full.losses[1:]
    assert _same(load_file(str(tmp_path / "a" / "xl.safetensors")), load_file(str(tmp_path / "b" / "xl.safetensors")))


def test_sd_scripts_documented_low_memory_command_runs(data, tmp_path):
    """sd-scripts' README (fused backward pass, PR #1319) and docs/train_SDXL-en.md's 24 GB settings: Adafactor with
    its recommended arguments, --fused_backward_pass, --full_bf16, cached latents and text-encoder outputs,
    gradient checkpointing, U-Net only. Only the model and data paths are ours."""
    argv = ["--pretrained_model_name_or_path", "tiny-sdxl", "--train_data_dir", str(data / "train"),
            "--output_dir", str(tmp_path / "out"), "--output_name", "sdxl_ft", "--caption_extension", ".txt",
            "--resolution", "32,32", "--train_batch_size", "1", "--max_train_steps", "2",
            "--mixed_precision", "bf16", "--full_bf16", "--optimizer_type", "adafactor", "--optimizer_args",
            "scale_parameter=False", "relative_step=False", "warmup_init=False", "--fused_backward_pass",
            "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "1", "--learning_rate", "4e-7",
            "--max_grad_norm", "0.0", "--cache_latents", "--cache_text_encoder_outputs", "--gradient_checkpointing",
            "--no_half_vae", "--save_model_as", "safetensors", "--save_precision", "bf16",
            "--max_data_loader_n_workers", "0", "--seed", "42"]
    result = sdxl_train.main(argv)
    assert result.global_step == 2 and result.method.parts.unet.dtype == torch.bfloat16
    assert result.method.parts.text_encoders[0].dtype == torch.bfloat16  # frozen: kept in the weight dtype
    weights = load_file(str(tmp_path / "out" / "sdxl_ft.safetensors"))
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.bfloat16}
    # A full model: the text encoders are kept for the save even though their outputs were cached.
    assert any(k.startswith("conditioner.embedders.0.transformer.") for k in weights)


def test_each_script_refuses_the_others_options_naming_them(data, tmp_path, capsys):
    err = _refusal(sdxl_train.main, _flags(data, tmp_path / "a", "--stop_text_encoder_training", "5"), capsys)
    assert "--stop_text_encoder_training belongs to train_db.py" in err and "--train_text_encoder" in err
    err = _refusal(sdxl_train.main, _flags(data, tmp_path / "a", "--learning_rate_te", "1e-5"), capsys)
    assert "--learning_rate_te1 / --learning_rate_te2" in err
    err = _refusal(train_db.main, _flags(data, tmp_path / "b", "--learning_rate_te1", "1e-5", model="tiny-sd1"),
                   capsys)
    assert "--learning_rate_te1 belongs to sdxl_train.py" in err and "use --learning_rate_te" in err
    err = _refusal(train_db.main, _flags(data, tmp_path / "b", "--block_lr", ",".join(["1e-4"] * 23),
                                         model="tiny-sd1"), capsys)
    assert "--block_lr belongs to sdxl_train.py" in err
    err = _refusal(sdxl_train.main, _flags(data, tmp_path / "c", "--train_text_encoder",
                                           "--cache_text_encoder_outputs"), capsys)
    assert "cache_text_encoder_outputs" in err and "text encoder is trained" in err


def test_each_script_names_the_other_for_the_other_family(data, tmp_path, capsys):
    err = _refusal(train_db.main, _flags(data, tmp_path / "a"), capsys)
    assert "this is an SDXL model" in err and "use sdxl_train.py" in err
    err = _refusal(sdxl_train.main, _flags(data, tmp_path / "b", model="tiny-sd1"), capsys)
    assert "trains SDXL models; use train_db.py" in err


def test_in_json_fine_tuning_metadata_trains_with_its_captions(tmp_path, capsys):
    """sd-scripts' fine-tuning flow (finetune/merge_captions_to_metadata.py's JSON) as sdxl_train.py reads it."""
    import json

    from tests.helpers import make_image_folder

    folder = make_image_folder(tmp_path / "images", count=2)
    meta = tmp_path / "meta_cap.json"
    meta.write_text(json.dumps({"img000.png": {"caption": "a red circle"}, "img001.png": {"caption": "a blue box"}}))
    result = sdxl_train.main(["--pretrained_model_name_or_path", "tiny-sdxl", "--in_json", str(meta),
                              "--train_data_dir", str(folder), "--dataset_repeats", "2", "--resolution", "32",
                              "--output_dir", str(tmp_path / "out"), "--output_name", "ft", "--train_batch_size", "2",
                              "--max_train_steps", "2", "--learning_rate", "1e-4", "--max_data_loader_n_workers",
                              "0", "--cache_latents", "--cache_text_encoder_outputs", "--save_model_as",
                              "safetensors"])
    assert result.global_step == 2 and result.final_file.is_file()
    assert "2 captions cached before training" in capsys.readouterr().out
    assert set(result.method._text_cache) == {"a red circle", "a blue box"}


def test_a_model_of_the_other_family_is_refused_from_its_header_before_the_data(tiny_files, tmp_path, capsys):
    """The family is read from the file's tensor names first: no dataset scan, no weights loaded (a real SDXL file
    takes a minute to load)."""
    argv = ["--pretrained_model_name_or_path", str(tiny_files["tiny-sdxl"]["safetensors"]), "--train_data_dir",
            str(tmp_path / "no_such_folder"), "--output_dir", str(tmp_path / "out")]
    err = _refusal(train_db.main, argv, capsys)
    assert "this is an SDXL model" in err and "use sdxl_train.py" in err and "no_such_folder" not in err
