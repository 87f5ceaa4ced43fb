"""The model tools on SDXL (tiny-sdxl): merge_unet_blocks with sd-scripts' 23-block SDXL map, merge_models (its own
and sd-scripts' command lines, files and diffusers folders), convert_model round trips read by diffusers, gen_img /
xyz_grid with an SDXL LoRA and the size/crop conditioning, and tools/dry_run.py on SDXL runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from library.generation import Generator
from library.models.checkpoint_io import read_state_dict
from library.models.loading import load_components
from library.models.merging import SDXL_LAYOUT, block_ratio, merge_by_blocks, parse_block_list
from library.models.saving import to_ldm_state_dict
from tests.helpers import make_image_folder
from tests.tools.test_merge_models import assert_one_line_error, run
from tools import convert_model, dry_run, gen_img, merge_models, merge_unet_blocks, xyz_grid

pytestmark = pytest.mark.usefixtures("one_torch_thread")

UNET = "model.diffusion_model."
# sd-scripts' --block_lr map for SDXL (sdxl_train.py): index -> the UNet key prefixes it covers.
SDXL_23 = {0: ("time_embed.", "label_emb."), **{1 + i: (f"input_blocks.{i}.",) for i in range(9)},
           **{10 + i: (f"middle_block.{i}.",) for i in range(3)},
           **{13 + i: (f"output_blocks.{i}.",) for i in range(9)}, 22: ("out.",)}


def _bits(t: torch.Tensor) -> bytes:
    """The tensor's bytes: equal bytes are bit-identical (-0.0 vs 0.0 and NaNs included)."""
    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


