"""--dataset_config (sd-scripts' schema and fallbacks) and the no-config folder / --in_json discovery."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from library.config.dataset_config import (DATASET_OPTION_NAMES, DatasetSupport, dataset_specs_from_dirs,
                                           load_dataset_config)
from library.data.specs import DatasetSpec, SubsetSpec
from library.errors import UserError
from tests.helpers import make_image_folder

# The example of sd-scripts' docs/config_README-en.md, verbatim.
DOC_EXAMPLE = r"""[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1

# This is a DreamBooth-style dataset
[[datasets]]
resolution = 512
batch_size = 4
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = 'C:\hoge'
  class_tokens = 'hoge girl'
  # This subset uses keep_tokens = 2 (the value of the parent datasets)

  [[datasets.subsets]]
  image_dir = 'C:\fuga'
  class_tokens = 'fuga boy'
  keep_tokens = 3

  [[datasets.subsets]]
  is_reg = true
  image_dir = 'C:\reg'
  class_tokens = 'human'
  keep_tokens = 1

# This is a fine-tuning dataset
[[datasets]]
resolution = [768, 768]
batch_size = 2

  [[datasets.subsets]]
  image_dir = 'C:\piyo'
  metadata_file = 'C:\piyo\piyo_md.json'
  # This subset uses keep_tokens = 1 (the value of [general])
"""

DOC_EXAMPLE_JSON = {
    "general": {"shuffle_caption": True, "caption_extension": ".txt", "keep_tokens": 1},
    "datasets": [
        {"resolution": 512, "batch_size": 4, "keep_tokens": 2, "subsets": [
            {"image_dir": "C:\\hoge", "class_tokens": "hoge girl"},
            {"image_dir": "C:\\fuga", "class_tokens": "fuga boy", "keep_tokens": 3},
            {"is_reg": True, "image_dir": "C:\\reg", "class_tokens": "human", "keep_tokens": 1},
        ]},
        {"resolution": [768, 768], "batch_size": 2, "subsets": [
            {"image_dir": "C:\\piyo", "metadata_file": "C:\\piyo\\piyo_md.json"},
        ]},
    ],
}

# What a command line could add: every value the file does not set falls back to these.
OPTIONS = {"flip_aug": True, "train_batch_size": 8, "dataset_repeats": 3, "enable_bucket": True, "resolution": "640",
           "caption_extension": ".cap", "network_multiplier": 0.5, "min_bucket_reso": 320, "keep_tokens": 7,
           "caption_prefix": None, "train_data_dir": None}


def _write(tmp_path: Path, text: str, name: str = "dataset.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _error(path: Path, options=None, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        load_dataset_config(path, options or {}, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def _with_subset_line(line: str) -> str:
    """The doc example with one more line in [[datasets]] #1 > [[datasets.subsets]] #2 (file line 21)."""
    return DOC_EXAMPLE.replace("  keep_tokens = 3\n", f"  keep_tokens = 3\n{line}\n")


def _expected_doc_example() -> list[DatasetSpec]:
    def db(image_dir, class_tokens, keep_tokens, is_reg=False):
        return SubsetSpec(image_dir=image_dir, class_tokens=class_tokens, keep_tokens=keep_tokens, is_reg=is_reg,
                          num_repeats=3, caption_extension=".txt", shuffle_caption=True, flip_aug=True)

    dreambooth = DatasetSpec(
        subsets=(db("C:\\hoge", "hoge girl", 2), db("C:\\fuga", "fuga boy", 3), db("C:\\reg", "human", 1, True)),
        resolution=(512, 512), batch_size=4, enable_bucket=True, min_bucket_reso=320, network_multiplier=0.5)
    # A fine-tuning subset has no caption_extension in sd-scripts, so neither [general] nor the options reach it.
    fine_tuning = DatasetSpec(
        subsets=(SubsetSpec(image_dir="C:\\piyo", metadata_file="C:\\piyo\\piyo_md.json", keep_tokens=1,
                            num_repeats=3, shuffle_caption=True, flip_aug=True),),
        resolution=(768, 768), batch_size=2, enable_bucket=True, min_bucket_reso=320, network_multiplier=0.5)
    return [dreambooth, fine_tuning]


def test_doc_example_resolves_with_general_and_option_fallbacks(tmp_path):
    specs = load_dataset_config(_write(tmp_path, DOC_EXAMPLE), OPTIONS)
    assert specs == _expected_doc_example()
    assert [s.is_fine_tuning for s in specs] == [False, True]
    # Field by field for the fallbacks that matter most (== above pins everything else).
    hoge, fuga, reg = specs[0].subsets
    assert (hoge.keep_tokens, fuga.keep_tokens, reg.keep_tokens, specs[1].subsets[0].keep_tokens) == (2, 3, 1, 1)
    assert hoge.caption_extension == ".txt" and specs[1].subsets[0].caption_extension == ".caption"
    assert specs[0].batch_size == 4 and specs[0].resolution == (512, 512)


def test_json_equivalent_resolves_to_the_same_specs(tmp_path):
    path = _write(tmp_path, json.dumps(DOC_EXAMPLE_JSON, indent=2), "dataset.json")
    assert load_dataset_config(path, OPTIONS) == _expected_doc_example()


def test_without_options_the_spec_defaults_apply(tmp_path):
    dreambooth, _ = load_dataset_config(_write(tmp_path, DOC_EXAMPLE), {})
    assert dreambooth.subsets[0] == SubsetSpec(image_dir="C:\\hoge", class_tokens="hoge girl", keep_tokens=2,
                                               caption_extension=".txt", shuffle_caption=True)
    assert (dreambooth.enable_bucket, dreambooth.min_bucket_reso, dreambooth.network_multiplier) == (False, 256, 1.0)


@pytest.mark.parametrize("given, expected", [("512,768", (512, 768)), ("640", (640, 640)), (704, (704, 704)),
                                             ((512, 640), (512, 640))])
def test_resolution_option_forms(tmp_path, given, expected):
    path = _write(tmp_path, "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\n")
    assert load_dataset_config(path, {"resolution": given})[0].resolution == expected


def test_values_of_every_kind_are_converted(tmp_path):
    path = _write(tmp_path, """
[general]
face_crop_aug_range = [2, 4]
caption_dropout_rate = 0
custom_attributes = { diff_output_preservation = true }
resize_interpolation = 'area'
[[datasets]]
resolution = [512, 768]
network_multiplier = 1
validation_split = 0.1
validation_seed = 42
  [[datasets.subsets]]
  image_dir = 'a'
  caption_extension = 'txt'
  token_warmup_step = 5
""")
    (spec,) = load_dataset_config(path, {})
    subset = spec.subsets[0]
    assert subset.face_crop_aug_range == (2.0, 4.0) and subset.caption_dropout_rate == 0.0
    assert subset.custom_attributes == {"diff_output_preservation": True}
    assert subset.caption_extension == ".txt"  # sd-scripts adds the dot
    assert subset.token_warmup_step == 5.0 and subset.resize_interpolation == "area"
    assert (spec.resolution, spec.network_multiplier, spec.validation_split, spec.validation_seed) == \
           ((512, 768), 1.0, 0.1, 42)
    assert spec.resize_interpolation == "area"


def test_duplicate_subsets_are_dropped_with_a_warning(tmp_path):
    path = _write(tmp_path, "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\n[[datasets.subsets]]\n"
                            "image_dir = 'a'\nnum_repeats = 5\n")
    problems = []
    (spec,) = load_dataset_config(path, {}, problems=problems)
    assert [s.num_repeats for s in spec.subsets] == [1]
    assert problems == ["duplicate subset 'a' in one dataset ignored; the first one is used (as in sd-scripts)"]


def test_folder_options_are_ignored_with_a_config(tmp_path):
    path = _write(tmp_path, DOC_EXAMPLE)
    problems = []
    load_dataset_config(path, {"train_data_dir": "/data/train", "in_json": None}, problems=problems)
    assert problems == [f"--train_data_dir is ignored because --dataset_config is given (as in sd-scripts); list its "
                        f"folder in {path} instead"]


# ---- errors: file, table, key, and how to fix it

def test_misspelt_subset_key_names_file_line_table_and_suggestion(tmp_path):
    path = _write(tmp_path, _with_subset_line("  caption_extention = '.txt'"))
    assert _error(path) == (f"{path}:21: [[datasets]] #1 > [[datasets.subsets]] #2: unknown key 'caption_extention' "
                            "(did you mean 'caption_extension'?)")


@pytest.mark.parametrize("text, where, key, suggestion", [
    ("[general]\nshufle_caption = true\n[[datasets]]\n[[datasets.subsets]]\nimage_dir='a'\n",
     ":2: [general]", "shufle_caption", "shuffle_caption"),
    ("[[datasets]]\nresoluton = 512\n[[datasets.subsets]]\nimage_dir='a'\n",
     ":2: [[datasets]] #1", "resoluton", "resolution"),
])
def test_misspelt_keys_in_general_and_datasets(tmp_path, text, where, key, suggestion):
    path = _write(tmp_path, text)
    assert _error(path) == f"{path}{where}: unknown key '{key}' (did you mean '{suggestion}'?)"


def test_unknown_key_without_a_close_match_says_how_to_fix(tmp_path):
    path = _write(tmp_path, _with_subset_line("  zzz = 1"))
    assert _error(path).endswith("#2: unknown key 'zzz'; remove it or fix its spelling")


@pytest.mark.parametrize("line, message", [
    ("  num_repeats = '10'", "num_repeats must be an integer, got '10' (a string: remove the quotes)"),
    ("  num_repeats = 1.5", "num_repeats must be an integer, got 1.5"),
    ("  num_repeats = true", "num_repeats must be an integer, got true"),
    ("  flip_aug = 'yes'", "flip_aug must be true or false, got 'yes'"),
    ("  caption_extension = 5", "caption_extension must be a string, got 5 (put it in quotes)"),
    ("  face_crop_aug_range = [1.0]", "face_crop_aug_range must be two numbers [min, max], got [1.0]"),
    ("  caption_dropout_rate = 'x'", "caption_dropout_rate must be a number, got 'x'"),
    ("  resize_interpolation = 'lanczoz'", "resize_interpolation must be one of lanczos, nearest, bilinear, linear, "
                                           "bicubic, cubic, area, box, got 'lanczoz' (did you mean 'lanczos'?)"),
])
def test_wrong_types_say_the_expected_type(tmp_path, line, message):
    path = _write(tmp_path, _with_subset_line(line))
    assert _error(path) == f"{path}:21: [[datasets]] #1 > [[datasets.subsets]] #2: {message}"


def test_resolution_must_be_int_or_pair(tmp_path):
    path = _write(tmp_path, DOC_EXAMPLE.replace("resolution = 512", "resolution = '512'"))
    assert _error(path) == (f"{path}:8: [[datasets]] #1: resolution must be an integer or [width, height], "
                            "got '512' (a string: remove the quotes)")
    path = _write(tmp_path, DOC_EXAMPLE.replace("resolution = 512", "resolution = [512, 512, 3]"))
    assert "resolution must be an integer or [width, height], got [512, 512, 3]" in _error(path)


def test_toml_syntax_error_gives_line_column_and_parser_message(tmp_path):
    path = _write(tmp_path, "[general]\nflip_aug = \n")
    assert _error(path) == f"{path}:2:12: TOML syntax error: Invalid value"
    path = _write(tmp_path, "[general]\nflip_aug = [true\n")
    assert _error(path) == f"{path}: TOML syntax error: Unclosed array (at end of file)"


def test_key_given_twice_in_one_table_is_explained(tmp_path):
    path = _write(tmp_path, _with_subset_line("  keep_tokens = 4"))
    assert _error(path) == (f"{path}:21:18: key 'keep_tokens' is given twice in the same table "
                            "(TOML: Cannot overwrite a value); keep only one")


def test_table_declared_twice_is_explained(tmp_path):
    path = _write(tmp_path, "[general]\nflip_aug = true\n[general]\ncolor_aug = true\n")
    assert _error(path) == (f"{path}:3:9: table [general] is declared twice (TOML: Cannot declare ('general',) "
                            "twice); merge them into one")


def test_backslash_in_double_quotes_suggests_single_quotes(tmp_path):
    path = _write(tmp_path, '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "C:\\hoge"\n')
    message = _error(path)
    assert message.startswith(f"{path}:3:") and "Unescaped '\\' in a string" in message
    assert "write Windows paths in single quotes" in message


def test_json_errors(tmp_path):
    path = _write(tmp_path, '{"general": {\n  "flip_aug": tru\n}}', "dataset.json")
    assert _error(path) == f"{path}:2:15: JSON syntax error: Expecting value"
    path = _write(tmp_path, '{"general": {"flip_aug": true, "flip_aug": false}}', "dataset.json")
    assert _error(path) == f"{path}: key 'flip_aug' is given twice in the same JSON object; keep only one"
    text = json.dumps({"datasets": [{"subsets": [{"image_dir": "a", "num_repeat": 2}]}]})
    assert _error(_write(tmp_path, text, "dataset.json")) == (
        f"{tmp_path / 'dataset.json'}: [[datasets]] #1 > [[datasets.subsets]] #1: unknown key 'num_repeat' "
        "(did you mean 'num_repeats'?)")


def test_mixed_dreambooth_and_fine_tuning_subsets_name_the_dataset(tmp_path):
    text = DOC_EXAMPLE.replace("  image_dir = 'C:\\piyo'\n", "  image_dir = 'C:\\piyo'\n"
                                                            "  [[datasets.subsets]]\n  image_dir = 'C:\\other'\n")
    path = _write(tmp_path, text)
    # The inserted subset takes over the metadata_file line below it, so #1 is DreamBooth and #2 fine-tuning.
    assert _error(path) == (f"{path}:29: [[datasets]] #2: mixes DreamBooth subsets (#1: no metadata_file) and "
                            "fine-tuning subsets (#2: metadata_file); split them into two [[datasets]]")


def test_missing_image_dir_is_required(tmp_path):
    path = _write(tmp_path, "[[datasets]]\n[[datasets.subsets]]\nclass_tokens = 'sks'\n")
    assert _error(path) == (f"{path}:2: [[datasets]] #1 > [[datasets.subsets]] #1: image_dir is required in a "
                            "DreamBooth subset; add image_dir = 'path/to/images'")


def test_conditioning_data_dir_is_a_dreambooth_subset_key(tmp_path):
    path = _write(tmp_path, _with_subset_line("  conditioning_data_dir = 'c'"))
    subsets = load_dataset_config(path, {})[0].subsets
    assert [s.conditioning_data_dir for s in subsets] == [None, "c", None]
    general = _write(tmp_path, DOC_EXAMPLE.replace("[general]\n", "[general]\nconditioning_data_dir = 'c'\n"),
                     "general.toml")
    assert "conditioning_data_dir" in _error(general)  # one folder of masks per subset, as in sd-scripts


def test_skip_image_resolution_in_a_dataset_is_not_supported_yet(tmp_path):
    path = _write(tmp_path, DOC_EXAMPLE.replace("batch_size = 4", "batch_size = 4\nskip_image_resolution = 768"))
    assert _error(path) == (f"{path}:10: [[datasets]] #1: skip_image_resolution (newer sd-scripts) is not supported "
                            "yet; remove it")


@pytest.mark.parametrize("text, where, message", [
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\nresolution = 512\n",
     ":4: [[datasets]] #1 > [[datasets.subsets]] #1",
     "'resolution' does not belong in this table; put it in [general] or [[datasets]]"),
    ("[general]\nimage_dir = 'a'\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\n", ":2: [general]",
     "'image_dir' does not belong in this table; put it in [[datasets.subsets]]"),
    ("[[datasets]]\nis_reg = true\n[[datasets.subsets]]\nimage_dir = 'a'\n", ":2: [[datasets]] #1",
     "'is_reg' does not belong in this table; put it in [[datasets.subsets]]"),
    ("[[datasets]]\ncaption_extension = '.txt'\n[[datasets.subsets]]\nmetadata_file = 'm.json'\n",
     ":2: [[datasets]] #1",
     "'caption_extension' applies to DreamBooth subsets only, and this dataset is fine-tuning (its subsets have "
     "metadata_file); remove it"),
    ("[[datasets]]\ntrain_batch_size = 2\n[[datasets.subsets]]\nimage_dir = 'a'\n", ":2: [[datasets]] #1",
     "'train_batch_size' is not a dataset config key: the dataset config calls it batch_size"),
    ("[[datasets]]\nprior_loss_weight = 1.0\n[[datasets.subsets]]\nimage_dir = 'a'\n", ":2: [[datasets]] #1",
     "'prior_loss_weight' is not a dataset config key: it is a training option: pass --prior_loss_weight or put "
     "it in --config_file"),
])
def test_keys_in_the_wrong_table_say_where_they_belong(tmp_path, text, where, message):
    path = _write(tmp_path, text)
    assert _error(path) == f"{path}{where}: {message}"


