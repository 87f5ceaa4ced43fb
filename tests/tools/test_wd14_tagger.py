"""tools/tag_images_by_wd14_tagger.py and library/data/wd14.py with a tiny ONNX tagger whose scores are known:
constants for most tags, and the mean blue / green / red of the model's (BGR) input for three colour tags, so the
channel order and the padding reach the tags. Its input is 24 px, a size only the model itself can tell."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from library.data import wd14
from library.errors import UserError
from tests.conftest import ROOT
from tools import tag_images_by_wd14_tagger as tagger_tool

SIZE = 24
# (tag_id, name, category, count, score): a constant, or "B"/"G"/"R" for that channel's mean / 255.
TAGS = [
    (9999999, "general", 9, 100, 0.6),
    (9999998, "sensitive", 9, 100, 0.7),  # the highest rating, and not the first row
    (9999997, "questionable", 9, 100, 0.3),
    (9999996, "explicit", 9, 100, 0.2),
    (1, "1girl", 0, 50, 0.9),
    (2, "long_hair", 0, 40, 0.6),
    (3, "^_^", 0, 5, 0.8),
    (4, "solo", 0, 30, 0.38),  # above the default 0.35, below 0.4
    (5, "smile", 0, 20, 0.2),
    (6, "red_theme", 0, 3, "R"),
    (7, "blue_theme", 0, 3, "B"),
    (8, "green_theme", 0, 3, "G"),
    (9, "hatsune_miku_(vocaloid)", 4, 9, 0.5),
    (10, "artoria_pendragon_(lancer)_(fate)", 4, 9, 0.9),
    (11, "kaga_(kantai_collection)", 4, 9, 0.3),
]
NAMES = [t[1] for t in TAGS]
CONSTANT = ["1girl", "long_hair", "^_^", "solo"]
CHARACTERS = ["hatsune_miku_(vocaloid)", "artoria_pendragon_(lancer)_(fate)"]
RED, BLUE = (255, 0, 0), (0, 0, 255)


def write_tagger(folder: Path, *, batch: int | str = "N") -> Path:
    """model.onnx (mean of the 0..255 NHWC input per channel / 255, times a weight matrix, plus constants) and its
    selected_tags.csv in `folder`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    weight = np.zeros((3, len(TAGS)), np.float32)
    bias = np.zeros(len(TAGS), np.float32)
    for i, (*_, score) in enumerate(TAGS):
        if isinstance(score, str):
            weight["BGR".index(score), i] = 1.0
        else:
            bias[i] = score
    nodes = [helper.make_node("ReduceMean", ["input"], ["mean"], axes=[1, 2], keepdims=0),
             helper.make_node("Mul", ["mean", "scale"], ["unit"]),
             helper.make_node("MatMul", ["unit", "weight"], ["product"]),
             helper.make_node("Add", ["product", "bias"], ["output"])]
    inits = [numpy_helper.from_array(np.array(1 / 255, np.float32), "scale"),
             numpy_helper.from_array(weight, "weight"), numpy_helper.from_array(bias, "bias")]
    graph = helper.make_graph(
        nodes, "tiny_wd14", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, SIZE, SIZE, 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, len(TAGS)])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # readable by every onnxruntime the project accepts
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / wd14.MODEL_FILE))
    lines = ["tag_id,name,category,count"] + [f"{i},{n},{c},{k}" for i, n, c, k, _ in TAGS]
    (folder / wd14.TAGS_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tagger(tmp_path_factory.mktemp("wd14") / "model")


def square(path: Path, colour, size=(SIZE, SIZE), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


def run_tool(data: Path, model: Path, *flags) -> None:
    tagger_tool.main([str(data), "--model_dir", str(model), *flags])


def caption(image: Path, extension=".txt") -> str:
    return image.with_suffix(extension).read_text(encoding="utf-8")


def table() -> wd14.TagTable:
    return wd14.TagTable(tuple(NAMES), tuple(t[2] for t in TAGS))


def scores(red=1.0, green=0.0, blue=0.0) -> np.ndarray:
    return np.array([{"R": red, "G": green, "B": blue}.get(s, s) if isinstance(s, str) else s for *_, s in TAGS],
                    np.float32)


# ---- library/data/wd14.py -------------------------------------------------------------------------------------


def test_tag_table_read_in_output_order(model_dir, tmp_path):
    read = wd14.read_tag_table(model_dir / wd14.TAGS_FILE)
    assert read.names == tuple(NAMES)
    assert read.indices(wd14.CATEGORY_RATING) == [0, 1, 2, 3]
    assert read.indices(wd14.CATEGORY_CHARACTER) == [12, 13, 14]
    bad = tmp_path / "selected_tags.csv"
    bad.write_text("id,tag\n1,a\n")
    with pytest.raises(UserError, match="tag_id,name,category"):
        wd14.read_tag_table(bad)


def test_thresholds_per_category():
    chosen = wd14.choose_tags(scores(), table(), wd14.TagOptions())
    assert chosen.general == CONSTANT + ["red_theme"]
    assert chosen.characters == CHARACTERS
    assert chosen.tags == CONSTANT + ["red_theme"] + CHARACTERS
    assert chosen.rating is None  # no rating without --use_rating_tags*
    strict = wd14.choose_tags(scores(), table(), wd14.TagOptions(general_threshold=0.4, character_threshold=0.25))
    assert strict.general == ["1girl", "long_hair", "^_^", "red_theme"]
    assert strict.characters == CHARACTERS + ["kaga_(kantai_collection)"]
    # at the threshold counts (>=, as sd-scripts)
    assert "solo" in wd14.choose_tags(scores(), table(), wd14.TagOptions(general_threshold=np.float32(0.38))).tags


def test_rating_first_or_last_and_the_highest():
    first = wd14.choose_tags(scores(), table(), wd14.TagOptions(use_rating_tags=True))
    assert first.rating == "sensitive" and first.tags[0] == "sensitive"
    last = wd14.choose_tags(scores(), table(), wd14.TagOptions(use_rating_tags_as_last_tag=True))
    assert last.tags[-1] == "sensitive" and last.tags.count("sensitive") == 1


def test_character_tags_first_in_sd_scripts_order():
    chosen = wd14.choose_tags(scores(), table(), wd14.TagOptions(character_tags_first=True, use_rating_tags=True))
    # each character tag is put at the front as it comes, then the rating before them: sd-scripts' order
    assert chosen.tags == ["sensitive", CHARACTERS[1], CHARACTERS[0]] + CONSTANT + ["red_theme"]


def test_always_first_and_undesired_tags():
    options = wd14.TagOptions(always_first_tags=wd14.split_tags("solo,1boy,^_^"), use_rating_tags=True,
                              undesired_tags=frozenset(wd14.split_tags("long_hair, sensitive,hatsune_miku_(vocaloid)")))
    chosen = wd14.choose_tags(scores(), table(), options)
    # moved to the front one after the other (absent 1boy ignored): the last listed ends up first
    assert chosen.tags == ["^_^", "solo", "1girl", "red_theme", CHARACTERS[1]]
    assert chosen.rating is None  # the undesired rating is not replaced by the next best


def test_remove_underscore_keeps_kaomoji():
    renamed = wd14.rename_tags(table(), remove_underscore=True)
    assert "long hair" in renamed.names and "^_^" in renamed.names
    assert "hatsune miku (vocaloid)" in renamed.names
    assert wd14.underscores_to_spaces("(o)_(o)") == "(o)_(o)" and wd14.underscores_to_spaces("x_x") == "x_x"
    chosen = wd14.choose_tags(scores(), renamed, wd14.TagOptions())
    assert chosen.tags[:3] == ["1girl", "long hair", "^_^"]


def test_tag_replacement_with_escapes():
    pairs = wd14.parse_tag_replacement("long hair,very long hair;1girl,girl\\, solo;^_^,smile\\;")
    assert pairs == [("long hair", "very long hair"), ("1girl", "girl, solo"), ("^_^", "smile;")]
    renamed = wd14.rename_tags(table(), remove_underscore=True, replacements=pairs)
    chosen = wd14.choose_tags(scores(), renamed, wd14.TagOptions())
    assert chosen.tags[:3] == ["girl, solo", "very long hair", "smile;"]
    for bad in ("no_target", "a,b,c", "a,b;"):
        with pytest.raises(UserError, match="source,target"):
            wd14.parse_tag_replacement(bad)


def test_character_tag_expand():
    assert wd14.expand_character_tag("hatsune_miku_(vocaloid)", ", ") == "hatsune_miku, vocaloid"
    assert wd14.expand_character_tag("artoria_pendragon_(lancer)_(fate)", ", ") == "artoria_pendragon_(lancer), fate"
    renamed = wd14.rename_tags(table(), character_tag_expand=True, remove_underscore=True)
    assert renamed.names[12:] == ("hatsune miku, vocaloid", "artoria pendragon (lancer), fate",
                                  "kaga, kantai collection")
    assert renamed.names[9] == "red theme"  # general tags are not expanded


def test_merge_tags_appends_only_new_and_is_idempotent():
    merged = wd14.merge_tags("my caption, 1girl\n", ["1girl", "solo", "miku, vocaloid"])
    assert merged == "my caption, 1girl, solo, miku, vocaloid"
    assert wd14.merge_tags(merged + "\n", ["1girl", "solo", "miku, vocaloid"]) == merged


def test_preprocess_pads_to_square_with_white_resizes_and_is_bgr():
    wide = Image.new("RGB", (48, 24), RED)
    array = wd14.preprocess(wide, SIZE)
    assert array.shape == (SIZE, SIZE, 3) and array.dtype == np.float32
    # 48x24 padded to 48x48 (12 white rows above and below), then halved: 6 white rows each side
    assert (array[:6] == 255).all() and (array[-6:] == 255).all()
    assert (array[6:-6] == [0, 0, 255]).all()  # red in BGR order
    tall_small = wd14.preprocess(Image.new("RGB", (8, 16), BLUE), 32)  # padded to 16x16, enlarged to 32x32
    assert tall_small.shape == (32, 32, 3)
    assert (tall_small[:, 16] == [255, 0, 0]).all() and (tall_small[:, 0] == 255).all()


def test_preprocess_lays_transparency_on_white():
    clear = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))  # transparent black: convert("RGB") alone gives black
    assert (wd14.preprocess(clear, SIZE) == 255).all()
    half = Image.new("RGBA", (SIZE, SIZE), (255, 0, 0, 128))
    assert np.allclose(wd14.preprocess(half, SIZE)[0, 0], [127, 127, 255], atol=1)


