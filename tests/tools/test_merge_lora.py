"""tools/merge_lora.py and tools/svd_merge_lora.py: merging into a checkpoint equals applying at run time (every
algorithm), LoRA + LoRA by concatenation (exact) and by sd-scripts' rule, SVD merging, and one-line errors."""

from __future__ import annotations

import copy
import importlib
import math
import re

import pytest
import torch

from library.models.loading import load_components
from networks.files import read_network_file
from networks.network import network_from_weights
from networks.registry import ALGORITHMS as REGISTRY, module_class
from tools import merge_lora, svd_merge_lora

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RATIO = 0.7
# float32 throughout; a merged weight and the applied adapter differ only by rounding of W + ΔW vs W·x + ΔW·x.
ATOL = 1e-5
SVD_RTOL = 1e-4  # relative Frobenius error of an SVD re-factorisation at full rank

# case -> (adapter class, network_args, std of the random factors): plain LoRA, and every registered algorithm with
# 3×3 convolutions (named as the tools name it: LoCon, LoHa, LoKr). LoHa multiplies four factors, so it needs larger
# ones for a visible ΔW; LoKr's kron of two, a little larger than LoRA's.
CONV = {"conv_dim": "2", "conv_alpha": "1"}
# How the others reach the 3×3 convolutions: OFT's own switch; DyLoRA's conv_dim must equal network_dim (4 here).
OWN_CONV = {"oft": {"enable_conv": "true"}}
STD = {"loha": 0.3, "lokr": 0.1}


def _cases() -> dict:
    cases = {"lora": (module_class("lora"), {}, 0.05), "dora": (module_class("lora"), {"dora_wd": "true"}, 0.05)}
    for name in REGISTRY:
        cls = module_class(name)
        if cls.FILE_ALGORITHM:  # DyLoRA writes LoCon files: the tools read them as such (the locon case)
            continue
        cases[(cls.CONV_LABEL or cls.LABEL).lower()] = (cls, OWN_CONV.get(name, CONV), STD.get(name, 0.05))
    return cases


ALGORITHMS = _cases()


def _network_file(parts, path, algorithm, *, seed=0, dim=4, alpha=2.0):
    """A network of `algorithm` with non-zero seeded random weights over a copy of `parts`, saved to `path`."""
    cls, net_args, std = ALGORITHMS[algorithm]
    model = copy.deepcopy(parts)
    create_network = importlib.import_module(cls.MODULE).create_network
    network = create_network(1.0, dim, alpha, None, model.text_encoder, model.unet, **net_args)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in network.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std)
    network.save_weights(path, metadata={"ss_v2": "False", "ss_base_model_version": "sd_v1"})
    return path


def _outputs(parts):
    """UNet output for fixed latents/timestep/context and text-encoder output for fixed token ids."""
    generator = torch.Generator().manual_seed(5)
    x, ctx = torch.randn(1, 4, 16, 16, generator=generator), torch.randn(1, 77, 32, generator=generator)
    ids = torch.randint(0, 49408, (1, 77), generator=generator)
    with torch.no_grad():
        return parts.unet(x, torch.tensor([10]), ctx).sample, parts.text_encoder(ids).last_hidden_state


def _applied(parts, files_and_multipliers):
    """Outputs of a fresh copy of `parts` with the files applied at run time (not merged)."""
    model = copy.deepcopy(parts)
    for path, multiplier in files_and_multipliers:
        network = network_from_weights(multiplier, path, model.text_encoder, model.unet, for_inference=True)
        network.load_weights(path)
        network.apply_to(model.text_encoder, model.unet)
    return _outputs(model)