@pytest.mark.parametrize("text, message", [
    ("[general]\nflip_aug = true\n", "{path}: no [[datasets]]: add a [[datasets]] table and at least one "
                                     "[[datasets.subsets]] with image_dir = 'path/to/images'"),
    ("[datasets]\nresolution = 512\n", "{path}:1: [datasets]: datasets must be an array of tables: write "
                                       "[[datasets]] with double brackets"),
    ("[[datasets]]\nresolution = 512\n", "{path}:1: [[datasets]] #1: no [[datasets.subsets]]: add one below it with "
                                         "image_dir = 'path/to/images'"),
    ("[[datasets]]\n[datasets.subsets]\nimage_dir = 'a'\n", "{path}:1: [[datasets]] #1: subsets must be an array of "
                                                            "tables: write [[datasets.subsets]] with double brackets"),
    ("[genral]\nflip_aug = true\n", "{path}:1: top level: unknown key 'genral' (did you mean 'general'?)"),
    ("flip_aug = true\n", "{path}:1: top level: unknown key 'flip_aug'; put it in [general] or [[datasets]]"),
])
def test_layout_mistakes(tmp_path, text, message):
    path = _write(tmp_path, text)
    assert _error(path) == message.format(path=path)


def test_training_script_support_flags(tmp_path):
    fine_tuning = _write(tmp_path, "[[datasets]]\n[[datasets.subsets]]\nmetadata_file = 'm.json'\n")
    assert _error(fine_tuning, support=DatasetSupport(fine_tuning=False)) == (
        f"{fine_tuning}:1: [[datasets]] #1: fine-tuning subsets (metadata_file) are not supported by this training "
        "script; use image_dir subsets with caption files")
    dropout = _write(tmp_path, _with_subset_line("  caption_dropout_rate = 0.1"))
    assert _error(dropout, support=DatasetSupport(caption_dropout=False)) == (
        f"{dropout}:21: [[datasets]] #1 > [[datasets.subsets]] #2: 'caption_dropout_rate': this training script "
        "has no caption dropout (as in sd-scripts); remove it")