def test_input_size_and_batch_from_the_model_shape():
    assert wd14.input_size([None, 448, 448, 3]) == 448
    assert wd14.input_size(["N", 32, 32, 3]) == 32
    assert wd14.input_size(["N", "h", "w", 3]) == wd14.DEFAULT_IMAGE_SIZE
    with pytest.raises(UserError, match="height, width, 3"):
        wd14.input_size([1, 3, 448, 448])
    assert wd14.fixed_batch_size([4, 448, 448, 3]) == 4 and wd14.fixed_batch_size(["N", 448, 448, 3]) is None


def test_choose_providers():
    cpu_only = ["AzureExecutionProvider", "CPUExecutionProvider"]
    assert wd14.choose_providers("auto", None, cpu_only) == ["CPUExecutionProvider"]
    assert wd14.choose_providers("auto", None, ["CUDAExecutionProvider"] + cpu_only)[0] == "CUDAExecutionProvider"
    assert wd14.choose_providers("cpu", None, ["CUDAExecutionProvider"] + cpu_only) == ["CPUExecutionProvider"]
    with pytest.raises(UserError, match="no CUDAExecutionProvider.*onnxruntime-gpu"):
        wd14.choose_providers("cuda", None, cpu_only)
    with pytest.raises(UserError, match="TensorrtExecutionProvider"):
        wd14.choose_providers("auto", "TensorrtExecutionProvider,CPUExecutionProvider", cpu_only)


