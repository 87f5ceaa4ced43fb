"""The LoRA tools on SDXL files (tiny-sdxl), with sd-scripts' command lines: merge_lora (sd-scripts'
networks/sdxl_merge_lora.py flags) into a checkpoint equals applying at run time for every adapter type, LoRA+LoRA
merges, svd_merge_lora, resize_lora, extract_lora_from_models (--sdxl), convert_lora round trips, and the
inspection tools. SDXL names: SGM UNet (`lora_unet_input_blocks_4_1_...`), `lora_te1_` / `lora_te2_`."""

from __future__ import annotations

import copy
import importlib
import json

import pytest
import torch
from safetensors.torch import load_file

from library.models.loading import load_components
from networks.files import read_network_file
from networks.network import network_from_weights
from tests.helpers import planted_low_rank_file
from tests.tools.test_merge_lora import ALGORITHMS
from tools import (check_lora_weights, convert_lora, extract_lora_from_models, merge_lora, resize_lora, show_metadata,
                   svd_merge_lora)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RATIO = 0.7
ATOL = 1e-5
SVD_RTOL = 1e-4
SDXL_META = {"ss_v2": "False", "ss_base_model_version": "sdxl_base_v1-0",
             "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}
PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_")
ATTN = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"  # SGM name of down_blocks.1.attentions.0...
RESNET_CONV = "lora_unet_input_blocks_1_0_in_layers_2"  # a ResBlock's 3x3 conv (LoCon)


@pytest.fixture(scope="module")
def sdxl(tiny_parts):
    return tiny_parts["tiny-sdxl"]


@pytest.fixture(scope="module")
def sdxl_file(tiny_files):
    return tiny_files["tiny-sdxl"]["safetensors"]


def _network_file(parts, path, algorithm, *, seed=0, dim=4, alpha=2.0, metadata=None):
    """A seeded random network of `algorithm` over both text encoders and the UNet of a copy of `parts`."""
    cls, net_args, std = ALGORITHMS[algorithm]
    model = copy.deepcopy(parts)
    create_network = importlib.import_module(cls.MODULE).create_network
    network = create_network(1.0, dim, alpha, None, list(model.text_encoders), model.unet, **net_args)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in network.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std)
    if metadata is None:
        metadata = SDXL_META | {"ss_network_module": cls.MODULE, "ss_network_dim": str(dim),
                                "ss_network_alpha": str(alpha), "ss_network_args": json.dumps(net_args)}
    network.save_weights(str(path), metadata=metadata)
    return path


def _modules(weights) -> set[str]:
    return {k.partition(".")[0] for k in weights}


def _outputs(parts):
    """UNet output (with SDXL's pooled text + size conditioning), both text encoders' hidden states and TE2's
    projected pooled output, for fixed inputs."""
    te1, te2 = parts.text_encoders
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, parts.unet.config.cross_attention_dim, generator=generator)
    pooled = torch.randn(1, te2.config.projection_dim, generator=generator)
    ids = torch.randint(0, 49408, (1, 77), generator=generator)
    added = {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])}
    with torch.no_grad():
        unet = parts.unet(x, torch.tensor([10]), context, added_cond_kwargs=added).sample
        out1, out2 = te1(ids), te2(ids)
    return unet, out1.last_hidden_state, out2.last_hidden_state, out2.text_embeds


def _applied(parts, files_and_multipliers):
    model = copy.deepcopy(parts)
    for path, multiplier in files_and_multipliers:
        network = network_from_weights(multiplier, path, list(model.text_encoders), model.unet, for_inference=True)
        network.load_weights(path)
        network.apply_to(list(model.text_encoders), model.unet)
    return _outputs(model)


def _assert_outputs_equal(got, expected, base=None, changed=None):
    for i, (g, e) in enumerate(zip(got, expected)):
        if base is not None and (changed is None or i in changed):
            assert (e - base[i]).abs().max() > 100 * ATOL, i  # the network changes every output (it adapts)
        torch.testing.assert_close(g, e, atol=ATOL, rtol=0)