@pytest.mark.parametrize("name, message", [
    ("missing.toml", "--dataset_config {path}: no such file"),
    ("dataset.yaml", "--dataset_config {path}: must be a .toml or .json file"),
])
def test_file_problems(tmp_path, name, message):
    path = tmp_path / name
    if name.endswith(".yaml"):
        path.write_text("a: 1")
    assert _error(path) == message.format(path=path)


def test_bad_option_values_name_the_option(tmp_path):
    path = _write(tmp_path, DOC_EXAMPLE)
    assert _error(path, {"resolution": "512x512"}) == ("option --resolution must be 'size' or 'width,height' "
                                                       "(e.g. 512 or 512,768), got '512x512'")
    assert _error(path, {"face_crop_aug_range": "4.0,2.0"}) == ("option --face_crop_aug_range must be 'min,max' "
                                                                "with min <= max (e.g. 2.0,4.0), got '4.0,2.0'")
    (spec, _) = load_dataset_config(path, {"face_crop_aug_range": "2.0,4.0"})
    assert spec.subsets[0].face_crop_aug_range == (2.0, 4.0)


def test_option_names_constant_covers_the_mapped_names():
    assert {"train_batch_size", "dataset_repeats", "train_data_dir", "reg_data_dir", "in_json"} <= \
        set(DATASET_OPTION_NAMES)
    assert len(DATASET_OPTION_NAMES) == len(set(DATASET_OPTION_NAMES)) == 34