def assert_bit_identical(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
        assert _bits(got[key]) == _bits(want[key]), key


@pytest.fixture(scope="module")
def sdxl(tiny_files, tmp_path_factory):
    """Two different tiny SDXL single files (A is the fixture's) and their tensors; B = A + noise."""
    root = tmp_path_factory.mktemp("sdxl-merge")
    a_path = tiny_files["tiny-sdxl"]["safetensors"]
    a, _ = read_state_dict(a_path)
    gen = torch.Generator().manual_seed(1)
    b = {k: v + 0.1 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone() for k, v in a.items()}
    b_path = root / "b.safetensors"
    save_file(b, str(b_path))
    return {"a": a_path, "b": b_path, "folder": tiny_files["tiny-sdxl"]["diffusers"], "A": a, "B": b}


# ---------------------------------------------------------------------------------------------- merge_unet_blocks
@pytest.mark.parametrize("ratio, expected", [(0, "A"), (1, "B")])
def test_sdxl_blocks_at_0_and_1_give_each_model_bit_for_bit(sdxl, tmp_path, capsys, ratio, expected):
    # sd-scripts' 23-entry list, and every per-block option at every SDXL index: both forms.
    listed = tmp_path / "listed.safetensors"
    code, out, err = run(merge_unet_blocks, [sdxl["a"], sdxl["b"], "--block_ratios", ",".join([str(ratio)] * 23),
                                             "--base_alpha", ratio, "--dump_path", listed], capsys)
    assert code == 0 and "by SDXL UNet block" in out, err
    assert_bit_identical(read_state_dict(listed)[0], sdxl[expected])
    argv = [sdxl["a"], sdxl["b"], "--base_alpha", ratio, "--dump_path", tmp_path / "named.ckpt"]
    for option, (_, indices) in SDXL_LAYOUT.blocks.items():
        argv += [f"--{option}", ", ".join(f"{i}:{ratio}" for i in indices)]
    code, _, err = run(merge_unet_blocks, argv, capsys)
    assert code == 0, err
    assert_bit_identical(read_state_dict(tmp_path / "named.ckpt")[0], sdxl[expected])


@pytest.mark.parametrize("index", range(23))
def test_each_of_the_23_sdxl_blocks_takes_exactly_its_layers(sdxl, index):
    a, b = sdxl["A"], sdxl["B"]
    ratios = parse_block_list(",".join("1" if i == index else "0" for i in range(23)), option="--block_ratios",
                              layout=SDXL_LAYOUT)
    merged = merge_by_blocks(a, b, **ratios, base_alpha=0.0, layout=SDXL_LAYOUT).state_dict
    from_b = {k for k in merged if not torch.equal(merged[k], a[k])}
    assert all(torch.equal(merged[k], b[k]) for k in from_b)
    assert from_b == {k for k in a if k.startswith(tuple(UNET + p for p in SDXL_23[index]))} != set()


def test_every_sdxl_unet_tensor_is_in_exactly_one_block_and_nothing_else_is(sdxl):
    keys = list(sdxl["A"])
    everything = parse_block_list(",".join(["1"] * 23), option="--block_ratios", layout=SDXL_LAYOUT)
    for key in keys:
        covering = [i for i, prefixes in SDXL_23.items() if key.startswith(tuple(UNET + p for p in prefixes))]
        assert len(covering) == (1 if key.startswith(UNET) else 0), key
        assert (block_ratio(key, everything) is not None) == key.startswith(UNET), key


def test_a_mixed_sdxl_setting_mixes_exactly_the_named_blocks(sdxl, tmp_path, capsys):
    dst = tmp_path / "m.safetensors"
    code, _, err = run(merge_unet_blocks, [sdxl["a"], sdxl["b"], "--input_blocks", "4:1, 7:0.5", "--label_emb",
                                           "2:0.25", "--base_alpha", "0", "--dump_path", dst], capsys)
    assert code == 0, err
    merged, a, b = read_state_dict(dst)[0], sdxl["A"], sdxl["B"]
    for key in a:
        if key.startswith(UNET + "input_blocks.4."):
            assert _bits(merged[key]) == _bits(b[key]), key
        elif key.startswith(UNET + "input_blocks.7."):
            assert torch.allclose(merged[key], (a[key] + b[key]) / 2, atol=1e-6), key
            assert not torch.equal(merged[key], a[key])
        elif key.startswith(UNET + "label_emb.0.2."):
            assert torch.allclose(merged[key], 0.75 * a[key] + 0.25 * b[key], atol=1e-6), key
        else:
            assert _bits(merged[key]) == _bits(a[key]), key


@pytest.mark.parametrize("flags, needles", [
    (["--input_blocks", "9:1"], ("--input_blocks", "does not exist in SDXL; valid indices are 0-8")),
    (["--output_blocks", "11:1"], ("--output_blocks", "valid indices are 0-8")),
    (["--label_emb", "1:1"], ("--label_emb", "valid indices are 0 and 2")),
    (["--block_ratios", ",".join(["0.5"] * 25)], ("SDXL has 23 blocks, got 25 values",)),
    (["--block_ratios", ",".join(["0.5"] * 23), "--out", "0:1"], ("--block_ratios", "drop --out")),
])
def test_sdxl_block_mistakes_are_one_line_errors(sdxl, tmp_path, capsys, flags, needles):
    dst = tmp_path / "m.safetensors"
    code, _, err = run(merge_unet_blocks, [sdxl["a"], sdxl["b"], *flags, "--dump_path", dst], capsys)
    assert_one_line_error(code, err, *needles)
    assert not dst.exists()


def test_sd1_keeps_its_25_block_layout_and_has_no_label_emb(sdxl, tiny_files, tmp_path, capsys):
    sd1 = tiny_files["tiny-sd1"]["safetensors"]
    for tool, dst_flag in ((merge_unet_blocks, "--dump_path"), (merge_models, "--out")):
        code, _, err = run(tool, [sdxl["a"], sd1, dst_flag, tmp_path / "mixed.safetensors"], capsys)
        assert_one_line_error(code, err, "is an SD 1.x model but", "is an SDXL model; only models of one family")
    code, _, err = run(merge_unet_blocks, [sd1, sd1, "--label_emb", "0:1", "--dump_path", tmp_path / "m.ckpt"],
                       capsys)
    assert_one_line_error(code, err, "SD 1.x/2.x models have no label_emb")
    code, _, err = run(merge_unet_blocks, [sd1, sd1, "--block_ratios", ",".join(["1"] * 23),
                                           "--dump_path", tmp_path / "m.ckpt"], capsys)
    assert_one_line_error(code, err, "SD 1.x/2.x has 25 blocks, got 23")


# ---------------------------------------------------------------------------------------------- merge_models
def test_sd_scripts_merge_models_command_line_on_sdxl(sdxl, tmp_path, capsys):
    # sd-scripts: --models/--ratios/--output (".safetensors" appended), sum of ratio x model, saved as float.
    code, out, err = run(merge_models, ["--models", sdxl["a"], sdxl["b"], "--ratios", "1", "0",
                                        "--output", tmp_path / "exact"], capsys)
    assert code == 0 and "wrote" in out, err
    assert_bit_identical(read_state_dict(tmp_path / "exact.safetensors")[0], sdxl["A"])
    code, _, err = run(merge_models, ["--models", sdxl["a"], sdxl["b"], "--ratios", "0.25", "0.75", "--unet_only",
                                      "--saving_precision", "fp16", "--output", tmp_path / "unet.safetensors"], capsys)
    assert code == 0, err
    merged, a, b = read_state_dict(tmp_path / "unet.safetensors")[0], sdxl["A"], sdxl["B"]
    for key in a:
        assert merged[key].dtype == torch.float16, key
        want = 0.25 * a[key] + 0.75 * b[key] if key.startswith(UNET) else a[key]
        assert torch.equal(merged[key], want.half()), key  # TEs (conditioner.*) and VAE kept from the first model


def test_merging_sdxl_diffusers_folders_into_a_folder_and_a_file(sdxl, tiny_parts, tmp_path, capsys):
    parts = tiny_parts["tiny-sdxl"]
    code, _, err = run(merge_models, [sdxl["folder"], sdxl["b"], "--alpha", "0", "--out", tmp_path / "out"], capsys)
    assert code == 0, err
    loaded = load_components(str(tmp_path / "out"))
    assert loaded.family.name == "sdxl" and (tmp_path / "out" / "model_index.json").is_file()
    for ours, theirs in zip(parts.modules(), loaded.modules()):
        assert_bit_identical(theirs.state_dict(), ours.state_dict())
    code, _, err = run(merge_unet_blocks, [sdxl["folder"], sdxl["folder"], "--block_ratios", ",".join(["1"] * 23),
                                           "--dump_path", tmp_path / "same.safetensors"], capsys)
    assert code == 0, err
    assert_bit_identical(read_state_dict(tmp_path / "same.safetensors")[0], to_ldm_state_dict(parts))


# ---------------------------------------------------------------------------------------------- convert_model
def test_convert_single_file_to_diffusers_and_back_is_exact_and_diffusers_reads_it(sdxl, tmp_path, capsys):
    from diffusers import StableDiffusionXLPipeline

    folder, back = tmp_path / "folder", tmp_path / "back.safetensors"
    for src, dst in ((sdxl["a"], folder), (folder, back), (back, tmp_path / "again.ckpt")):
        code, _, err = run(convert_model, [src, dst], capsys)
        assert code == 0, err
    assert_bit_identical(read_state_dict(back)[0], sdxl["A"])
    assert_bit_identical(read_state_dict(tmp_path / "again.ckpt")[0], sdxl["A"])
    ours = load_components(str(back))
    pipe = StableDiffusionXLPipeline.from_single_file(str(back), config=str(folder), local_files_only=True)
    gen = torch.Generator().manual_seed(0)
    latents, t = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([10, 700])
    context = torch.randn(2, 7, ours.unet.config.cross_attention_dim, generator=gen)
    pooled = torch.randn(2, ours.text_encoders[1].config.projection_dim, generator=gen)
    added = {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64], [128, 96, 8, 0, 64, 64]])}
    with torch.no_grad():
        mine = ours.unet(latents, t, context, added_cond_kwargs=added).sample
        theirs = pipe.unet(latents, t, context, added_cond_kwargs=added).sample
    # Same weights bit for bit; the outputs differ only by float summation order (different tensor strides).
    for module, theirs_module in zip(ours.modules(), (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)):
        assert_bit_identical(theirs_module.state_dict(), module.state_dict())
    assert torch.allclose(mine, theirs, rtol=0, atol=1e-5) and mine.abs().max() > 0.1