def _delta(weights, name):
    up, down = weights[f"{name}.lora_up.weight"].double(), weights[f"{name}.lora_down.weight"].double()
    return (up.flatten(1) @ down.flatten(1)) * float(weights[f"{name}.alpha"]) / down.shape[0]


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _error(capsys, main, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


# ------------------------------------------------------------------------------------------------ merge_lora

@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_merging_into_an_sdxl_checkpoint_equals_applying_at_run_time(algorithm, sdxl, sdxl_file, tmp_path, capsys):
    net = _network_file(sdxl, tmp_path / f"{algorithm}.safetensors", algorithm)
    cls = ALGORITHMS[algorithm][0]
    prefixes = [cls.name_prefix(p[:-1]) + "_" for p in PREFIXES if cls.TEXT_ENCODER or p == "lora_unet_"]
    assert {p for p in prefixes if any(m.startswith(p) for m in _modules(load_file(str(net))))} == set(prefixes)
    out = tmp_path / "merged.safetensors"
    # sd-scripts' networks/sdxl_merge_lora.py command line.
    merge_lora.main(["--sd_model", str(sdxl_file), "--models", str(net), "--ratios", str(RATIO), "--save_to",
                     str(out), "--precision", "float", "--save_precision", "float"])
    printed = capsys.readouterr().out
    assert f"merged {net.name} (" in printed and "text encoder" in printed
    merged = load_components(str(out))
    assert merged.family.name == "sdxl"
    header = show_metadata.read_metadata(out)
    assert header["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert header["modelspec.merged_from"] == f"{sdxl_file.stem}, {algorithm}"
    _assert_outputs_equal(_outputs(merged), _applied(sdxl, [(net, RATIO)]), _outputs(sdxl),
                          changed=None if cls.TEXT_ENCODER else (0,))  # OFT adapts the UNet only


def test_merging_two_files_into_a_diffusers_folder(sdxl, sdxl_file, tmp_path):
    a = _network_file(sdxl, tmp_path / "a.safetensors", "locon", seed=1)
    b = _network_file(sdxl, tmp_path / "b.safetensors", "loha", seed=2)
    out = tmp_path / "merged-diffusers"
    merge_lora.main(["--sd_model", str(sdxl_file), "--models", str(a), str(b), "--ratios", "0.5", "-0.8",
                     "--save_to", str(out)])
    assert (out / "model_index.json").is_file() and (out / "text_encoder_2").is_dir()
    _assert_outputs_equal(_outputs(load_components(str(out))), _applied(sdxl, [(a, 0.5), (b, -0.8)]))


def test_an_sdxl_lora_into_an_sd1_model_is_one_line(sdxl, tiny_files, tmp_path, capsys):
    net = _network_file(sdxl, tmp_path / "lora.safetensors", "lora")
    err = _error(capsys, merge_lora.main, ["--sd_model", str(tiny_files["tiny-sd1"]["safetensors"]), "--models",
                                           str(net), "--save_to", str(tmp_path / "out.safetensors")])
    assert "SDXL" in err
    assert not (tmp_path / "out.safetensors").exists()


# sd-scripts' --lbws for SDXL: 12 values weight BASE (text encoders), IN04, IN05, IN07, IN08, MID, OUT00..OUT05.
LBWS_12 = "[0, 1, 1, 1, 1, 0.5, 1, 1, 1, -1, 1, 1]"


def _lbw_12(name: str) -> float:
    if name.startswith("lora_te"):
        return 0.0
    if name.startswith("lora_unet_middle_block_"):
        return 0.5
    return -1.0 if name.startswith("lora_unet_output_blocks_3_") else 1.0


def test_merging_into_a_checkpoint_with_sdxl_block_weights(sdxl, sdxl_file, tmp_path):
    net = _network_file(sdxl, tmp_path / "locon.safetensors", "locon")
    out = tmp_path / "merged.safetensors"
    merge_lora.main(["--sd_model", str(sdxl_file), "--models", str(net), "--ratios", str(RATIO), "--lbws", LBWS_12,
                     "--save_to", str(out)])
    model = copy.deepcopy(sdxl)
    network = network_from_weights(RATIO, net, list(model.text_encoders), model.unet, for_inference=True)
    network.load_weights(net)
    network.apply_to(list(model.text_encoders), model.unet)
    weighted = {_lbw_12(m.lora_name) for m in network.text_encoder_loras + network.unet_loras}
    assert weighted == {0.0, 0.5, -1.0, 1.0}
    for module in network.text_encoder_loras + network.unet_loras:
        module.multiplier = RATIO * _lbw_12(module.lora_name)
    merged, base = _outputs(load_components(str(out))), _outputs(sdxl)
    _assert_outputs_equal(merged, _outputs(model))
    torch.testing.assert_close(merged[1], base[1], atol=ATOL, rtol=0)  # BASE 0: text encoders untouched


def test_block_weights_of_the_other_family_are_one_line(sdxl, sdxl_file, tmp_path, capsys):
    net = _network_file(sdxl, tmp_path / "lora.safetensors", "lora")
    out = str(tmp_path / "out.safetensors")
    err = _error(capsys, merge_lora.main, ["--models", str(net), "--lbws", json.dumps([1] * 26), "--save_to", out])
    assert "SD 1.x/2.x blocks" in err and "give it 20 or 12 values" in err
    err = _error(capsys, svd_merge_lora.main, ["--models", str(net), "--lbws", "[1, 2]", "--save_to", out])
    assert "2 values" in err
    err = _error(capsys, merge_lora.main, ["--sd_model", str(sdxl_file), "--models", str(net), "--lbws", "[1,",
                                           "--save_to", out])
    assert "not a JSON list" in err
    assert not (tmp_path / "out.safetensors").exists()


def test_two_sdxl_loras_concatenated_equal_both_applied(sdxl, tmp_path):
    a = _network_file(sdxl, tmp_path / "a.safetensors", "locon", seed=1, dim=4, alpha=2.0)
    b = _network_file(sdxl, tmp_path / "b.safetensors", "locon", seed=2, dim=2, alpha=1.0)
    out = tmp_path / "ab.safetensors"
    merge_lora.main(["--models", str(a), str(b), "--ratios", "0.7", "-0.4", "--concat", "--shuffle",
                     "--save_to", str(out)])
    weights, metadata = read_network_file(out)
    assert _modules(weights) == _modules(read_network_file(a)[0])
    assert weights[f"{ATTN}.lora_down.weight"].shape[0] == 6
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0" and metadata["ss_v2"] == "False"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert metadata["modelspec.merged_from"] == "a, b" and metadata["modelspec.title"] == "ab"
    _assert_outputs_equal(_applied(sdxl, [(out, 1.0)]), _applied(sdxl, [(a, 0.7), (b, -0.4)]))


def test_sdxl_loras_merged_by_sd_scripts_rule_with_no_metadata(sdxl, tmp_path):
    a = _network_file(sdxl, tmp_path / "a.safetensors", "lora", seed=1, alpha=2.0)
    b = _network_file(sdxl, tmp_path / "b.safetensors", "lora", seed=2, alpha=8.0)
    out = tmp_path / "ab.safetensors"
    merge_lora.main(["--models", str(a), str(b), "--ratios", "0.7", "-0.5", "--no_metadata", "--save_to", str(out)])
    merged, metadata = read_network_file(out)
    wa, wb = read_network_file(a)[0], read_network_file(b)[0]
    sa, sb = 0.7, (8.0 / 2.0) ** 0.5 * -0.5
    for name in (ATTN, "lora_te2_text_model_encoder_layers_1_mlp_fc2"):
        up = wa[f"{name}.lora_up.weight"] * abs(sa) + wb[f"{name}.lora_up.weight"] * abs(sb)
        torch.testing.assert_close(merged[f"{name}.lora_up.weight"], up, atol=1e-7, rtol=1e-6)
    # --no_metadata: sd-scripts' minimal ss_* keys only, no modelspec
    assert set(metadata) == {"ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim",
                             "ss_network_alpha", "ss_network_args", "sshs_model_hash", "sshs_legacy_hash"}
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"


# ------------------------------------------------------------------------------------------- svd_merge_lora

def test_svd_merge_of_sdxl_locon_and_loha_rebuilds_the_summed_deltas(sdxl, tmp_path):
    a = _network_file(sdxl, tmp_path / "a.safetensors", "locon", seed=1, dim=2)
    h = _network_file(sdxl, tmp_path / "h.safetensors", "loha", seed=2, dim=2)
    out = tmp_path / "svd.safetensors"
    svd_merge_lora.main(["--models", str(a), str(h), "--ratios", "0.6", "-0.5", "--new_rank", "64",
                         "--new_conv_rank", "64", "--save_to", str(out), "--precision", "float",
                         "--lbws", LBWS_12, "[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"])
    merged, metadata = read_network_file(out)
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0" and metadata["modelspec.merged_from"] == "a, h"
    # the LoHa's 3x3 convolutions (2-D factors) come out as conv LoRA factors, as the layer is a 3x3 conv
    assert merged[f"{RESNET_CONV}.lora_down.weight"].dim() == 4
    model = copy.deepcopy(sdxl)
    expected: dict[str, torch.Tensor] = {}
    for path, ratio in ((a, 0.6), (h, -0.5)):
        network = network_from_weights(1.0, path, list(model.text_encoders), model.unet)
        network.load_weights(path)
        with torch.no_grad():
            for module in network.text_encoder_loras + network.unet_loras:
                weight = _lbw_12(module.lora_name) if path == a else 1.0
                delta = ratio * weight * module.delta_weight().flatten(1).double()
                expected[module.lora_name] = expected.get(module.lora_name, 0) + delta
                if module.org_module.weight.dim() == 4:
                    shape = merged[f"{module.lora_name}.lora_down.weight"].shape
                    assert shape[1:] == module.org_module.weight.shape[1:], module.lora_name
    assert set(expected) == _modules(merged)
    for name, delta in expected.items():
        assert _rel(_delta(merged, name), delta) < SVD_RTOL, name
    _applied(sdxl, [(out, 1.0)])  # the result loads on the SDXL model


# --------------------------------------------------------------------------------------------- resize_lora

def test_resize_sdxl_locon_keeps_names_metadata_and_the_best_approximation(sdxl, tmp_path, capsys):
    src = _network_file(sdxl, tmp_path / "r4.safetensors", "locon", dim=4, alpha=2.0)
    out = tmp_path / "r2.safetensors"
    report = resize_lora.main(["--model", str(src), "--save_to", str(out), "--new_rank", "2", "--new_conv_rank", "1",
                               "--save_precision", "fp16", "--verbose"])
    assert ATTN in capsys.readouterr().out
    original, _ = read_network_file(src)
    resized, metadata = read_network_file(out)
    assert _modules(resized) == _modules(original)
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["ss_network_dim"] == "2" and json.loads(metadata["ss_network_args"])["conv_dim"] == "1"
    assert resized[f"{ATTN}.lora_down.weight"].shape[0] == 2
    assert resized[f"{RESNET_CONV}.lora_down.weight"].shape[0] == 1
    for module in report:
        S = torch.linalg.svdvals(_delta(original, module.name))
        best = float(S[module.new_rank:].pow(2).sum().sqrt() / S.pow(2).sum().sqrt())
        error = _rel(_delta(resized, module.name), _delta(original, module.name))
        assert error == pytest.approx(best, abs=2e-3), module.name  # fp16 output
    _applied(sdxl, [(out, 1.0)])


# -------------------------------------------------------------------------------------------------- extract

@pytest.fixture(scope="module")
def sdxl_tuned(sdxl, tmp_path_factory):
    """tiny-sdxl with a planted rank-2 change in every LoRA-targeted weight (both text encoders, UNet incl. 3x3
    convs); (path, changes)."""
    path = tmp_path_factory.mktemp("sdxl-tuned") / "tuned.safetensors"
    return path, planted_low_rank_file(sdxl, path, conv_dim="1")


def test_extract_from_two_sdxl_checkpoints_recovers_the_planted_change(sdxl, sdxl_file, sdxl_tuned, tmp_path):
    out = tmp_path / "extracted.safetensors"
    extract_lora_from_models.main(["--sdxl", "--model_org", str(sdxl_file), "--model_tuned", str(sdxl_tuned[0]),
                                   "--save_to", str(out), "--dim", "2", "--conv_dim", "2", "--clamp_quantile", "1",
                                   "--min_diff", "0.001", "--save_precision", "float"])
    weights, metadata = read_network_file(out)
    changes = sdxl_tuned[1]
    assert _modules(weights) == set(changes)
    assert {p for p in PREFIXES if any(m.startswith(p) for m in changes)} == set(PREFIXES)
    assert ATTN in changes and RESNET_CONV in changes
    for name, change in changes.items():
        assert _rel(_delta(weights, name), change.flatten(1).double()) < 1e-4, name
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0" and metadata["ss_v2"] == "False"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert metadata["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert metadata["modelspec.resolution"] == "1024x1024"
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "2.0"}
    # the extracted LoRA applied to the base gives the tuned model's outputs
    _assert_outputs_equal(_applied(sdxl, [(out, 1.0)]), _outputs(load_components(str(sdxl_tuned[0]))))


def test_extract_sdxl_flag_refuses_an_sd1_model_and_v2(tiny_files, sdxl_file, tmp_path, capsys):
    sd1 = str(tiny_files["tiny-sd1"]["safetensors"])
    out = str(tmp_path / "x.safetensors")
    err = _error(capsys, extract_lora_from_models.main,
                 ["--sdxl", "--model_org", sd1, "--model_tuned", sd1, "--save_to", out])
    assert "--sdxl" in err and "SD 1" in err
    err = _error(capsys, extract_lora_from_models.main, ["--sdxl", "--v2", "--model_org", str(sdxl_file),
                                                         "--model_tuned", str(sdxl_file), "--save_to", out])
    assert "--v2" in err and "--sdxl" in err
    err = _error(capsys, extract_lora_from_models.main, ["--model_org", str(sdxl_file), "--model_tuned", sd1,
                                                         "--save_to", out])
    assert "SDXL" in err and "SD 1" in err


# ------------------------------------------------------------------------------------------------ convert

def test_convert_sdxl_kohya_to_diffusers_and_back_is_exact(sdxl, tmp_path):
    src = _network_file(sdxl, tmp_path / "locon.safetensors", "locon", alpha=2.0)
    folder = convert_lora.main([str(src), str(tmp_path / "as_diffusers")])
    peft = load_file(str(folder))
    components = {k.partition(".")[0] for k in peft}
    assert components == {"unet", "text_encoder", "text_encoder_2"}
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in peft
    assert "unet.down_blocks.0.resnets.0.conv1.lora_A.weight" in peft
    assert "text_encoder_2.text_model.encoder.layers.1.mlp.fc2.lora_B.weight" in peft
    back = convert_lora.main([str(folder), str(tmp_path / "back.safetensors")])
    original, back_sd = read_network_file(src)[0], read_network_file(back)[0]
    assert _modules(back_sd) == _modules(original)
    for name in _modules(original):
        torch.testing.assert_close(_delta(back_sd, name), _delta(original, name), atol=1e-7, rtol=1e-6)
        assert back_sd[f"{name}.lora_down.weight"].shape == original[f"{name}.lora_down.weight"].shape


def test_convert_sdxl_diffusers_file_loads_in_diffusers_as_ours(sdxl, tiny_files, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    src = _network_file(sdxl, tmp_path / "lora.safetensors", "lora")
    converted = convert_lora.main([str(src), str(tmp_path / "d.safetensors"), "--to", "diffusers"])
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_files["tiny-sdxl"]["diffusers"]), local_files_only=True)
    pipe.load_lora_weights(str(converted))
    theirs = copy.copy(sdxl)
    theirs.unet, theirs.text_encoders = pipe.unet, (pipe.text_encoder, pipe.text_encoder_2)
    _assert_outputs_equal(_outputs(theirs), _applied(sdxl, [(src, 1.0)]), _outputs(sdxl))


