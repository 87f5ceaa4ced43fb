"""Adapter files with tensors we do not read are refused in one line (what, how many, which, what the file is) by
--network_weights, --base_weights, merge_lora, svd_merge_lora, resize_lora and gen_img; legitimate extras load."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import train_network
from library.data.demo import make_demo_dataset
from library.errors import UserError
from networks import lora
from networks.files import read_network_file
from networks.network import network_from_weights
from tools import check_lora_weights, gen_img, merge_lora, resize_lora, svd_merge_lora

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _common(data, out):
    return ["--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", str(data), "--caption_extension",
            ".txt", "--resolution", "32", "--output_dir", str(out), "--output_name", "net", "--train_batch_size", "2",
            "--max_train_steps", "1", "--learning_rate", "1e-2", "--network_dim", "4", "--network_alpha", "2",
            "--seed", "1", "--max_data_loader_n_workers", "0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoCon file written by our own trainer (one step), and its data folder."""
    root = tmp_path_factory.mktemp("trained")
    make_demo_dataset(root / "data", count=2, size=32)
    train_network.main(_common(root / "data", root / "out") + ["--network_args", "conv_dim=2", "conv_alpha=1"])
    return root / "out" / "net.safetensors", root / "data"


def _variant(trained_file, path, kind):
    """The trained file with foreign tensors injected, as files of other tools hold them."""
    weights = load_file(str(trained_file))
    up = next(k for k in sorted(weights) if k.startswith("lora_unet_") and k.endswith("to_q.lora_up.weight"))
    name = up.removesuffix(".lora_up.weight")
    if kind == "tucker":
        for key in sorted(k for k in weights if k.endswith(".lora_up.weight"))[:5]:
            weights[key.replace(".lora_up.weight", ".lora_mid.weight")] = torch.ones(2, 2, 3, 3)
    elif kind == "unknown module":
        weights["lora_unet_no_such_block_to_q.lora_down.weight"] = weights[f"{name}.lora_down.weight"].clone()
        weights["lora_unet_no_such_block_to_q.lora_up.weight"] = weights[up].clone()
    elif kind == "sdxl":
        for key in [k for k in weights if k.startswith("lora_te_")]:
            value = weights.pop(key)
            weights[key.replace("lora_te_", "lora_te1_", 1)] = value
            weights[key.replace("lora_te_", "lora_te2_", 1)] = value.clone()
    elif kind == "bundled embedding":
        weights["bundle_emb.mytok.string_to_param.*"] = torch.zeros(2, 32)
    elif kind == "loha module":
        weights[f"{name}.hada_w1_a"] = torch.zeros(32, 2)
    save_file(weights, str(path))
    return path


EXPECTED = {
    "tucker": (5, "a LoCon with Tucker decomposition (lora_mid", ".lora_mid.weight"),
    "unknown module": (2, "they adapt 1 module this model does not have", "lora_unet_no_such_block_to_q"),
    "sdxl": (None, "an SDXL network (lora_te1_/lora_te2_", "lora_te1_text_model_encoder_layers_0"),
    # Read now (pivotal tuning); a run that would not keep training them refuses rather than drop them.
    "bundled embedding": (None, "holds bundled embeddings (mytok) that this run would drop",
                          "add --train_embeddings mytok:2"),
    "loha module": (1, "it mixes loha modules into a lora network", ".hada_w1_a"),
}


def _one_line_error(capsys, call) -> str:
    with pytest.raises(SystemExit) as exit_info:
        call()
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err and "Traceback" not in err, err
    return err


def _check_message(err, path, kind):
    count, what, example = EXPECTED[kind]
    total = len(load_file(str(path)))
    assert err.startswith(f"error: {path}: ") and what in err and example in err, err
    if count is not None:
        assert f"{count} of its {total} tensors are not understood" in err, err


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_network_weights_refuses_tensors_it_does_not_read(kind, trained, tmp_path, capsys):
    trained_file, data = trained
    path = _variant(trained_file, tmp_path / "foreign.safetensors", kind)
    flags = _common(data, tmp_path / "out") + ["--network_args", "conv_dim=2", "conv_alpha=1"]
    err = _one_line_error(capsys, lambda: train_network.main(flags + ["--network_weights", str(path)]))
    _check_message(err, path, kind)
    assert not (tmp_path / "out" / "net.safetensors").exists()