def test_convert_diffusers_folder_to_fp16_file_and_back(sdxl, tmp_path, capsys):
    half = tmp_path / "half.safetensors"
    code, _, err = run(convert_model, [sdxl["folder"], half, "--save_precision", "fp16"], capsys)
    assert code == 0, err
    stored = read_state_dict(half)[0]
    assert {v.dtype for v in stored.values() if v.is_floating_point()} == {torch.float16}
    assert all(torch.equal(stored[k], v.half()) for k, v in sdxl["A"].items() if v.is_floating_point())
    code, _, err = run(convert_model, [half, tmp_path / "half_folder"], capsys)
    assert code == 0, err
    from safetensors import safe_open

    for weights in (tmp_path / "half_folder").glob("*/*.safetensors"):  # the folder keeps the file's precision
        with safe_open(str(weights), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, weights
    again = load_components(str(tmp_path / "half_folder"))
    assert again.family.name == "sdxl"
    assert_bit_identical(to_ldm_state_dict(again, torch.float16), stored)
    # Back to a file (and merged at ratio 0) without --save_precision: still the stored fp16, bit for bit.
    code, _, err = run(convert_model, [tmp_path / "half_folder", tmp_path / "half_again.safetensors"], capsys)
    assert code == 0, err
    assert_bit_identical(read_state_dict(tmp_path / "half_again.safetensors")[0], stored)
    code, _, err = run(merge_models, [tmp_path / "half_folder", half, "--alpha", "0", "--out",
                                      tmp_path / "half_merged.safetensors"], capsys)
    assert code == 0, err
    assert_bit_identical(read_state_dict(tmp_path / "half_merged.safetensors")[0], stored)


# ---------------------------------------------------------------------------------------------- gen_img / xyz_grid
GEN = ["--ckpt", "tiny-sdxl", "--prompt", "a cat", "--W", "64", "--H", "64", "--steps", "2", "--scale", "5",
       "--seed", "3", "--device", "cpu", "--sampler", "euler"]


@pytest.fixture(scope="module")
def sdxl_lora(tiny_parts, tmp_path_factory):
    """An SDXL LoRA (UNet and both text encoders) with random up weights: it changes images."""
    from networks.lora import create_network

    parts = load_components("tiny-sdxl")
    network = create_network(1.0, 4, 4, None, parts.network_text_encoder, parts.unet)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in network.named_parameters():
            if "lora_up" in name:
                param.copy_(torch.randn(param.shape, generator=gen))
    path = tmp_path_factory.mktemp("sdxl-lora") / "style.safetensors"
    network.save_weights(str(path))
    return path


def _pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).copy()