# ---- the tool ---------------------------------------------------------------------------------------------------


def test_writes_tag_files_beside_images(model_dir, tmp_path, capsys):
    data = tmp_path / "data"
    red, blue = square(data / "red.png", RED), square(data / "blue.jpg", BLUE)
    square(data / "sub" / "deep.png", RED)  # not tagged without --recursive
    run_tool(data, model_dir)
    assert caption(red) == ", ".join(CONSTANT + ["red_theme"] + CHARACTERS) + "\n"
    assert caption(blue) == ", ".join(CONSTANT + ["blue_theme"] + CHARACTERS) + "\n"
    assert not (data / "sub" / "deep.txt").exists()
    assert "2 written, 0 already done" in capsys.readouterr().out


def test_thresholds_and_separator_flags(model_dir, tmp_path):
    red = square(tmp_path / "d" / "red.png", RED)
    run_tool(red.parent, model_dir, "--thresh", "0.55", "--character_threshold", "0.25", "--caption_separator", "|",
             "--caption_extension", ".tags")
    assert caption(red, ".tags") == "|".join(["1girl", "long_hair", "^_^", "red_theme"] + CHARACTERS
                                             + ["kaga_(kantai_collection)"]) + "\n"


def test_array_fed_to_the_model(model_dir, tmp_path, monkeypatch):
    fed = []
    original = tagger_tool.OnnxTagger.scores

    def spy(self, arrays):
        fed.extend(arrays)
        return original(self, arrays)

    monkeypatch.setattr(tagger_tool.OnnxTagger, "scores", spy)
    image = square(tmp_path / "d" / "wide.png", RED, size=(96, 48))
    run_tool(image.parent, model_dir)
    assert len(fed) == 1 and fed[0].shape == (SIZE, SIZE, 3) and fed[0].dtype == np.float32  # size from the model
    assert (fed[0][:6] == 255).all() and (fed[0][-6:] == 255).all() and (fed[0][6:-6] == [0, 0, 255]).all()
    # through the model: blue mean 0.5 (the white padding) passes 0.35, so blue_theme is tagged as well
    assert "blue_theme" in caption(image) and "red_theme" in caption(image)


