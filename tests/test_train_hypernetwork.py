"""train_hypernetwork.py end to end on the tiny model: the saved A1111 .pt reloads into the same UNet output, the
base model stays untouched, --weights continues the file's step count, and mistakes end with one line."""

from __future__ import annotations

import copy

import pytest
import torch

import train_hypernetwork
from library.data.demo import make_demo_dataset
from networks.hypernetwork import load_hypernetwork

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def data(tmp_path):
    make_demo_dataset(tmp_path / "train", count=4, size=32, folder="2_sks shape")
    return tmp_path


def _flags(data, out, *extra, steps=2, lr="1e-3", sizes="32,64", resolution="32"):
    return ["--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", str(data / "train"),
            "--caption_extension", ".txt", "--resolution", resolution, "--output_dir", str(out), "--output_name", "hn",
            "--train_batch_size", "2", "--max_train_steps", str(steps), "--learning_rate", lr, "--seed", "3",
            "--max_data_loader_n_workers", "0", "--hypernetwork_sizes", sizes, *extra]


def _unet_output(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    context = torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        return unet(latents, torch.tensor([500]), context).sample


def test_trains_saves_the_a1111_layout_and_the_file_reproduces_the_training_time_unet(data, tiny_parts, tmp_path):
    base = tiny_parts["tiny-sd1"]
    result = train_hypernetwork.main(_flags(data, tmp_path / "out", "--hypernetwork_layer_structure", "1,2,1",
                                            "--hypernetwork_activation_func", "relu"))
    assert result.final_file == tmp_path / "out" / "hn.pt"
    saved = torch.load(result.final_file, weights_only=True)
    assert sorted(k for k in saved if isinstance(k, int)) == [32, 64]
    assert saved["step"] == 2 and saved["name"] == "hn" and saved["activation_func"] == "relu"
    assert saved["layer_structure"] == [1, 2, 1] and saved["sd_checkpoint_name"] == "tiny-sd1"
    assert set(saved[32][0]) == {"linear.0.weight", "linear.0.bias", "linear.2.weight", "linear.2.bias"}

    trained = result.method
    # Only the hypernetwork learnt: the UNet's own weights are the base model's.
    base_state = base.unet.state_dict()
    assert all(torch.equal(v, base_state[k]) for k, v in trained.parts.unet.state_dict().items())
    trained.parts.unet.eval()
    trained.network.eval()
    at_training = _unet_output(trained.parts.unet)

    reloaded, info = load_hypernetwork(result.final_file)
    unet = copy.deepcopy(base.unet).eval()
    plain = _unet_output(unet)
    reloaded.apply_to(unet)
    reloaded.eval()
    assert info["step"] == 2
    assert torch.equal(_unet_output(unet), at_training)
    assert not torch.equal(plain, at_training)


def test_weights_continue_from_the_file_with_its_structure(data, tmp_path):
    first = train_hypernetwork.main(_flags(data, tmp_path / "a", "--hypernetwork_layer_structure", "1,1.5,1"))
    second = train_hypernetwork.main(_flags(data, tmp_path / "b", "--weights", str(first.final_file), steps=1))
    saved = torch.load(second.final_file, weights_only=True)
    assert saved["step"] == 3 and saved["layer_structure"] == [1, 1.5, 1]
    assert saved[32][0]["linear.0.weight"].shape == (48, 32)


@pytest.mark.parametrize("extra, message", [
    ({"sizes": "768"}, "this UNet's attention widths are 32,64"),
    (["--save_model_as", "safetensors"], "a hypernetwork is saved as pt"),
    (["--hypernetwork_layer_structure", "2,1"], "--hypernetwork_layer_structure"),
])
def test_mistakes_end_with_one_line(data, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        train_hypernetwork.main(_flags(data, tmp_path / "out", **extra) if isinstance(extra, dict)
                                else _flags(data, tmp_path / "out", *extra))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err, err


def test_training_lowers_the_loss_against_an_untrained_twin(data, tmp_path):
    # Noise and timesteps depend only on (seed, epoch, batch), so a run at lr 0 sees exactly the same draws.
    # 128 px images: 16x16 latents (the tiny VAE downsamples 8x, like SD's), enough positions to learn from.
    make_demo_dataset(data / "train", count=4, size=128, folder="2_sks shape")
    flags = ["--cache_latents", "--optimizer_type", "AdamW"]
    # lr 6e-3 for 50 steps: 0.799 (3e-3 for 100 steps gave 0.754, 1e-3 needed 200 steps for 0.79).
    trained = train_hypernetwork.main(_flags(data, tmp_path / "a", *flags, lr="6e-3", steps=50, resolution="128"))
    control = train_hypernetwork.main(_flags(data, tmp_path / "b", *flags, lr="0", steps=50, resolution="128"))
    last = slice(-12, None)
    ratio = sum(trained.losses[last]) / sum(control.losses[last])
    assert ratio < 0.85, ratio


def test_a_file_of_another_kind_at_the_output_path_is_refused_before_training(data, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "hn.pt").write_bytes(b"someone's file")
    with pytest.raises(SystemExit):
        train_hypernetwork.main(_flags(data, out))
    captured = capsys.readouterr()
    assert "is not an AUTOMATIC1111 hypernetwork; refusing to overwrite it" in captured.err
    assert "training starts" not in captured.out and (out / "hn.pt").read_bytes() == b"someone's file"
