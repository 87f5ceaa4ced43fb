"""sd-scripts command lines for tools/merge_lora.py, svd_merge_lora.py, extract_lora_from_models.py and resize_lora.py
run unchanged: --no_metadata (only the minimal ss_* keys), merge_lora's --shuffle (ΔW unchanged), extract's
--load_precision and resize's --svd_lowrank_niter (accepted; the exact SVD is used)."""

from __future__ import annotations

import copy

import pytest
import torch

from library.formats.kohya_metadata import MINIMUM_KEYS
from networks import lora
from networks.files import read_network_file
from tests.helpers import planted_low_rank_file
from tools import extract_lora_from_models, merge_lora, resize_lora, svd_merge_lora

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HASH_KEYS = {"sshs_model_hash", "sshs_legacy_hash"}  # written on every safetensors save, as sd-scripts does
MINIMAL_KEYS = set(MINIMUM_KEYS) | HASH_KEYS


def _lora_file(parts, path, *, seed, dim=4, alpha=2.0, conv=True):
    """A LoCon (LoRA with conv=False) with seeded random factors over a copy of `parts`."""
    model = copy.deepcopy(parts)
    net_args = {"conv_dim": "2", "conv_alpha": "1"} if conv else {}
    network = lora.create_network(1.0, dim, alpha, None, model.text_encoder, model.unet, **net_args)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in network.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    network.save_weights(path, metadata={"ss_v2": "False", "ss_base_model_version": "sd_v1",
                                         "ss_training_comment": "a comment", "ss_learning_rate": "0.0001"})
    return path


def _names(weights):
    return sorted(k.removesuffix(".lora_down.weight") for k in weights if k.endswith(".lora_down.weight"))


def _delta(weights, name):
    up, down = weights[f"{name}.lora_up.weight"].double(), weights[f"{name}.lora_down.weight"].double()
    return (up.flatten(1) @ down.flatten(1)) * float(weights[f"{name}.alpha"]) / down.shape[0]


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def sd1(tiny_parts):
    return tiny_parts["tiny-sd1"]


@pytest.fixture(scope="module")
def two_loras(sd1, tmp_path_factory):
    root = tmp_path_factory.mktemp("flags-loras")
    return _lora_file(sd1, root / "a.safetensors", seed=1), _lora_file(sd1, root / "b.safetensors", seed=2)


@pytest.mark.parametrize("concat", [False, True])
def test_merge_shuffle_and_no_metadata(two_loras, tmp_path, concat):
    a, b = two_loras
    common = ["--models", str(a), str(b), "--ratios", "0.7", "-0.4", "--precision", "float"]
    common += ["--concat"] if concat else []
    plain, shuffled = tmp_path / "plain.safetensors", tmp_path / "shuffled.safetensors"
    merge_lora.main([*common, "--save_to", str(plain)])
    merge_lora.main([*common, "--shuffle", "--no_metadata", "--save_to", str(shuffled)])
    w_plain, m_plain = read_network_file(plain)
    w_shuf, m_shuf = read_network_file(shuffled)
    assert "ss_training_comment" in m_plain
    assert set(m_shuf) == MINIMAL_KEYS
    assert {k: m_shuf[k] for k in MINIMUM_KEYS} == {k: m_plain[k] for k in MINIMUM_KEYS}
    names = _names(w_plain)
    assert names == _names(w_shuf)
    moved = 0
    for name in names:
        torch.testing.assert_close(_delta(w_shuf, name), _delta(w_plain, name), atol=1e-6, rtol=0)
        moved += not torch.equal(w_shuf[f"{name}.lora_down.weight"], w_plain[f"{name}.lora_down.weight"])
    assert moved > len(names) // 2  # the rank order really was permuted
    again = tmp_path / "again.safetensors"
    merge_lora.main([*common, "--shuffle", "--save_to", str(again)])
    w_again, _ = read_network_file(again)
    assert all(torch.equal(w_again[k], w_shuf[k]) for k in w_shuf)  # seeded: reproducible


def test_merge_into_model_accepts_the_flags(two_loras, tiny_files, tmp_path):
    out = tmp_path / "merged.safetensors"
    merge_lora.main(["--sd_model", str(tiny_files["tiny-sd1"]["safetensors"]), "--models", str(two_loras[0]),
                     "--ratios", "0.5", "--save_to", str(out), "--no_metadata", "--shuffle", "--save_precision",
                     "fp16"])
    assert out.is_file()