def test_second_run_skips_and_overwrite_redoes(model_dir, tmp_path, capsys):
    red = square(tmp_path / "d" / "red.png", RED)
    square(tmp_path / "d" / "other.png", BLUE)
    run_tool(red.parent, model_dir)
    red.with_suffix(".txt").write_text("hand edited")
    capsys.readouterr()
    run_tool(red.parent, model_dir)
    assert caption(red) == "hand edited"
    assert "0 written, 2 already done" in capsys.readouterr().out
    run_tool(red.parent, model_dir, "--overwrite")
    assert caption(red).startswith("1girl, long_hair")
    assert "2 written, 0 already done" in capsys.readouterr().out


def test_append_tags_merges_without_duplicates(model_dir, tmp_path):
    red = square(tmp_path / "d" / "red.png", RED)
    fresh = square(tmp_path / "d" / "fresh.png", RED)
    red.with_suffix(".txt").write_text("a photo, 1girl, solo\n")
    flags = ("--append_tags", "--undesired_tags", "long_hair,^_^", "--character_tag_expand")
    run_tool(red.parent, model_dir, *flags)
    expected = "a photo, 1girl, solo, red_theme, hatsune_miku, vocaloid, artoria_pendragon_(lancer), fate\n"
    assert caption(red) == expected
    assert caption(fresh) == "1girl, solo, red_theme, hatsune_miku, vocaloid, artoria_pendragon_(lancer), fate\n"
    run_tool(red.parent, model_dir, *flags)  # appending again adds nothing
    assert caption(red) == expected