# ---- no config: folders and --in_json

def test_dreambooth_folders_become_subsets(tmp_path):
    make_image_folder(tmp_path / "train", repeats=10, class_tokens="sks dog", count=1)
    make_image_folder(tmp_path / "train", repeats=5, class_tokens="cat_girl", count=1)
    make_image_folder(tmp_path / "reg", repeats=1, class_tokens="dog", count=1)
    options = {"train_data_dir": str(tmp_path / "train"), "reg_data_dir": str(tmp_path / "reg"),
               "resolution": "512,768", "train_batch_size": 2, "flip_aug": True, "dataset_repeats": 99,
               "caption_extension": ".txt"}
    problems = []
    (spec,) = dataset_specs_from_dirs(options, problems=problems)
    common = {"flip_aug": True, "caption_extension": ".txt"}
    assert spec.subsets == (
        SubsetSpec(image_dir=str(tmp_path / "train" / "10_sks dog"), num_repeats=10, class_tokens="sks dog", **common),
        SubsetSpec(image_dir=str(tmp_path / "train" / "5_cat_girl"), num_repeats=5, class_tokens="cat_girl", **common),
        SubsetSpec(image_dir=str(tmp_path / "reg" / "1_dog"), num_repeats=1, class_tokens="dog", is_reg=True,
                   **common),
    )
    assert (spec.resolution, spec.batch_size, spec.is_fine_tuning) == ((512, 768), 2, False)
    assert problems == []


