"""tools/merge_models.py and tools/merge_unet_blocks.py on tiny SD1 checkpoints, and the block -> ldm layer map."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from library.errors import UserError
from library.models.checkpoint_io import read_state_dict
from library.models.merging import BLOCKS, block_ratio, merge_by_blocks, parse_block_ratios
from tests.conftest import GOLDEN, ROOT
from tools import merge_models, merge_unet_blocks

pytestmark = pytest.mark.usefixtures("one_torch_thread")

UNET = "model.diffusion_model."
POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"
# (option, index) for every index an option accepts
ALL_INDICES = [(option, index) for option, (_, valid) in BLOCKS.items() for index in valid]


def _noisy(sd: dict, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.1 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone()
            for k, v in sd.items()}


@pytest.fixture(scope="module")
def models(tiny_files, tmp_path_factory):
    """Paths of three different tiny SD1 models (A is the fixture's file), as .safetensors and .ckpt."""
    root = tmp_path_factory.mktemp("merge-inputs")
    a, _ = read_state_dict(tiny_files["tiny-sd1"]["safetensors"])
    paths = {"a": tiny_files["tiny-sd1"]["safetensors"], "a.ckpt": tiny_files["tiny-sd1"]["ckpt"]}
    for name, seed in (("b", 1), ("c", 2)):
        sd = _noisy(a, seed)
        paths[name] = root / f"{name}.safetensors"
        save_file(sd, str(paths[name]))
        paths[f"{name}.ckpt"] = root / f"{name}.ckpt"
        torch.save({"state_dict": sd}, paths[f"{name}.ckpt"])
    return paths


@pytest.fixture(scope="module")
def loaded(models):
    return {name: read_state_dict(models[name])[0] for name in ("a", "b", "c")}


def run(tool, argv, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of a tool's main(argv)."""
    try:
        tool.main([str(arg) for arg in argv])
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def blocks_argv(a, b, dst, ratio: float) -> list:
    """merge_unet_blocks argv giving every index of every option (and base_alpha) the same ratio."""
    argv = [a, b, "--dump_path", dst, "--base_alpha", ratio]
    for option, (_, valid) in BLOCKS.items():
        argv += [f"--{option}", ", ".join(f"{i}:{ratio}" for i in valid)]
    return argv


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2 and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    for needle in needles:
        assert needle in err, err


def assert_equal_tensors(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)  # safetensors files list keys sorted, pickles in insertion order
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("ratio, expected, src, suffix", [
    (0, "a", "", ".safetensors"), (1, "b", "", ".ckpt"), (0, "a", ".ckpt", ".ckpt"), (1, "b", ".ckpt", ".safetensors")])
def test_blocks_at_0_and_1_reproduce_a_model_exactly(models, loaded, tmp_path, capsys, ratio, expected, src, suffix):
    dst = tmp_path / f"merged{suffix}"
    code, out, _ = run(merge_unet_blocks, blocks_argv(models[f"a{src}"], models[f"b{src}"], dst, ratio), capsys)
    assert code == 0 and out.count("\n") == 1 and f"wrote {dst}" in out
    if suffix == ".ckpt":  # a Lightning-style pickle, as sd-scripts writes
        assert list(torch.load(dst, weights_only=True)) == ["state_dict"]
    assert_equal_tensors(read_state_dict(dst)[0], loaded[expected])


def test_tiny_model_has_these_blocks(loaded):
    present = {}
    for option, (module, valid) in BLOCKS.items():
        present[option] = [i for i in valid if any(k.startswith(f"{UNET}{module}.{i}.") for k in loaded["a"])]
    assert present == {"input_blocks": list(range(9)), "middle_blocks": [0, 1, 2], "output_blocks": list(range(9)),
                       "out": [0, 2], "time_embed": [0, 2]}


@pytest.mark.parametrize("option, index", ALL_INDICES)
def test_each_block_index_takes_exactly_its_ldm_layer_from_b(loaded, option, index):
    a, b = loaded["a"], loaded["b"]
    ratios = {name: {} for name in BLOCKS} | {option: {index: 1.0}}
    merged = merge_by_blocks(a, b, **ratios, base_alpha=0.0).state_dict
    from_b = {k for k in merged if not torch.equal(merged[k], a[k])}
    assert all(torch.equal(merged[k], b[k]) for k in from_b)
    prefix = f"{UNET}{BLOCKS[option][0]}.{index}."
    assert from_b == {k for k in a if k.startswith(prefix)}
    tiny_has_it = not (option in ("input_blocks", "output_blocks") and index > 8)
    assert bool(from_b) == tiny_has_it


def test_block_map_on_the_sd15_layout(golden):
    """Per option and index: how many SD 1.5 tensors it moves, first and last; a reviewer reads it in the golden."""
    keys = sorted(json.loads((GOLDEN / "sd-scripts-sd15-single-file.json").read_text())["tensors"])
    a = {k: torch.zeros(1) for k in keys}
    b = {k: torch.ones(1) for k in keys}
    mapping = {}
    for option, index in ALL_INDICES:
        ratios = {name: {} for name in BLOCKS} | {option: {index: 1.0}}
        merged = merge_by_blocks(a, b, **ratios, base_alpha=0.0).state_dict
        moved = [k for k in keys if merged[k].item() == 1.0]
        mapping.setdefault(option, {})[str(index)] = {"tensors": len(moved), "first": moved[0], "last": moved[-1]}
    unnamed = [k for k in keys if block_ratio(k, {o: dict.fromkeys(v, 1.0) for o, (_, v) in BLOCKS.items()}) is None]
    # Every UNet tensor belongs to some named index; only the text encoder and VAE fall to --base_alpha.
    assert not [k for k in unnamed if k.startswith(UNET)]
    mapping["base_alpha"] = {"tensors": len(unnamed), "prefixes": sorted({k.split(".")[0] for k in unnamed})}
    golden("merge_unet_blocks_sd15", mapping)


def test_weighted_sum_half_is_the_average_and_save_precision(models, loaded, tmp_path, capsys):
    dst = tmp_path / "half.safetensors"
    code, out, _ = run(merge_models, [models["a"], models["b"], "--alpha", 0.5, "--out", dst], capsys)
    assert code == 0 and out.count("\n") == 1 and "weighted_sum" in out and f"wrote {dst}" in out
    merged = read_state_dict(dst)[0]
    for key, ta in loaded["a"].items():
        assert torch.allclose(merged[key], (ta + loaded["b"][key]) / 2, atol=1e-6, rtol=0), key
    code, _, _ = run(merge_models, [models["a"], models["b"], "--out", tmp_path / "h.ckpt", "--save_precision", "fp16"],
                     capsys)
    assert code == 0 and {t.dtype for t in read_state_dict(tmp_path / "h.ckpt")[0].values()} == {torch.float16}


def test_weighted_sum_at_1_is_b_exactly(models, loaded, tmp_path, capsys):
    dst = tmp_path / "b_again.safetensors"
    assert run(merge_models, [models["a.ckpt"], models["b.ckpt"], "--alpha", 1, "--out", dst], capsys)[0] == 0
    assert_equal_tensors(read_state_dict(dst)[0], loaded["b"])


def test_add_difference(models, loaded, tmp_path, capsys):
    dst = tmp_path / "diff.ckpt"
    argv = [models["a"], models["b"], models["c"], "--mode", "add_difference", "--alpha", 0.7, "--out", dst]
    code, out, _ = run(merge_models, argv, capsys)
    assert code == 0 and "add_difference" in out
    merged = read_state_dict(dst)[0]
    a, b, c = loaded["a"], loaded["b"], loaded["c"]
    for key in a:
        assert torch.allclose(merged[key], a[key] + 0.7 * (b[key] - c[key]), atol=1e-6, rtol=0), key


def test_add_difference_without_c_is_a_one_line_error(models, tmp_path, capsys):
    code, _, err = run(merge_models, [models["a"], models["b"], "--mode", "add_difference", "--out",
                                      tmp_path / "x.safetensors"], capsys)
    assert_one_line_error(code, err, "expected 3")


def test_non_float_tensors_come_from_a_and_missing_keys_are_reported(loaded, tmp_path, capsys):
    a = dict(loaded["a"]) | {POSITION_IDS: torch.arange(77).unsqueeze(0)}
    b = dict(loaded["b"]) | {POSITION_IDS: torch.arange(77).flip(0).unsqueeze(0)}
    dropped = f"{UNET}out.2.bias"
    del b[dropped]
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    dst = tmp_path / "m.safetensors"
    code, _, err = run(merge_unet_blocks, [tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--dump_path", dst,
                                           "--base_alpha", 0.3], capsys)
    merged = read_state_dict(dst)[0]
    assert code == 0 and "1 tensors of model A are missing" in err and dropped in err
    assert merged[POSITION_IDS].dtype == torch.int64 and torch.equal(merged[POSITION_IDS], a[POSITION_IDS])
    assert torch.equal(merged[dropped], a[dropped])
    key = f"{UNET}input_blocks.0.0.weight"
    assert torch.allclose(merged[key], 0.7 * a[key] + 0.3 * b[key], atol=1e-6, rtol=0)


def test_shape_mismatch_names_the_key(models, loaded, tmp_path, capsys):
    key = f"{UNET}input_blocks.0.0.weight"
    b = _save(dict(loaded["b"]) | {key: torch.zeros(1, 2, 3)}, tmp_path / "b.safetensors")
    dst = tmp_path / "m.safetensors"
    code, _, err = run(merge_models, [models["a"], b, "--out", dst], capsys)
    assert_one_line_error(code, err, key, "[1, 2, 3] in model B", "cannot be merged")
    assert not dst.exists()


def _save(sd: dict, path):
    save_file(sd, str(path))
    return path


@pytest.mark.parametrize("option, text, needle", [
    ("--input_blocks", "0:0.5, x", "'x'"), ("--input_blocks", "0.5", "INDEX:RATIO"),
    ("--middle_blocks", "-1:0.5", "negative"), ("--output_blocks", "0:0.5, 0:0.3", "given twice"),
    ("--input_blocks", "12:0.5", "valid indices are 0-11"), ("--out", "1:0.5", "valid indices are 0 and 2"),
    ("--time_embed", "0:nan", "not a finite number"), ("--middle_blocks", "3:1", "valid indices are 0-2")])
def test_bad_ratio_strings_are_one_line_errors(models, tmp_path, capsys, option, text, needle):
    argv = [models["a"], models["b"], "--dump_path", tmp_path / "m.safetensors", f"{option}={text}"]
    code, _, err = run(merge_unet_blocks, argv, capsys)
    assert_one_line_error(code, err, option, needle)
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("flags, needle", [(["--save_precision", "fp8"], "invalid choice"), ([], "--dump_path")])
def test_usage_mistakes_are_one_line_errors(models, capsys, flags, needle):
    argv = [models["a"], models["b"], *flags] + (["--dump_path", "m.safetensors"] if flags else [])
    code, _, err = run(merge_unet_blocks, argv, capsys)
    assert_one_line_error(code, err, needle)


def test_runs_as_a_script(models, tmp_path):
    """`python tools/merge_unet_blocks.py` finds the project (and tools.merge_models) without installing it."""
    proc = subprocess.run([sys.executable, "tools/merge_unet_blocks.py", str(models["a"]), str(models["b"]),
                           "--out", "0:1, 1:1", "--dump_path", str(tmp_path / "m.safetensors")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip() == ("error: --out: block 1 does not exist in SD 1.x/2.x; "
                                                            "valid indices are 0 and 2")


def test_parse_block_ratios():
    assert parse_block_ratios("0:0.5, 1:0.5, 11:0.3", option="--input_blocks") == {0: 0.5, 1: 0.5, 11: 0.3}
    assert parse_block_ratios("", option="--out") == {}
    with pytest.raises(UserError, match="--output_blocks"):
        merge_by_blocks({}, {}, input_blocks={}, middle_blocks={}, output_blocks={12: 1.0}, out={}, time_embed={},
                        base_alpha=0.5)


def test_refuses_to_overwrite_an_input(models, tmp_path, capsys):
    a = _save(read_state_dict(models["a"])[0], tmp_path / "a.safetensors")
    before = a.read_bytes()
    code, _, err = run(merge_models, [a, models["b"], "--alpha", 0.5, "--out", a], capsys)
    assert_one_line_error(code, err, "is also an input model")
    assert a.read_bytes() == before


def test_refuses_to_overwrite_a_lora(models, tmp_path, capsys):
    lora = _save({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(4, 8)}, tmp_path / "my_lora.safetensors")
    before = lora.read_bytes()
    code, _, err = run(merge_unet_blocks, [models["a"], models["b"], "--dump_path", lora], capsys)
    assert_one_line_error(code, err, "refusing to overwrite")
    assert lora.read_bytes() == before
