"""tools/gen_img.py and tools/xyz_grid.py on the tiny model: grid cells equal single runs pixel for pixel, A1111's
parameters chunk, determinism, embeddings / hypernetwork / img2img applied, and one-line errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from library.formats.embedding_files import save_kohya
from library.generation import Generator, GenerationSetup, a1111_parameters, parse_a1111_parameters
from networks import lora
from networks.hypernetwork import Hypernetwork, save_hypernetwork
from tools import gen_img, xyz_grid

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SIZE, STEPS = 32, 2
BASE = ["--W", str(SIZE), "--H", str(SIZE), "--steps", str(STEPS), "--sampler", "euler"]


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def _read(path) -> tuple[np.ndarray, dict]:
    with Image.open(path) as image:
        return _pixels(image), dict(image.text)


@pytest.fixture(scope="module")
def addons(tiny_parts, tiny_files, tmp_path_factory):
    """A LoRA with non-zero random weights, a 2-vector embedding `mytok` and a hypernetwork for the tiny model."""
    root = tmp_path_factory.mktemp("addons")
    parts = copy.deepcopy(tiny_parts["tiny-sd1"])
    network = lora.create_network(1.0, 4, 4, None, parts.text_encoder, parts.unet)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in network.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    network.save_weights(str(root / "style.safetensors"), torch.float32, None)
    save_kohya(root / "mytok.safetensors", torch.randn(2, 32, generator=generator))
    hyper = Hypernetwork((32,))
    with torch.no_grad():
        for param in hyper.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    save_hypernetwork(root / "hyper.pt", hyper, step=1, name="hyper")
    return {"lora": root / "style.safetensors", "embedding": root / "mytok.safetensors", "hyper": root / "hyper.pt",
            "ckpt": str(tiny_files["tiny-sd1"]["safetensors"])}


@pytest.fixture(scope="module")
def plain(addons):
    return Generator(GenerationSetup(addons["ckpt"], sampler="euler", steps=STEPS, width=SIZE, height=SIZE))


def _gen(addons, outdir, *extra) -> list:
    return gen_img.main(["--ckpt", addons["ckpt"], "--outdir", str(outdir), "--prompt", "a cat", *BASE, *extra])


def test_grid_cells_equal_single_runs_and_weight_zero_equals_no_lora(addons, tmp_path, capsys):
    result = xyz_grid.main(["--ckpt", addons["ckpt"], "--outdir", str(tmp_path / "grid"), "--prompt", "a cat", *BASE,
                            "--network_weights", str(addons["lora"]), "--x", "lora_weight:0,1", "--y", "seed:1,2"])
    assert f"wrote {result.path} ({result.layout.width}x{result.layout.height}, 4 images)" in capsys.readouterr().out
    layout = result.layout
    assert result.images == 4 and (layout.columns, layout.rows, layout.blocks) == (2, 2, 1)
    assert layout.left > 0 and layout.top > 0 and layout.band == 0
    grid, _ = _read(result.path)
    assert grid.shape[:2] == (layout.top + 2 * SIZE, layout.left + 2 * SIZE)  # (height, width)

    with_lora = _gen(addons, tmp_path / "lora", "--seed", "1", "--images_per_prompt", "2",
                     "--network_weights", str(addons["lora"]), "--network_mul", "1")
    without = _gen(addons, tmp_path / "plain", "--seed", "1", "--images_per_prompt", "2")
    assert [p.name for p in with_lora] == ["0000_1.png", "0001_2.png"]
    for row in range(2):
        for column, runs in enumerate((without, with_lora)):  # x = weight 0 then 1
            x, y = layout.cell_origin(column, row, 0)
            cell = grid[y:y + SIZE, x:x + SIZE]
            assert np.array_equal(cell, _read(runs[row])[0]), f"cell ({column}, {row})"
    assert not np.array_equal(_read(with_lora[0])[0], _read(without[0])[0])  # the LoRA does change the image


def test_parameters_chunk_parses_back(addons, tmp_path):
    [path] = _gen(addons, tmp_path, "--seed", "7", "--negative_prompt", "blurry, dark",
                  "--network_weights", str(addons["lora"]), "--network_mul", "0.5")
    params = parse_a1111_parameters(_read(path)[1]["parameters"])
    assert params["Prompt"] == "a cat <lora:style:0.5>"
    assert params["Negative prompt"] == "blurry, dark"
    assert (params["Steps"], params["Seed"], params["Size"], params["Sampler"]) == ("2", "7", "32x32", "Euler")
    assert params["Model"] == "tiny-sd1" and len(params["Model hash"]) == 10
    name, digest = params["Lora hashes"].split(": ")
    assert name == "style" and len(digest) == 12


def test_a1111_text_is_formatted_as_automatic1111_writes_it():
    text = a1111_parameters("a cat", "ugly", 20, "euler_a", 7.0, 123, 512, 768, "my:model,v1",
                            [("a", 1.0, "0123456789ab"), ("b", 0.5, "ba9876543210")], model_hash="abcdef0123",
                            clip_skip=2)
    assert text == ('a cat <lora:a:1> <lora:b:0.5>\nNegative prompt: ugly\nSteps: 20, Sampler: Euler a, CFG scale: 7, '
                    'Seed: 123, Size: 512x768, Model hash: abcdef0123, Model: mymodelv1, Clip skip: 2, '
                    'Lora hashes: "a: 0123456789ab, b: ba9876543210"')
    assert parse_a1111_parameters(text)["Lora hashes"] == "a: 0123456789ab, b: ba9876543210"
    assert a1111_parameters("p", None, 1, "ddim", 7.5, 1, 8, 8, None) == \
        "p\nSteps: 1, Sampler: DDIM, CFG scale: 7.5, Seed: 1, Size: 8x8"


def test_same_seed_gives_identical_pixels(plain):
    first, again = plain.generate("a cat", seed=5), plain.generate("a cat --d 5")
    assert first.tobytes() == again.tobytes()
    assert first.tobytes() != plain.generate("a cat", seed=6).tobytes()
    assert first.size == (SIZE, SIZE)


def test_prompt_line_options_win_over_setup_defaults(plain):
    request = plain.resolve("a dog --n ugly --w 48 --h 40 --s 3 --l 4 --ss euler_a --d 9")
    assert (request.width, request.height, request.steps, request.scale, request.seed) == (48, 40, 3, 4.0, 9)
    assert (request.negative_prompt, request.sample_sampler) == ("ugly", "euler_a")
    request = plain.resolve("a dog")
    assert (request.width, request.steps, request.sample_sampler) == (SIZE, STEPS, "euler")
    assert request.seed is not None


def test_embedding_tokens_are_installed_and_change_the_image(addons, plain):
    generator = Generator(GenerationSetup(addons["ckpt"], embeddings=[str(addons["embedding"])], sampler="euler",
                                         steps=STEPS, width=SIZE, height=SIZE))
    assert generator.embeddings[0].tokens == ("mytok", "mytok1")
    assert generator.parts.tokenizer.tokenize("a mytok cat") == ["a</w>", "mytok", "cat</w>"]
    image = generator.generate("a mytok cat", seed=3)
    assert image.tobytes() != plain.generate("a mytok cat", seed=3).tobytes()
    # Prompts without the token are untouched: the old vocabulary keeps its vectors.
    assert generator.generate("a cat", seed=3).tobytes() == plain.generate("a cat", seed=3).tobytes()
    params = parse_a1111_parameters(generator.parameters(generator.resolve("a mytok cat", seed=3)))
    assert params["TI hashes"].startswith("mytok: ")


def test_hypernetwork_and_img2img_options_apply(addons, tmp_path):
    [plain_path] = _gen(addons, tmp_path / "plain", "--seed", "2")
    [hyper_path] = _gen(addons, tmp_path / "hyper", "--seed", "2", "--hypernetwork", str(addons["hyper"]),
                        "--hypernetwork_mul", "1.0")
    assert not np.array_equal(_read(hyper_path)[0], _read(plain_path)[0])
    assert parse_a1111_parameters(_read(hyper_path)[1]["parameters"])["Prompt"] == "a cat <hypernet:hyper:1>"
    Image.new("RGB", (40, 24), (200, 30, 30)).save(tmp_path / "init.png")
    [i2i_path] = _gen(addons, tmp_path / "i2i", "--seed", "2", "--image_path", str(tmp_path / "init.png"),
                      "--strength", "0.5")
    pixels, text = _read(i2i_path)
    assert pixels.shape == (SIZE, SIZE, 3) and not np.array_equal(pixels, _read(plain_path)[0])
    assert parse_a1111_parameters(text["parameters"])["Denoising strength"] == "0.5"


def test_swapping_the_lora_file_matches_loading_it(addons, tmp_path):
    other = tmp_path / "other.safetensors"
    weights = load_file(str(addons["lora"]))
    save_file({k: (-v if k.endswith("lora_up.weight") else v) for k, v in weights.items()}, str(other))
    setup = dict(sampler="euler", steps=STEPS, width=SIZE, height=SIZE)
    swapped = Generator(GenerationSetup(addons["ckpt"], networks=[(str(addons["lora"]), 0.7)], **setup))
    before = swapped.generate("a cat", seed=4).tobytes()
    swapped.swap_network(0, other)
    direct = Generator(GenerationSetup(addons["ckpt"], networks=[(str(other), 0.7)], **setup))
    after = swapped.generate("a cat", seed=4).tobytes()
    assert after == direct.generate("a cat", seed=4).tobytes() and after != before
    assert swapped.networks[0].name == "other" and swapped.networks[0].weight == 0.7


@pytest.mark.parametrize("tool, argv, message", [
    (gen_img, ["--ckpt", "missing.safetensors", "--outdir", "o", "--prompt", "x"], "missing.safetensors: no such file"),
    (gen_img, ["--outdir", "o", "--prompt", "x"], "--ckpt is required"),
    (gen_img, ["--ckpt", "tiny-sd1", "--outdir", "o", "--prompt", "x", "--sampler", "eulr"], "unknown sampler 'eulr'"),
    (gen_img, ["--ckpt", "tiny-sd1", "--outdir", "o", "--prompt", "x", "--network_weights", "a.safetensors",
               "b.safetensors", "--network_mul", "1", "2", "3"], "--network_mul: give one value or one per"),
    (xyz_grid, ["--ckpt", "tiny-sd1", "--outdir", "o", "--prompt", "x", "--x", "colour:1,2"],
     "--x 'colour:1,2': expected TYPE:v1,v2"),
    (xyz_grid, ["--ckpt", "tiny-sd1", "--outdir", "o", "--prompt", "x", "--x", "seed:1,two"],
     "seed value 'two' is not a whole number"),
    (xyz_grid, ["--ckpt", "tiny-sd1", "--outdir", "o", "--prompt", "x", "--x", "lora_weight:0,1"],
     "the lora_weight axis needs a network"),
])
def test_user_errors_exit_2_with_one_line(tool, argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        tool.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and message in err and "\n" not in err, err


def test_a_second_run_numbers_on_and_outputs_never_replace_other_files(addons, tmp_path, capsys):
    first = _gen(addons, tmp_path / "out", "--seed", "4")
    second = _gen(addons, tmp_path / "out", "--seed", "4")
    assert [p.name for p in first + second] == ["0000_4.png", "0001_4.png"]
    (tmp_path / "model.safetensors").write_bytes(b"not a picture")
    for argv, message in [
        (["xyz_grid", "--outfile", str(tmp_path / "model.safetensors")], "the grid is a PNG; name it .png"),
        (["xyz_grid", "--outfile", str(tmp_path / "model.png")], None),
        (["gen_img", "--outdir", str(tmp_path / "model.safetensors")], "is a file; give a folder for the images"),
        (["gen_img", "--outdir", str(tmp_path / "x"), "--steps", "0"], "--steps 0: give 1 or more sampling steps"),
    ]:
        if message is None:  # an existing file of another kind under a .png name
            (tmp_path / "model.png").write_bytes(b"not a picture either")
            message = "already exists and is not a PNG; refusing to overwrite it"
        tool = xyz_grid if argv[0] == "xyz_grid" else gen_img
        extra = ["--x", "seed:1,2"] if tool is xyz_grid else []
        with pytest.raises(SystemExit) as exit_info:
            tool.main(["--ckpt", addons["ckpt"], "--prompt", "a cat", *BASE, *argv[1:], *extra])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and "Traceback" not in err, err
    assert (tmp_path / "model.safetensors").read_bytes() == b"not a picture"