# ------------------------------------------------------------------------------------------------ inspect

def test_check_lora_weights_reports_an_sdxl_locon(sdxl, tmp_path, capsys):
    src = _network_file(sdxl, tmp_path / "locon.safetensors", "locon")
    check_lora_weights.main([str(src)])
    out = capsys.readouterr().out
    weights = load_file(str(src))
    modules = _modules(weights)
    counts = {p: sum(m.startswith(p) for m in modules) for p in PREFIXES}
    convs = sum(weights[f"{m}.lora_down.weight"].dim() == 4 and weights[f"{m}.lora_down.weight"].shape[2] == 3
                for m in modules)
    assert "LoCon network" in out
    assert (f"modules: {len(modules)} (UNet {counts['lora_unet_']}, text encoder 1 {counts['lora_te1_']}, "
            f"text encoder 2 {counts['lora_te2_']}); conv 3×3 modules: {convs}") in out
    assert "ss_base_model_version=sdxl_base_v1-0" in out


def test_check_lora_weights_tells_sdxl_from_names_without_metadata(sdxl, tmp_path, capsys):
    src = _network_file(sdxl, tmp_path / "loha.pt", "loha", metadata={})
    check_lora_weights.main([str(src)])
    out = capsys.readouterr().out
    assert "base model: not recorded; lora_te1_/lora_te2_ text encoders and SGM UNet names: SDXL" in out
    weights = torch.load(str(src))
    convs = sum(m.endswith(("_in_layers_2", "_out_layers_3", "_op", "_conv")) for m in _modules(weights))
    assert convs > 0 and f"conv 3×3 modules: {convs}" in out


