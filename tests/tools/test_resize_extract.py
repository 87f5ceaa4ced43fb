"""tools/extract_lora_from_models.py and tools/resize_lora.py: exact recovery of a known low-rank change, resizing
to the best rank-r approximation with the scale kept, sd-scripts' metadata, and one-line errors."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from library.models.saving import save_single_file
from networks import lora
from networks.files import read_network_file
from networks.svd import dynamic_rank
from tools import extract_lora_from_models, resize_lora

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CHANGE_RANK = 2


def _with_known_change(parts, seed=0, *, text_encoder=True, size=0.1):
    """A deep copy of `parts` with a seeded rank-2 change B·A added to every LoRA-targeted weight; (copy, changes)."""
    tuned = copy.deepcopy(parts)
    generator = torch.Generator().manual_seed(seed)
    network = lora.create_network(1.0, 1, 1, None, tuned.text_encoder, tuned.unet)
    changes = {}
    with torch.no_grad():
        for module in (network.text_encoder_loras if text_encoder else []) + network.unet_loras:
            weight = module.org_module.weight
            b = torch.randn(weight.shape[0], CHANGE_RANK, generator=generator) * size
            a = torch.randn(CHANGE_RANK, weight[0].numel(), generator=generator) * size
            changes[module.lora_name] = (b @ a).reshape(weight.shape)
            weight += changes[module.lora_name]
    return tuned, changes


def _delta(weights, name):
    """ΔW = up·down·alpha/rank of one module, as a matrix."""
    up, down = weights[f"{name}.lora_up.weight"].float(), weights[f"{name}.lora_down.weight"].float()
    return (up.flatten(1) @ down.flatten(1)) * float(weights[f"{name}.alpha"]) / down.shape[0]


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def extracted(tiny_parts, tiny_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    tuned, changes = _with_known_change(tiny_parts["tiny-sd1"])
    save_single_file(tuned, root / "tuned.safetensors")
    out = root / "extracted.safetensors"
    report = extract_lora_from_models.main([
        "--model_org", str(tiny_files["tiny-sd1"]["safetensors"]), "--model_tuned", str(root / "tuned.safetensors"),
        "--save_to", str(out), "--dim", "2", "--clamp_quantile", "1.0", "--min_diff", "0.001"])
    return {"path": out, "tuned": tuned, "changes": changes, "report": report}


def test_extract_recovers_every_known_change(extracted):
    weights, metadata = read_network_file(extracted["path"])
    changes = extracted["changes"]
    assert {k.rsplit(".", 2)[0] for k in weights} == set(changes)
    assert any(name.startswith("lora_te_") for name in changes)
    for name, change in changes.items():
        assert weights[f"{name}.lora_down.weight"].shape[0] == 2 and float(weights[f"{name}.alpha"]) == 2.0
        assert _rel(_delta(weights, name), change.flatten(1)) < 1e-4, name
    assert all(m.retained == pytest.approx(1.0, abs=1e-5) for m in extracted["report"])
    assert (metadata["ss_network_module"], metadata["ss_network_dim"], metadata["ss_network_alpha"]) == (
        "networks.lora", "2", "2.0")
    assert metadata["ss_v2"] == "False" and metadata["ss_base_model_version"] == "sd_v1"


def test_extracted_lora_applied_at_run_time_reproduces_the_tuned_model(extracted, tiny_parts):
    base = copy.deepcopy(tiny_parts["tiny-sd1"])
    network = lora.create_network_from_weights(1.0, str(extracted["path"]), None, base.text_encoder, base.unet)
    network.load_weights(str(extracted["path"]))
    network.apply_to(base.text_encoder, base.unet)
    network.eval()
    generator = torch.Generator().manual_seed(0)
    sample, context = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 7, 32, generator=generator)
    tokens = torch.randint(0, 1000, (1, 7), generator=generator)
    tuned = extracted["tuned"]
    with torch.no_grad():
        got = base.unet(sample, torch.tensor([10]), encoder_hidden_states=context).sample
        want = tuned.unet(sample, torch.tensor([10]), encoder_hidden_states=context).sample
        untouched = tiny_parts["tiny-sd1"].unet(sample, torch.tensor([10]), encoder_hidden_states=context).sample
        text_got, text_want = base.text_encoder(tokens)[0], tuned.text_encoder(tokens)[0]
    assert _rel(got, want) < 1e-3 < _rel(untouched, want)
    assert _rel(text_got, text_want) < 1e-3


def test_text_encoder_within_min_diff_is_left_out_entirely(tiny_parts):
    base = tiny_parts["tiny-sd1"]
    tuned, _ = _with_known_change(base, seed=1, text_encoder=False)
    with torch.no_grad():  # a tiny text-encoder change, below --min_diff
        tuned.text_encoder.encoder.layers[0].mlp.fc1.weight += 1e-4
    diffs = extract_lora_from_models.weight_differences(base, tuned, conv_dim=None, min_diff=0.01)
    assert diffs and not any(name.startswith("lora_te_") for name in diffs)
    with_te = extract_lora_from_models.weight_differences(base, tuned, conv_dim=None, min_diff=1e-5)
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1" in with_te


def test_default_clamp_quantile_clips_the_factors(tiny_parts):
    _, changes = _with_known_change(tiny_parts["tiny-sd1"], seed=2, text_encoder=False)
    clipped, _ = extract_lora_from_models.extract(changes, 2, clamp_quantile=0.99)
    exact, _ = extract_lora_from_models.extract(changes, 2, clamp_quantile=1.0)
    largest = lambda weights, name: max(float(weights[f"{name}.{side}.weight"].abs().max())  # noqa: E731
                                        for side in ("lora_up", "lora_down"))
    assert all(largest(clipped, name) < largest(exact, name) for name in changes)


# ------------------------------------------------------------------ resize


@pytest.fixture(scope="module")
def rank8(tiny_parts, tmp_path_factory):
    """A rank-8 LoCon (3×3 convolutions at rank 4) with random factors, alpha 4 (conv alpha 2)."""
    parts = copy.deepcopy(tiny_parts["tiny-sd1"])
    network = lora.create_network(1.0, 8, 4, None, parts.text_encoder, parts.unet, conv_dim="4", conv_alpha="2")
    torch.manual_seed(0)
    with torch.no_grad():
        for param in network.parameters():
            param.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("resize") / "rank8.safetensors"
    network.save_weights(str(path), torch.float32, {"ss_network_dim": "8", "ss_network_alpha": "4.0",
                                                    "ss_training_comment": "original",
                                                    "ss_network_args": '{"conv_dim": "4", "conv_alpha": "2"}'})
    return path


def _resize(capsys, src, dst, *flags):
    report = resize_lora.main(["--model", str(src), "--save_to", str(dst), *flags])
    out = capsys.readouterr().out
    percent = float(re.search(r"average retained Frobenius norm ([\d.]+)%", out).group(1))
    return report, percent


def test_resize_keeps_the_best_rank_r_approximation(rank8, tmp_path, capsys):
    original, _ = read_network_file(rank8)
    names = sorted({k.rsplit(".", 2)[0] for k in original})
    averages = []
    for rank in (8, 4, 2, 1):
        report, percent = _resize(capsys, rank8, tmp_path / f"r{rank}.safetensors", "--new_rank", str(rank))
        weights, metadata = read_network_file(tmp_path / f"r{rank}.safetensors")
        averages.append(percent)
        assert metadata["ss_network_dim"] == str(rank) and metadata["ss_network_alpha"] == str(4.0 * rank / 8)
        assert f"resized from 8 to {rank}" in metadata["ss_training_comment"]
        assert metadata["ss_training_comment"].endswith("original")
        for name in names:
            old_rank = original[f"{name}.lora_down.weight"].shape[0]
            kept = min(rank, old_rank)
            assert weights[f"{name}.lora_down.weight"].shape == (kept, *original[f"{name}.lora_down.weight"].shape[1:])
            # the scale alpha/rank is kept: alpha' = old scale · new rank
            assert float(weights[f"{name}.alpha"]) / kept == pytest.approx(float(original[f"{name}.alpha"]) / old_rank)
            U, S, Vh = torch.linalg.svd(_delta(original, name), full_matrices=False)
            best = (U[:, :kept] * S[:kept]) @ Vh[:kept]
            assert _rel(_delta(weights, name), best) < 1e-4, (rank, name)
        assert sum(m.retained for m in report) / len(report) == pytest.approx(percent / 100, abs=1e-4)
    assert averages[0] == pytest.approx(100.0, abs=0.01)
    assert averages == sorted(averages, reverse=True) and len(set(averages)) == 4


@pytest.mark.parametrize("method, param", [("sv_ratio", 2.0), ("sv_fro", 0.8), ("sv_cumulative", 0.5)])
def test_dynamic_resize_picks_ranks_within_bounds(rank8, tmp_path, capsys, method, param):
    out = tmp_path / "dynamic.safetensors"
    report, _ = _resize(capsys, rank8, out, "--new_rank", "6", "--dynamic_method", method,
                        "--dynamic_param", str(param), "--save_precision", "fp16")
    original, _ = read_network_file(rank8)
    weights, metadata = read_network_file(out)
    assert weights[f"{report[0].name}.lora_up.weight"].dtype == torch.float16
    assert metadata["ss_network_dim"] == "Dynamic" and metadata["ss_network_alpha"] == "Dynamic"
    assert metadata["ss_training_comment"].startswith(f"Dynamic resize with {method}: {param} from 8")
    for module in report:
        S = torch.linalg.svdvals(_delta(original, module.name))
        assert 1 <= module.new_rank <= min(6, module.old_rank)
        assert module.new_rank == min(dynamic_rank(S, method, param), 6, module.old_rank)
        assert weights[f"{module.name}.lora_down.weight"].shape[0] == module.new_rank


def test_verbose_prints_every_module(rank8, tmp_path, capsys):
    report = resize_lora.main(["--model", str(rank8), "--save_to", str(tmp_path / "v.safetensors"), "--new_rank", "2",
                               "--verbose"])
    out = capsys.readouterr().out
    assert all(m.name in out for m in report) and "fro retained" in out


# ------------------------------------------------------------------ errors


def _one_line_error(capsys, main, argv, expected):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and expected in err, err


def test_resize_errors_are_one_line(rank8, tiny_parts, tmp_path, capsys):
    out = str(tmp_path / "out.safetensors")
    _one_line_error(capsys, resize_lora.main, ["--model", str(tmp_path / "missing.safetensors"), "--save_to", out],
                    "no such file")
    parts = copy.deepcopy(tiny_parts["tiny-sd1"])
    from networks import loha

    loha_net = loha.create_network(1.0, 4, 1, None, parts.text_encoder, parts.unet)
    loha_net.save_weights(str(tmp_path / "loha.safetensors"))
    _one_line_error(capsys, resize_lora.main, ["--model", str(tmp_path / "loha.safetensors"), "--save_to", out],
                    "resize supports LoRA/LoCon")
    _one_line_error(capsys, resize_lora.main, ["--model", str(rank8), "--save_to", out, "--dynamic_method", "sv_magic",
                                               "--dynamic_param", "1"], "--dynamic_method sv_magic")
    _one_line_error(capsys, resize_lora.main, ["--model", str(rank8), "--save_to", out, "--dynamic_method", "sv_fro"],
                    "--dynamic_param")
    _one_line_error(capsys, resize_lora.main, ["--model", str(rank8), "--save_to", out, "--new_rank", "x"],
                    "--new_rank")


def test_extract_errors_are_one_line(tiny_files, tmp_path, capsys):
    base = str(tiny_files["tiny-sd1"]["safetensors"])
    out = str(tmp_path / "out.safetensors")
    _one_line_error(capsys, extract_lora_from_models.main,
                    ["--model_org", base, "--model_tuned", str(tmp_path / "missing.safetensors"), "--save_to", out],
                    "no such file")
    _one_line_error(capsys, extract_lora_from_models.main, ["--model_org", base, "--model_tuned", base,
                                                            "--save_to", out], "nothing to extract")
    _one_line_error(capsys, extract_lora_from_models.main, ["--model_org", base, "--save_to", out], "--model_tuned")
    sd2 = str(tiny_files["tiny-sd2"]["safetensors"])
    _one_line_error(capsys, extract_lora_from_models.main, ["--model_org", base, "--model_tuned", sd2,
                                                            "--save_to", out], "same family")


def test_resize_never_writes_over_its_input(rank8, tmp_path, capsys):
    import shutil

    own = tmp_path / "mine.safetensors"
    shutil.copy(rank8, own)
    before = own.read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        resize_lora.main(["--model", str(own), "--save_to", str(own), "--new_rank", "2"])
    assert exit_info.value.code == 2 and "is also an input; refusing to overwrite it" in capsys.readouterr().err
    assert own.read_bytes() == before