@pytest.mark.parametrize("kind", ["tucker", "unknown module", "sdxl"])
def test_merging_into_a_model_refuses_them(kind, trained, tiny_files, tmp_path, capsys):
    path = _variant(trained[0], tmp_path / "foreign.safetensors", kind)
    out = tmp_path / "merged.safetensors"
    err = _one_line_error(capsys, lambda: merge_lora.main([
        "--sd_model", str(tiny_files["tiny-sd1"]["safetensors"]), "--models", str(path), "--save_to", str(out)]))
    _check_message(err, path, kind)
    assert not out.exists()


@pytest.mark.parametrize("tool, argv", [
    (merge_lora, ["--models", "{f}", "{t}", "--save_to", "{o}"]),
    (svd_merge_lora, ["--models", "{f}", "{t}", "--save_to", "{o}", "--new_rank", "2"]),
    (resize_lora, ["--model", "{f}", "--save_to", "{o}", "--new_rank", "2"]),
], ids=["merge_lora", "svd_merge_lora", "resize_lora"])
def test_model_free_tools_refuse_them(tool, argv, trained, tmp_path, capsys):
    path = _variant(trained[0], tmp_path / "foreign.safetensors", "tucker")
    out = tmp_path / "out.safetensors"
    argv = [a.format(f=path, t=trained[0], o=out) for a in argv]
    err = _one_line_error(capsys, lambda: tool.main(argv))
    _check_message(err, path, "tucker")
    assert not out.exists()


@pytest.mark.parametrize("kind", ["tucker", "sdxl"])
def test_gen_img_refuses_them(kind, trained, tiny_files, tmp_path, capsys):
    path = _variant(trained[0], tmp_path / "foreign.safetensors", kind)
    err = _one_line_error(capsys, lambda: gen_img.main([
        "--ckpt", str(tiny_files["tiny-sd1"]["safetensors"]), "--outdir", str(tmp_path / "images"), "--prompt", "x",
        "--W", "32", "--H", "32", "--steps", "1", "--network_weights", str(path)]))
    _check_message(err, path, kind)
    assert not list((tmp_path / "images").glob("*.png"))


def test_check_lora_weights_names_them_without_refusing(trained, tmp_path, capsys):
    path = _variant(trained[0], tmp_path / "foreign.safetensors", "tucker")
    check_lora_weights.main([str(path)])
    out = capsys.readouterr().out
    assert "warning: 5 tensors are not read by this project" in out and "Tucker decomposition" in out


def test_the_line_between_legitimate_extras_and_foreign_tensors(trained, tiny_parts, tmp_path, capsys):
    """Loaded exactly: sd-scripts' text-encoder spelling and transformers-5's, files without alpha (alpha = rank),
    files that train fewer modules (the rest keep their weights, as in sd-scripts). Refused: one Tucker lora_mid more."""
    trained_file = trained[0]
    weights = load_file(str(trained_file))
    parts = copy.deepcopy(tiny_parts["tiny-sd1"])
    with pytest.raises(UserError, match=f"1 of its {len(weights) + 1} tensors are not understood"):
        network = lora.create_network(1.0, 4, 2, None, parts.text_encoder, parts.unet, conv_dim="2", conv_alpha="1")
        network.load_state_dict_flexible({**weights, "lora_unet_conv_in.lora_mid.weight": torch.ones(1, 32)})
    variants = {
        "ours": weights,
        "lycoris te names": {k.replace("lora_te_text_model_encoder_", "lora_te_encoder_"): v for k, v in weights.items()},
        "unet only": {k: v for k, v in weights.items() if k.startswith("lora_unet_")},
        "no alpha": {k: v for k, v in weights.items() if not k.endswith(".alpha")},
    }
    for name, variant in variants.items():
        path = tmp_path / f"{name.replace(' ', '_')}.safetensors"
        save_file(variant, str(path))
        parts = copy.deepcopy(tiny_parts["tiny-sd1"])
        network = network_from_weights(1.0, path, parts.text_encoder, parts.unet)
        network.load_weights(path)
        loaded, _ = read_network_file(path)
        state = network.state_dict()
        assert all(torch.equal(state[k], v) for k, v in loaded.items()), name
        # --network_weights into a network built from flags: modules the file lacks keep their initial weights
        fresh = lora.create_network(1.0, 4, 2, None, parts.text_encoder, parts.unet, conv_dim="2", conv_alpha="1")
        before = {k: v.clone() for k, v in fresh.state_dict().items()}
        fresh.load_weights(path)
        after = fresh.state_dict()
        assert all(torch.equal(after[k], loaded[k] if k in loaded else before[k]) for k in after), name
    assert "error" not in capsys.readouterr().err