def test_check_lora_weights_and_show_metadata_on_sdxl_checkpoint_embedding_and_lora(sdxl, sdxl_file, tmp_path,
                                                                                    capsys):
    check_lora_weights.main([str(sdxl_file)])
    assert "Stable Diffusion XL checkpoint" in capsys.readouterr().out
    from safetensors.torch import save_file

    save_file({"clip_l": torch.zeros(3, 32), "clip_g": torch.zeros(3, 64)}, str(tmp_path / "emb.safetensors"))
    check_lora_weights.main([str(tmp_path / "emb.safetensors")])
    assert "textual-inversion embedding (SDXL layout, one tensor per text encoder): clip_l 3×32, clip_g 3×64" in \
        capsys.readouterr().out
    src = _network_file(sdxl, tmp_path / "lora.safetensors", "lora")
    show_metadata.main(["--model", str(src)])
    out = capsys.readouterr().out
    assert "ss_base_model_version: sdxl_base_v1-0" in out
    assert "modelspec.architecture: stable-diffusion-xl-v1-base/lora" in out


def test_block_indices_follow_sd_scripts_for_both_name_styles():
    from tools.merge_lora import LBW_BLOCKS, lbw_block

    sd = {"lora_te_text_model_encoder_layers_0_mlp_fc1": "BASE",
          "lora_unet_down_blocks_0_attentions_0_proj_in": "IN01", "lora_unet_down_blocks_0_downsamplers_0_conv": "IN03",
          "lora_unet_down_blocks_2_resnets_1_conv1": "IN08", "lora_unet_mid_block_attentions_0_proj_out": "MID",
          "lora_unet_up_blocks_0_upsamplers_0_conv": "OUT02", "lora_unet_up_blocks_1_attentions_2_proj_in": "OUT05",
          "lora_unet_conv_in": None}
    sdxl = {"lora_te2_text_model_encoder_layers_0_mlp_fc1": "BASE", ATTN: "IN04", RESNET_CONV: "IN01",
            "lora_unet_input_blocks_3_0_op": "IN03", "lora_unet_middle_block_1_proj_in": "MID",
            "lora_unet_output_blocks_2_2_conv": "OUT02", "lora_unet_output_blocks_8_0_skip_connection": "OUT08"}
    for names, is_sdxl in ((sd, False), (sdxl, True)):
        for name, block in names.items():
            index = lbw_block(name, is_sdxl)
            assert (LBW_BLOCKS[index] if index >= 0 else None) == block, name