def test_gen_img_applies_an_sdxl_lora_and_weight_0_is_no_lora(sdxl_lora, tmp_path, capsys):
    images = {}
    for name, extra in (("plain", []), ("lora", ["--network_module", "networks.lora", "--network_weights",
                                                 sdxl_lora, "--network_mul", "1"]),
                        ("zero", ["--network_weights", sdxl_lora, "--network_mul", "0"])):
        code, out, err = run(gen_img, [*GEN, "--outdir", tmp_path / name, *extra], capsys)
        assert code == 0, err
        (path,) = (tmp_path / name).glob("*.png")
        images[name] = _pixels(path)
        assert images[name].shape == (64, 64, 3)
    assert not np.array_equal(images["plain"], images["lora"])
    assert np.array_equal(images["plain"], images["zero"])
    # xyz_grid over the LoRA weight: each cell equals the single run with that weight.
    code, _, err = run(xyz_grid, [*GEN, "--network_weights", sdxl_lora, "--x", "lora_weight:0,1",
                                  "--outfile", tmp_path / "grid.png"], capsys)
    assert code == 0, err
    with Image.open(tmp_path / "grid.png") as grid:
        grid = grid.convert("RGB")
        width = grid.width
        cells = [np.asarray(grid.crop((width - 128 + 64 * i, grid.height - 64, width - 64 + 64 * i, grid.height)))
                 for i in range(2)]
    assert np.array_equal(cells[0], images["plain"]) and np.array_equal(cells[1], images["lora"])