def test_folders_without_a_repeats_prefix_are_ignored_with_a_warning(tmp_path):
    make_image_folder(tmp_path / "train", repeats=10, class_tokens="sks dog", count=1)
    (tmp_path / "train" / "dog").mkdir()
    (tmp_path / "train" / "0_cat").mkdir()
    problems = []
    (spec,) = dataset_specs_from_dirs({"train_data_dir": str(tmp_path / "train")}, problems=problems)
    assert [Path(s.image_dir).name for s in spec.subsets] == ["10_sks dog"]
    assert problems == ["--train_data_dir: skipped folder '0_cat': repeats 0 is less than 1",
                        "--train_data_dir: ignored folder 'dog': its name has no '<repeats>_' prefix"]


def test_no_qualifying_folder_explains_the_naming_convention(tmp_path):
    for name in ("dog", "cat", "0_bird"):
        (tmp_path / "train" / name).mkdir(parents=True)
    with pytest.raises(UserError) as info:
        dataset_specs_from_dirs({"train_data_dir": str(tmp_path / "train")})
    assert str(info.value) == (f"--train_data_dir '{tmp_path / 'train'}' has no image folders: name image folders "
                               "'<repeats>_<class tokens>', e.g. '10_sks dog'; found: '0_bird' (repeats 0), 'cat', "
                               "'dog'")