def test_every_sdxl_target_maps_to_its_diffusers_path_and_back(sdxl):
    from networks.injection import text_encoder_targets, unet_targets
    from networks.lora_layouts import is_sdxl_peft, kohya_name, peft_module_path

    family = sdxl.family
    te1, te2 = sdxl.text_encoders
    sides = (("unet", sdxl.unet, unet_targets(sdxl.unet, family.unet_targets, include_conv=True)),
             ("text_encoder", te1, text_encoder_targets(te1, family.text_encoder_targets[0])),
             ("text_encoder_2", te2, text_encoder_targets(te2, family.text_encoder_targets[1])))
    checked = 0
    for component, model, targets in sides:
        paths = {id(m): n if component == "unet" or n.startswith("text_model.") else f"text_model.{n}"
                 for n, m in model.named_modules()}
        for target in targets:
            assert peft_module_path(target.lora_name) == (component, paths[id(target.module)])
            assert kohya_name(component, paths[id(target.module)], sdxl=True) == target.lora_name
            checked += 1
    assert checked > 300
    # full-size SDXL depth (transformer_blocks 0-9) and TE2 layers (0-31) map by the same templates
    assert peft_module_path("lora_unet_output_blocks_0_1_transformer_blocks_9_attn2_to_k") == (
        "unet", "up_blocks.0.attentions.0.transformer_blocks.9.attn2.to_k")
    assert peft_module_path("lora_te2_text_model_encoder_layers_31_mlp_fc2") == (
        "text_encoder_2", "text_model.encoder.layers.31.mlp.fc2")
    # a UNet-only diffusers file is told SDXL by paths SD 1.x/2.x do not have
    assert is_sdxl_peft(["unet.up_blocks.0.attentions.1.proj_in.lora_A.weight"])
    assert not is_sdxl_peft(["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight",
                             "unet.up_blocks.1.attentions.0.proj_in.lora_A.weight"])