@pytest.fixture(scope="module")
def sd1(tiny_parts):
    return tiny_parts["tiny-sd1"]


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_merging_into_a_checkpoint_equals_applying_at_run_time(algorithm, sd1, tiny_files, tmp_path, capsys):
    net = _network_file(sd1, tmp_path / f"{algorithm}.safetensors", algorithm)
    out = tmp_path / "merged.safetensors"
    merge_lora.main(["--sd_model", str(tiny_files["tiny-sd1"]["safetensors"]), "--models", str(net),
                     "--ratios", str(RATIO), "--save_to", str(out)])
    printed = capsys.readouterr().out
    cls, net_args, _ = ALGORITHMS[algorithm]
    # what the file is: DyLoRA writes a LoCon here, DoRA is named on top of its algorithm
    expected_name = {"dora": "LoRA \\(DoRA\\)"}.get(
        algorithm, cls.CONV_LABEL if net_args and cls.CONV_LABEL else cls.LABEL)
    assert re.search(rf"merged {net.name} \({expected_name}\) at ratio 0.7: \d+ modules", printed), printed
    merged = _outputs(load_components(str(out)))
    applied = _applied(sd1, [(net, RATIO)])
    base = _outputs(sd1)
    for m, a, b, adapted in zip(merged, applied, base, (True, cls.TEXT_ENCODER)):
        if adapted:  # the network changes the outputs well beyond the tolerance (OFT leaves the text encoder)
            assert (a - b).abs().max() > 100 * ATOL
        torch.testing.assert_close(m, a, atol=ATOL, rtol=0)


def test_merging_into_a_diffusers_folder(sd1, tiny_files, tmp_path):
    net = _network_file(sd1, tmp_path / "lora.safetensors", "locon")
    out = tmp_path / "merged-diffusers"
    merge_lora.main(["--sd_model", str(tiny_files["tiny-sd1"]["diffusers"]), "--models", str(net),
                     "--ratios", str(RATIO), "--save_to", str(out)])
    assert (out / "model_index.json").is_file()
    for m, a in zip(_outputs(load_components(str(out))), _applied(sd1, [(net, RATIO)])):
        torch.testing.assert_close(m, a, atol=ATOL, rtol=0)


def test_two_loras_concatenated_equal_both_applied(sd1, tmp_path):
    a = _network_file(sd1, tmp_path / "a.safetensors", "locon", seed=1, dim=4, alpha=2.0)
    b = _network_file(sd1, tmp_path / "b.safetensors", "lora", seed=2, dim=2, alpha=1.0)
    out = tmp_path / "ab.safetensors"
    merge_lora.main(["--models", str(a), str(b), "--ratios", "0.7", "-0.4", "--concat", "--save_to", str(out)])
    weights, metadata = read_network_file(out)
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert weights[f"{name}.lora_down.weight"].shape[0] == 6 and float(weights[f"{name}.alpha"]) == 6.0
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_v2"] == "False"
    assert metadata["ss_training_comment"] == "concatenated from a.safetensors (0.7), b.safetensors (-0.4)"
    for m, e in zip(_applied(sd1, [(out, 1.0)]), _applied(sd1, [(a, 0.7), (b, -0.4)])):
        torch.testing.assert_close(m, e, atol=ATOL, rtol=0)