def test_images_directly_in_train_data_dir_are_pointed_out(tmp_path):
    folder = make_image_folder(tmp_path, repeats=1, class_tokens="x", count=2)
    with pytest.raises(UserError) as info:
        dataset_specs_from_dirs({"train_data_dir": str(folder)})
    assert str(info.value).endswith("found: no subfolders (2 images directly inside, which are not used: move them "
                                    "into such a folder)")


def test_reg_folder_naming_is_checked_too(tmp_path):
    make_image_folder(tmp_path / "train", count=1)
    (tmp_path / "reg" / "dogs").mkdir(parents=True)
    with pytest.raises(UserError, match="--reg_data_dir .* found: 'dogs'$"):
        dataset_specs_from_dirs({"train_data_dir": str(tmp_path / "train"), "reg_data_dir": str(tmp_path / "reg")})


@pytest.mark.parametrize("options, message", [
    ({}, "no training images: pass --train_data_dir (a folder of '<repeats>_<class tokens>' image folders), --in_json "
         "with a metadata file, or --dataset_config"),
    ({"train_data_dir": "/no/such/dir"}, "--train_data_dir '/no/such/dir' does not exist"),
])
def test_missing_train_data(options, message):
    with pytest.raises(UserError) as info:
        dataset_specs_from_dirs(options)
    assert str(info.value) == message


def test_in_json_is_one_fine_tuning_subset(tmp_path):
    problems = []
    (spec,) = dataset_specs_from_dirs({"in_json": "meta.json", "train_data_dir": "imgs", "reg_data_dir": "reg",
                                       "dataset_repeats": 4, "resolution": 768, "keep_tokens": 1},
                                      problems=problems)
    assert spec == DatasetSpec(subsets=(SubsetSpec(image_dir="imgs", metadata_file="meta.json", num_repeats=4,
                                                   keep_tokens=1),), resolution=(768, 768))
    assert spec.is_fine_tuning
    assert problems == ["--reg_data_dir is ignored with --in_json: fine-tuning has no regularisation images"]