def test_network_weights_without_the_files_layers_is_refused_with_the_fix(trained, tmp_path, capsys):
    trained_file, data = trained
    flags = _common(data, tmp_path / "out") + ["--network_weights", str(trained_file)]  # no conv_dim: no LoCon layers
    err = _one_line_error(capsys, lambda: train_network.main(flags))
    assert f"error: {trained_file}: " in err and "do not fit this network" in err and "--dim_from_weights" in err, err


def test_modules_left_out_by_train_unet_only_are_named_in_a_warning(trained, tiny_parts, capsys):
    parts = copy.deepcopy(tiny_parts["tiny-sd1"])
    network = lora.create_network(1.0, 4, 2, None, parts.text_encoder, parts.unet, conv_dim="2", conv_alpha="1")
    network.apply_to(parts.text_encoder, parts.unet, apply_text_encoder=False, apply_unet=True)
    network.load_weights(trained[0])
    err = capsys.readouterr().err
    assert "warning:" in err and "not trained in this run (--network_train_unet_only" in err, err
    weights = load_file(str(trained[0]))
    assert all(torch.equal(v, weights[k]) for k, v in network.state_dict().items())


def test_a_file_of_another_rank_is_refused_not_a_traceback(tiny_parts, tmp_path):
    parts = copy.deepcopy(tiny_parts["tiny-sd1"])
    lora.create_network(1.0, 8, 2, None, parts.text_encoder, parts.unet).save_weights(str(tmp_path / "r8.safetensors"))
    network = lora.create_network(1.0, 4, 2, None, parts.text_encoder, parts.unet)  # --network_dim 4
    with pytest.raises(UserError, match=r"r8.safetensors: lora_\S+ has shape \(8, 32\) but this network's is "
                                        r"\(4, 32\).*add --dim_from_weights"):
        network.load_weights(tmp_path / "r8.safetensors")


def test_layers_outside_our_targets_that_the_model_has_are_applied(tiny_parts, tmp_path):
    """LyCORIS presets also adapt conv_in, time_embedding, ...: every Linear/Conv2d a file names is applied, as
    AUTOMATIC1111 and ComfyUI do (they were skipped with a warning before)."""
    parts = copy.deepcopy(tiny_parts["tiny-sd1"])
    network = lora.create_network(1.0, 4, 2, None, parts.text_encoder, parts.unet)
    weights = dict(network.state_dict())
    generator = torch.Generator().manual_seed(0)
    conv_in = parts.unet.conv_in
    weights["lora_unet_conv_in.lora_down.weight"] = torch.randn(2, conv_in.in_channels, 3, 3, generator=generator)
    weights["lora_unet_conv_in.lora_up.weight"] = torch.randn(conv_in.out_channels, 2, 1, 1, generator=generator)
    weights["lora_unet_conv_in.alpha"] = torch.tensor(2.0)
    save_file(weights, str(tmp_path / "full.safetensors"))
    rebuilt = network_from_weights(1.0, tmp_path / "full.safetensors", parts.text_encoder, parts.unet)
    rebuilt.load_weights(tmp_path / "full.safetensors")
    module = next(m for m in rebuilt.unet_loras if m.lora_name == "lora_unet_conv_in")
    assert torch.equal(module.lora_up.weight, weights["lora_unet_conv_in.lora_up.weight"])
    before = conv_in.weight.clone()
    rebuilt.merge_to(parts.text_encoder, parts.unet)
    assert not torch.equal(conv_in.weight, before)


def test_base_weights_are_merged_into_the_model(trained, tiny_parts):
    """--base_weights merges the file's ΔW (it merged a freshly initialised network, so nothing, before)."""
    from library.methods.network_method import _merge_base_weights

    parts = copy.deepcopy(tiny_parts["tiny-sd1"])
    layer = parts.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    before = layer.weight.clone()
    config = SimpleNamespace(base_weights=[str(trained[0])], base_weights_multiplier=[0.5])
    _merge_base_weights(config, parts, "networks.lora")
    reference = copy.deepcopy(tiny_parts["tiny-sd1"])
    network = network_from_weights(0.5, trained[0], reference.text_encoder, reference.unet)
    network.load_weights(trained[0])
    module = next(m for m in network.unet_loras if m.org_module is
                  reference.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q)
    expected = before + 0.5 * module.delta_weight().detach()
    torch.testing.assert_close(layer.weight, expected)
    assert not torch.equal(layer.weight, before)