def test_equal_ranks_without_concat_follow_sd_scripts(sd1, tmp_path, capsys):
    a = _network_file(sd1, tmp_path / "a.safetensors", "lora", seed=1, dim=4, alpha=2.0)
    b = _network_file(sd1, tmp_path / "b.safetensors", "lora", seed=2, dim=4, alpha=8.0)
    out = tmp_path / "ab.safetensors"
    merge_lora.main(["--models", str(a), str(b), "--ratios", "0.7", "-0.5", "--save_to", str(out)])
    assert "merged 2 LoRAs into" in capsys.readouterr().out
    merged, metadata = read_network_file(out)
    wa, wb = read_network_file(a)[0], read_network_file(b)[0]
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    # sd-scripts: s = sqrt(alpha / first alpha) * ratio; up gets |s|, down gets s; alpha is the first file's.
    sa, sb = 0.7, math.sqrt(8.0 / 2.0) * -0.5
    up = wa[f"{name}.lora_up.weight"] * abs(sa) + wb[f"{name}.lora_up.weight"] * abs(sb)
    down = wa[f"{name}.lora_down.weight"] * sa + wb[f"{name}.lora_down.weight"] * sb
    torch.testing.assert_close(merged[f"{name}.lora_up.weight"], up, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(merged[f"{name}.lora_down.weight"], down, atol=1e-7, rtol=1e-6)
    assert float(merged[f"{name}.alpha"]) == 2.0
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "2.0"


def _delta(weights, name):
    up, down = weights[f"{name}.lora_up.weight"].float(), weights[f"{name}.lora_down.weight"].float()
    return (up.flatten(1) @ down.flatten(1)) * float(weights[f"{name}.alpha"]) / down.shape[0]


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_svd_merge_of_a_file_with_itself_reproduces_it(sd1, tmp_path, capsys):
    src = _network_file(sd1, tmp_path / "locon.safetensors", "locon", dim=4, alpha=2.0)
    out = tmp_path / "svd.safetensors"
    report = svd_merge_lora.main(["--models", str(src), str(src), "--ratios", "0.5", "0.5", "--new_rank", "4",
                                  "--new_conv_rank", "2", "--save_to", str(out)])
    assert "average retained Frobenius norm 100.00%" in capsys.readouterr().out
    original, merged = read_network_file(src)[0], read_network_file(out)[0]
    names = {k.removesuffix(".lora_down.weight") for k in original if k.endswith(".lora_down.weight")}
    assert names == {m.name for m in report}
    for name in names:
        assert _rel(_delta(merged, name), _delta(original, name)) < SVD_RTOL, name
    lower = svd_merge_lora.main(["--models", str(src), "--new_rank", "1", "--save_to", str(tmp_path / "r1.pt")])
    assert all(m.rank == 1 for m in lower) and all(m.retained < 1 for m in lower)


@pytest.mark.parametrize("algorithm", [name for name, (cls, args, _) in ALGORITHMS.items()
                                       if name != "lora" and cls.ADDITIVE and "dora_wd" not in args])
def test_svd_merge_rebuilds_every_algorithms_deltas(algorithm, sd1, tmp_path):
    src = _network_file(sd1, tmp_path / f"{algorithm}.safetensors", algorithm, dim=2)
    out = tmp_path / "svd.safetensors"
    svd_merge_lora.main(["--models", str(src), "--ratios", "-0.5", "--new_rank", "64", "--save_to", str(out)])
    merged = read_network_file(out)[0]
    model = copy.deepcopy(sd1)
    network = network_from_weights(1.0, src, model.text_encoder, model.unet)
    network.load_weights(src)
    with torch.no_grad():
        for module in network.text_encoder_loras + network.unet_loras:
            expected = -0.5 * module.delta_weight().flatten(1)
            if module.org_module.weight.shape[2:] == (3, 3):  # told from a Linear by the layer's name
                assert merged[f"{module.lora_name}.lora_down.weight"].shape[1:] == module.org_module.weight.shape[1:]
            assert _rel(_delta(merged, module.lora_name), expected) < SVD_RTOL, module.lora_name


def _error(capsys, main, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    return err


def test_errors_are_one_line(sd1, tiny_files, tmp_path, capsys):
    a = _network_file(sd1, tmp_path / "a.safetensors", "lora")
    h = _network_file(sd1, tmp_path / "h.safetensors", "loha")
    out = str(tmp_path / "out.safetensors")
    assert "got 1 values for 2 --models" in _error(capsys, merge_lora.main,
                                                   ["--models", str(a), str(a), "--ratios", "1", "--save_to", out])
    assert "got 2 values for 1 --models" in _error(capsys, svd_merge_lora.main,
                                                   ["--models", str(a), "--ratios", "1", "1", "--save_to", out])
    missing = str(tmp_path / "nope.safetensors")
    assert "no such file" in _error(capsys, merge_lora.main, ["--models", missing, "--save_to", out])
    assert "no such file" in _error(capsys, svd_merge_lora.main, ["--models", missing, "--save_to", out])
    err = _error(capsys, merge_lora.main, ["--models", str(a), str(h), "--save_to", out])
    assert "loha" in err and "supports LoRA/LoCon" in err and "--sd_model" in err
    assert "is also an input" in _error(capsys, merge_lora.main, ["--models", str(a), "--save_to", str(a)])
    assert "is also an input" in _error(capsys, svd_merge_lora.main, ["--models", str(a), "--save_to", str(a)])
    base = str(tiny_files["tiny-sd1"]["safetensors"])
    assert "is also an input" in _error(capsys, merge_lora.main,
                                        ["--sd_model", base, "--models", str(a), "--save_to", base])
    assert "refusing to overwrite" in _error(capsys, merge_lora.main,
                                             ["--sd_model", base, "--models", str(a), "--save_to", str(h)])
    assert not (tmp_path / "out.safetensors").exists()