def test_gen_img_passes_sd_scripts_sdxl_size_and_crop_conditioning(tmp_path):
    args = gen_img.parse_args([*GEN, "--outdir", str(tmp_path), "--sdxl", "--original_width", "2048",
                               "--original_height", "1024", "--original_width_negative", "512",
                               "--original_height_negative", "256", "--crop_top", "16", "--crop_left", "8"],
                              gen_img.__doc__, gen_img.TOOL_OPTIONS)
    generator = Generator(gen_img.setup_from_args(args))
    seen = []
    hook = generator.parts.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["added_cond_kwargs"]["time_ids"].clone()), with_kwargs=True)
    try:
        generator.generate(generator.request("a cat"))
        flags = seen[0].tolist()
        seen.clear()
        # The prompt line's --ow/--oh/--nw/--nh/--ct/--cl win over the flags (sd-scripts' gen_img.py).
        generator.generate(generator.request("a cat --ow 640 --oh 320 --nw 48 --nh 32 --ct 2 --cl 1 --w 32 --h 48"))
        line = seen[0].tolist()
        seen.clear()
        generator.generate(generator.request("a cat --ow 96"), init_image=Image.new("RGB", (80, 80)), strength=1.0)
        img2img = seen[0].tolist()
    finally:
        hook.remove()
    # Classifier-free guidance batches [negative, positive]; ids are [orig h, orig w, crop top, left, target h, w].
    assert flags == [[256, 512, 16, 8, 64, 64], [1024, 2048, 16, 8, 64, 64]]
    assert line == [[32, 48, 2, 1, 48, 32], [320, 640, 2, 1, 48, 32]]
    assert img2img == [[256, 512, 16, 8, 64, 64], [1024, 96, 16, 8, 64, 64]]  # image-to-image gets them too


def test_gen_img_sdxl_defaults_and_refusals(tmp_path, capsys):
    args = gen_img.parse_args(["--ckpt", "tiny-sdxl", "--prompt", "a cat"], gen_img.__doc__, gen_img.TOOL_OPTIONS)
    generator = Generator(gen_img.setup_from_args(args))
    request = generator.request("a cat")
    # sd-scripts' gen_img.py: 1024 x 1024 for SDXL without --W/--H; unset original size = the image size, crop 0.
    assert (request.width, request.height) == (1024, 1024)
    assert request.size_conditioning()["original_size"] == (1024, 1024)
    assert request.size_conditioning()["crops_coords_top_left"] == (0, 0)
    for argv, needle in ((["--ckpt", "tiny-sd1", "--sdxl", "--steps", "2", "--W", "64", "--H", "64"],
                          "is an SD 1.x model, not an SDXL one"),
                         (["--ckpt", "tiny-sdxl", "--sdxl", "--v2"], "--v2 cannot be used with SDXL"),
                         (["--ckpt", "tiny-sdxl", "--crop_top", "-1"], "--crop_top -1: give 0 or more")):
        code, _, err = run(gen_img, [*argv, "--prompt", "a cat", "--outdir", tmp_path / "o"], capsys)
        assert_one_line_error(code, err, needle)
    code, _, err = run(gen_img, [*GEN, "--prompt", "a cat --ow wide", "--outdir", tmp_path / "o"], capsys)
    assert_one_line_error(code, err, "'--ow wide' needs a whole number")


# ---------------------------------------------------------------------------------------------- dry_run
def _dry_flags(tmp_path, model, *extra) -> list[str]:
    data = make_image_folder(tmp_path / "train", count=2).parent
    return ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--caption_extension",
            ".txt", "--resolution", "96", "--enable_bucket", "--min_bucket_reso", "96", "--max_bucket_reso", "192",
            *extra]