def test_sd1_block_weights_into_a_checkpoint_and_concatenated(tiny_parts, tiny_files, tmp_path):
    """--lbws with SD 1.x's 26 blocks (BASE, IN00-IN11, MID, OUT00-OUT11), which the same code serves."""
    from tests.tools.test_merge_lora import _network_file as sd1_network_file, _outputs as sd1_outputs

    sd1 = tiny_parts["tiny-sd1"]
    net = sd1_network_file(sd1, tmp_path / "locon.safetensors", "locon")
    values = [1.0] * 26
    values[0], values[2], values[19] = 0.0, -1.0, 0.5  # BASE (text encoder), IN01, OUT05

    def weight(name: str) -> float:
        if name.startswith("lora_te_"):
            return 0.0
        if name.startswith(("lora_unet_down_blocks_0_resnets_0_", "lora_unet_down_blocks_0_attentions_0_")):
            return -1.0
        out05 = ("lora_unet_up_blocks_1_resnets_2_", "lora_unet_up_blocks_1_attentions_2_",
                 "lora_unet_up_blocks_1_upsamplers_0_")  # sd-scripts counts a level's upsampler in its last block
        return 0.5 if name.startswith(out05) else 1.0

    model = copy.deepcopy(sd1)
    network = network_from_weights(RATIO, net, model.text_encoder, model.unet, for_inference=True)
    network.load_weights(net)
    network.apply_to(model.text_encoder, model.unet)
    assert {weight(m.lora_name) for m in network.text_encoder_loras + network.unet_loras} == {0.0, -1.0, 0.5, 1.0}
    for module in network.text_encoder_loras + network.unet_loras:
        module.multiplier = RATIO * weight(module.lora_name)
    expected = sd1_outputs(model)
    out = tmp_path / "merged.safetensors"
    merge_lora.main(["--sd_model", str(tiny_files["tiny-sd1"]["safetensors"]), "--models", str(net), "--ratios",
                     str(RATIO), "--lbws", json.dumps(values), "--save_to", str(out)])
    for got, want in zip(sd1_outputs(load_components(str(out))), expected):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    concat = tmp_path / "concat.safetensors"
    merge_lora.main(["--models", str(net), "--ratios", str(RATIO), "--lbws", json.dumps(values), "--concat",
                     "--save_to", str(concat)])
    model = copy.deepcopy(sd1)
    network = network_from_weights(1.0, concat, model.text_encoder, model.unet, for_inference=True)
    network.load_weights(concat)
    network.apply_to(model.text_encoder, model.unet)
    for got, want in zip(sd1_outputs(model), expected):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