def test_svd_merge_no_metadata(two_loras, tmp_path):
    a, b = two_loras
    out = tmp_path / "svd.safetensors"
    svd_merge_lora.main(["--models", str(a), str(b), "--ratios", "0.6", "0.4", "--new_rank", "4",
                         "--new_conv_rank", "2", "--save_to", str(out), "--no_metadata", "--precision", "float"])
    weights, metadata = read_network_file(out)
    assert set(metadata) == MINIMAL_KEYS
    assert (metadata["ss_v2"], metadata["ss_base_model_version"], metadata["ss_network_module"]) == (
        "False", "sd_v1", "networks.lora")
    assert metadata["ss_network_dim"] == "4" and _names(weights)


@pytest.fixture(scope="module")
def tuned_model(sd1, tmp_path_factory):
    """A tuned tiny SD 1.x file: a seeded rank-2 change added to every LoRA-targeted weight; (path, changes)."""
    path = tmp_path_factory.mktemp("flags-extract") / "tuned.safetensors"
    return path, planted_low_rank_file(sd1, path)


def _extract(tiny_files, tuned_model, out, *flags):
    extract_lora_from_models.main([
        "--model_org", str(tiny_files["tiny-sd1"]["safetensors"]), "--model_tuned", str(tuned_model[0]),
        "--save_to", str(out), "--dim", "2", "--clamp_quantile", "1.0", "--min_diff", "0.001", *flags])
    return read_network_file(out)


def test_extract_no_metadata_and_load_precision(tiny_files, tuned_model, tmp_path):
    changes = tuned_model[1]
    exact, m_exact = _extract(tiny_files, tuned_model, tmp_path / "float.safetensors", "--load_precision", "float")
    assert any(k.startswith("modelspec.") for k in m_exact)
    half, m_half = _extract(tiny_files, tuned_model, tmp_path / "fp16.safetensors", "--load_precision", "fp16",
                            "--no_metadata", "--save_precision", "float", "--device", "cpu")
    assert set(m_half) == MINIMAL_KEYS
    assert {k: m_half[k] for k in MINIMUM_KEYS} == {k: m_exact[k] for k in MINIMUM_KEYS}
    assert _names(half) == _names(exact) == sorted(changes)
    assert all(half[k].dtype == torch.float32 for k in half)
    worst_exact = max(_rel(_delta(exact, n), changes[n].flatten(1).double()) for n in changes)
    worst_half = max(_rel(_delta(half, n), changes[n].flatten(1).double()) for n in changes)
    assert worst_exact < 1e-4
    assert worst_half < 2e-2  # fp16 rounding of both models' weights, differences still taken in float32
    assert worst_half > worst_exact  # the models really were loaded in fp16


def test_resize_accepts_svd_lowrank_niter(two_loras, tmp_path):
    exact, lowrank = tmp_path / "exact.safetensors", tmp_path / "niter.safetensors"
    resize_lora.main(["--model", str(two_loras[0]), "--save_to", str(exact), "--new_rank", "2"])
    resize_lora.main(["--model", str(two_loras[0]), "--save_to", str(lowrank), "--new_rank", "2",
                      "--svd_lowrank_niter", "5", "--save_precision", "float", "--device", "cpu"])
    w_exact, _ = read_network_file(exact)
    w_niter, _ = read_network_file(lowrank)
    assert set(w_exact) == set(w_niter) and all(torch.equal(w_exact[k], w_niter[k]) for k in w_exact)


@pytest.mark.parametrize("tool, flags", [
    (merge_lora, ("--no_metadata", "--shuffle")),
    (svd_merge_lora, ("--no_metadata",)),
    (extract_lora_from_models, ("--no_metadata", "--load_precision")),
    (resize_lora, ("--svd_lowrank_niter",)),
])
def test_help_lists_the_flags(tool, flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in flags:
        assert flag in text
    if tool is resize_lora:
        assert "the exact SVD is used" in text and "no effect" in text
    if tool is merge_lora:
        assert "ΔW is unchanged" in text and "accepted; has no effect" in text