def test_dry_run_tool_checks_an_sdxl_model_as_sdxl_train_network_would(sdxl, tmp_path, capsys):
    code, out, err = run(dry_run, _dry_flags(tmp_path, sdxl["a"], "--bucket_reso_steps", "48"), capsys)
    assert code == 0, err
    assert "checking the run as sdxl_train_network.py" in out
    assert "bucket_reso_steps 48 must be a multiple of 32 for SDXL" in out and "steps:" in out
    code, out, err = run(dry_run, _dry_flags(tmp_path, sdxl["a"], "--bucket_reso_steps", "32"), capsys)
    assert code == 0 and "must be a multiple" not in out and "steps:" in out, err


def test_dry_run_tool_takes_sdxl_train_network_and_its_config(sdxl, tiny_files, tmp_path, capsys):
    data = make_image_folder(tmp_path / "train", count=2).parent
    config = tmp_path / "sdxl.toml"
    config.write_text(f'pretrained_model_name_or_path = "{sdxl["folder"].as_posix()}"\n'
                      f'train_data_dir = "{data.as_posix()}"\ncaption_extension = ".txt"\nresolution = 64\n'
                      'enable_bucket = true\nbucket_reso_steps = 48\nmin_bucket_reso = 48\nv2 = true\n')
    code, out, err = run(dry_run, ["sdxl_train_network.py", "--config_file", config], capsys)
    assert code == 0, err
    assert "must be a multiple of 32 for SDXL" in out and "--v2 cannot be used with SDXL" in out
    code, _, err = run(dry_run, ["sdxl_train_network.py", *_dry_flags(tmp_path, tiny_files["tiny-sd1"]["safetensors"])],
                       capsys)
    assert_one_line_error(code, err, "trains SDXL models; use train_network.py")
    code, _, err = run(dry_run, ["train_network.py", *_dry_flags(tmp_path, sdxl["a"])], capsys)
    assert_one_line_error(code, err, "use sdxl_train_network.py")
    code, out, err = run(dry_run, ["sdxl_train.py", *_dry_flags(tmp_path, sdxl["a"])], capsys)
    assert code == 0, err  # sdxl_train.py's plan, with its own checks
    code, _, err = run(dry_run, ["train_db.py", *_dry_flags(tmp_path, sdxl["a"])], capsys)
    assert_one_line_error(code, err, "use sdxl_train.py")
    code, _, err = run(dry_run, ["sdxl_train_control_net.py", *_dry_flags(tmp_path, sdxl["a"])], capsys)
    assert_one_line_error(code, err, "sdxl_train_control_net.py: not available in this project yet")


def test_gen_img_takes_sdxl_embeddings_and_refuses_sd_ones(tmp_path, capsys):
    from library.formats.embedding_files import save_sdxl
    from library.generation import GenerationSetup

    images = []
    for seed in (0, 1):
        gen = torch.Generator().manual_seed(seed)
        path = tmp_path / str(seed) / "mychar.safetensors"
        path.parent.mkdir()
        save_sdxl(path, {"clip_l": torch.randn(2, 32, generator=gen), "clip_g": torch.randn(2, 64, generator=gen)})
        generator = Generator(GenerationSetup("tiny-sdxl", embeddings=[str(path)], width=64, height=64, steps=2,
                                              seed=3, device="cpu", sampler="euler"))
        assert all("mychar1" in tokenizer.get_vocab() for tokenizer in generator.parts.tokenizers)
        request = generator.resolve("a photo of mychar")
        images.append(np.asarray(generator.generate(request)))
        assert "TI hashes: \"mychar: " in generator.parameters(request)
    assert not np.array_equal(*images)  # the vectors reach the image
    save_file({"emb_params": torch.zeros(1, 32)}, str(tmp_path / "sd.safetensors"))
    code, _, err = run(gen_img, [*GEN, "--outdir", tmp_path / "o", "--textual_inversion_embeddings",
                                 tmp_path / "sd.safetensors"], capsys)
    assert_one_line_error(code, err, "SDXL embeddings have one vector set per text encoder")