def test_corrupt_image_reported_and_skipped_exit_0(model_dir, tmp_path):
    good = square(tmp_path / "d" / "good.png", RED)
    (tmp_path / "d" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    proc = subprocess.run([sys.executable, "tools/tag_images_by_wd14_tagger.py", str(good.parent), "--model_dir",
                           str(model_dir), "--batch_size", "2"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "skipped unreadable image" in proc.stderr and "broken.png" in proc.stderr
    assert good.with_suffix(".txt").exists() and not (tmp_path / "d" / "broken.txt").exists()
    assert "1 written, 0 already done (skipped; --overwrite redoes them), 1 unreadable, of 2 images" in proc.stdout
    assert "unreadable: " in proc.stdout and "broken.png" in proc.stdout


def test_missing_model_files_is_one_line_exit_2(tmp_path):
    data = square(tmp_path / "d" / "red.png", RED).parent
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / wd14.TAGS_FILE).write_text("tag_id,name,category,count\n")
    proc = subprocess.run([sys.executable, "tools/tag_images_by_wd14_tagger.py", str(data), "--model_dir",
                           str(tmp_path / "model")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "no model.onnx" in lines[0] and "put model.onnx and selected_tags.csv" in lines[0]
    assert not data.joinpath("red.txt").exists()


def test_force_download_and_cuda_refused_with_exit_2(model_dir, tmp_path, capsys):
    data = square(tmp_path / "d" / "red.png", RED).parent
    with pytest.raises(SystemExit) as exit_:
        run_tool(data, model_dir, "--force_download")
    assert exit_.value.code == 2 and "never downloads" in capsys.readouterr().err
    import onnxruntime
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(SystemExit) as exit_:
            run_tool(data, model_dir, "--device", "cuda")
        assert exit_.value.code == 2 and "pip install onnxruntime-gpu" in capsys.readouterr().err
    assert not (data / "red.txt").exists()


def test_model_with_fixed_batch_takes_padded_batches(tmp_path, capsys):
    model = write_tagger(tmp_path / "fixed", batch=2)
    data = tmp_path / "d"
    images = [square(data / f"{i}.png", RED if i % 2 else BLUE) for i in range(3)]
    run_tool(data, model, "--batch_size", "1")
    assert "batches of 2" in capsys.readouterr().err
    assert ["red_theme" in caption(image) for image in images] == [False, True, False]


def test_sd_scripts_command_line_unchanged(tmp_path, capsys):
    # sd-scripts' documented Animagine example, plus its other flags, with the model where sd-scripts downloads it
    model_dir = tmp_path / "wd14_tagger_model"
    write_tagger(model_dir / "SmilingWolf_wd-swinv2-tagger-v3")
    data = tmp_path / "train_data"
    red = square(data / "a" / "red.png", RED)
    blue = square(data / "blue.webp", BLUE)
    tagger_tool.main([
        "--onnx", "--repo_id", "SmilingWolf/wd-swinv2-tagger-v3", "--batch_size", "4", "--remove_underscore",
        "--undesired_tags", "long hair,questionable", "--recursive", "--use_rating_tags_as_last_tag",
        "--character_tags_first", "--character_tag_expand", "--always_first_tags", "1girl,1boy",
        "--model_dir", str(model_dir), "--max_data_loader_n_workers", "2", "--pin_memory", "--caption_extention",
        ".caption", "--thresh", "0.35", "--general_threshold", "0.35", "--character_threshold", "0.35", "--debug",
        "--frequency_tags", "--caption_separator", ", ", "--tag_replacement", "red theme,red;blue theme,blue",
        str(data)])
    tail = ["artoria pendragon (lancer), fate", "hatsune miku, vocaloid", "^_^", "solo"]
    assert caption(red, ".caption") == ", ".join(["1girl"] + tail + ["red", "sensitive"]) + "\n"
    assert caption(blue, ".caption") == ", ".join(["1girl"] + tail + ["blue", "sensitive"]) + "\n"
    out = capsys.readouterr().out
    assert "Tag frequencies:\n" in out and "1girl: 2\n" in out and "red: 1\n" in out
    assert "Rating tags: sensitive" in out and "Character tags: hatsune miku, vocaloid, artoria" in out


def test_a_tagger_exported_from_torch_tags_as_the_torch_model_scores(tmp_path):
    """The issue's fixture as asked: a tiny torch model (NHWC in, sigmoid scores out, as SmilingWolf's taggers)
    exported with torch.onnx.export; the tags written are exactly those the torch model scores at or above --thresh on
    the tagger's preprocessing of each image."""
    import torch

    class Tagger(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 1)
            self.head = torch.nn.Linear(3, 6)

        def forward(self, x):  # (N, H, W, 3) BGR 0..255
            features = self.conv(x.permute(0, 3, 1, 2) / 255 - 0.5).mean((2, 3))
            return torch.sigmoid(self.head(features) * 8)

    torch.manual_seed(9)  # a seed whose random tagger tags the three colours differently
    model = Tagger().eval()
    folder = tmp_path / "torch_tagger"
    folder.mkdir()
    torch.onnx.export(model, (torch.rand(1, 32, 32, 3) * 255,), str(folder / wd14.MODEL_FILE), dynamo=False,
                      input_names=["input_1"], output_names=["predictions_sigmoid"],
                      dynamic_axes={"input_1": {0: "batch"}, "predictions_sigmoid": {0: "batch"}})
    names = ["general", "questionable", "solo", "long_hair", "red_theme", "hatsune_miku"]
    categories = [9, 9, 0, 0, 0, 4]
    rows = ["tag_id,name,category,count"] + [f"{i},{n},{c},1" for i, (n, c) in enumerate(zip(names, categories))]
    (folder / wd14.TAGS_FILE).write_text("\n".join(rows) + "\n", encoding="utf-8")
    images = [square(tmp_path / "data" / f"{i}.png", colour, size=(40, 24))
              for i, colour in enumerate([RED, BLUE, (30, 200, 90)])]
    run_tool(tmp_path / "data", folder, "--thresh", "0.5", "--batch_size", "2")
    seen = []
    for image in images:
        array = wd14.preprocess(Image.open(image).convert("RGB"), 32)
        with torch.no_grad():
            probs = model(torch.from_numpy(array[None])).numpy()[0]
        expected = [n for n, c, p in zip(names, categories, probs) if c != 9 and p >= 0.5]
        written = caption(image).strip().split(", ") if caption(image).strip() else []
        assert sorted(written) == sorted(expected), (image.name, probs)
        seen.append(tuple(expected))
    assert len(set(seen)) > 1 and any(seen)  # the images differ in their tags, and some are tagged
