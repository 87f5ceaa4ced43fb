"""DatasetSpecs from sd-scripts' --dataset_config ([general], [[datasets]], [[datasets.subsets]]) or image folders."""

from __future__ import annotations

import json
import re
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Mapping, NamedTuple

from library.config.checks import check_numbers, check_value
from library.config.config_text import QUOTES, TOML_KEY, parse_json, parse_toml
from library.config.declarations import MOST_REPEATS, OPTIONS
from library.config.options import INPUT_PATH, Option
from library.config.suggest import did_you_mean
from library.data.specs import DatasetSpec, SubsetSpec
from library.data.subsets import IMAGE_EXTENSIONS
from library.errors import UserError

# The resolved options (command line / --config_file) this module reads; a value of None means "not given".
DATASET_OPTION_NAMES = (
    "train_data_dir", "reg_data_dir", "in_json", "dataset_repeats", "resolution", "train_batch_size",
    "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale",
    "caption_extension", "shuffle_caption", "keep_tokens", "keep_tokens_separator", "caption_separator",
    "secondary_separator", "enable_wildcard", "caption_prefix", "caption_suffix", "caption_dropout_rate",
    "caption_dropout_every_n_epochs", "caption_tag_dropout_rate", "token_warmup_min", "token_warmup_step",
    "color_aug", "flip_aug", "face_crop_aug_range", "random_crop", "alpha_mask", "resize_interpolation",
    "network_multiplier", "validation_seed", "validation_split",
)
_FOLDER_OPTIONS = ("train_data_dir", "reg_data_dir", "in_json", "conditioning_data_dir")
# sd-scripts' ARGPARSE_OPTNAME_TO_CONFIG_OPTNAME: the two options whose config key has another name.
_OPTION_TO_KEY = {"train_batch_size": "batch_size", "dataset_repeats": "num_repeats"}

DREAMBOOTH, FINE_TUNING = "DreamBooth", "fine-tuning"

# A key's kind is also the phrase that describes it in messages.
BOOL, INT, NUMBER, STR, TABLE = "true or false", "an integer", "a number", "a string", "a table"
PAIR, RESOLUTION = "two numbers [min, max]", "an integer or [width, height]"

# sd-scripts' ConfigSanitizer schema, group by group (SUBSET_ASCENDABLE_SCHEMA, DO_…, DB_…, FT_…, DATASET_…).
_SUBSET_ANY_LEVEL = {
    "color_aug": BOOL, "face_crop_aug_range": PAIR, "flip_aug": BOOL, "num_repeats": INT, "random_crop": BOOL,
    "shuffle_caption": BOOL, "keep_tokens": INT, "keep_tokens_separator": STR, "secondary_separator": STR,
    "caption_separator": STR, "enable_wildcard": BOOL, "token_warmup_min": INT, "token_warmup_step": NUMBER,
    "caption_prefix": STR, "caption_suffix": STR, "custom_attributes": TABLE, "resize_interpolation": STR,
}
_DROPOUT_ANY_LEVEL = {"caption_dropout_every_n_epochs": INT, "caption_dropout_rate": NUMBER,
                      "caption_tag_dropout_rate": NUMBER}
_DREAMBOOTH_ANY_LEVEL = {"caption_extension": STR, "class_tokens": STR, "cache_info": BOOL}
# conditioning_data_dir: sd-scripts reads it in ControlNet datasets (every subset has one), which --masked_loss
# enables; here any DreamBooth subset may have one (the others train unmasked).
_DREAMBOOTH_SUBSET_ONLY = {"image_dir": STR, "is_reg": BOOL, "is_val": BOOL, "alpha_mask": BOOL,
                           "conditioning_data_dir": STR}
_FINE_TUNING_SUBSET_ONLY = {"metadata_file": STR, "image_dir": STR, "is_val": BOOL, "alpha_mask": BOOL}
_DATASET_LEVEL = {
    "batch_size": INT, "bucket_no_upscale": BOOL, "bucket_reso_steps": INT, "enable_bucket": BOOL,
    "max_bucket_reso": INT, "min_bucket_reso": INT, "validation_seed": INT, "validation_split": NUMBER,
    "resolution": RESOLUTION, "network_multiplier": NUMBER, "resize_interpolation": STR,
}
_ALL_KEYS = {**_SUBSET_ANY_LEVEL, **_DROPOUT_ANY_LEVEL, **_DREAMBOOTH_ANY_LEVEL, **_DREAMBOOTH_SUBSET_ONLY,
             **_FINE_TUNING_SUBSET_ONLY, **_DATASET_LEVEL}
# SubsetSpec fields a fine-tuning subset never inherits: sd-scripts' FineTuningSubsetParams has no such field.
_DREAMBOOTH_ONLY_FIELDS = {"is_reg", "class_tokens", "caption_extension", "cache_info"}

_NOT_YET = {"skip_image_resolution": "skip_image_resolution (newer sd-scripts)"}
_NOT_DATASET_KEYS = {
    "train_batch_size": "the dataset config calls it batch_size",
    "dataset_repeats": "the dataset config calls it num_repeats",
    "train_data_dir": "give each image folder as image_dir of a [[datasets.subsets]]",
    "reg_data_dir": "give each folder as image_dir of a [[datasets.subsets]] with is_reg = true",
    "in_json": "the dataset config calls it metadata_file (in a [[datasets.subsets]])",
    **{name: f"it is a training option: pass --{name} or put it in --config_file"
       for name in ("prior_loss_weight", "max_token_length", "debug_dataset")},
}
# Each key's declaration, for its range and text checks: the option of the same name (or its config name), and
# declarations of the keys only a dataset config has.
_DECLARED = {o.name: o for o in OPTIONS}
_KEY_OPTIONS: dict[str, Option] = {
    **{_OPTION_TO_KEY.get(name, name): _DECLARED[name] for name in DATASET_OPTION_NAMES if name in _DECLARED},
    "caption_extension": _DECLARED["caption_extension"],
    "num_repeats": replace(_DECLARED["dataset_repeats"], name="num_repeats",
                           help="times each image of the subset repeats per epoch"),
    "network_multiplier": Option("network_multiplier", float, 1.0, "strength of the network for this dataset",
                                 "dataset"),
    "image_dir": Option("image_dir", str, None, "folder of the subset's images", "dataset", path=INPUT_PATH),
    "metadata_file": Option("metadata_file", str, None, "the subset's metadata .json", "dataset", path=INPUT_PATH),
    "class_tokens": Option("class_tokens", str, None, "caption of images without a caption file", "dataset"),
}

# sd-scripts' validate_interpolation_fn.
_INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")


class DatasetSupport(NamedTuple):
    """What the training script accepts, as sd-scripts' ConfigSanitizer flags (train_db: no fine-tuning; TI: no
    caption dropout)."""

    dreambooth: bool = True
    fine_tuning: bool = True
    caption_dropout: bool = True


def load_dataset_config(path: str | Path, options: Mapping[str, Any], *, support: DatasetSupport = DatasetSupport(),
                        problems: list[str] | None = None) -> list[DatasetSpec]:
    """The datasets of a --dataset_config file (.toml or .json), every value resolved subset → dataset → [general]
    → `options` → default. Warnings (options the file overrides, duplicate subsets) are appended to `problems`."""
    problems = [] if problems is None else problems
    file = Path(path)
    data, source = _read_config(file)
    general_table, dataset_tables = _top_level(data, source)
    general = _check_table(general_table, ("general",), "general", None, source, support)
    cli = _option_values(options)
    problems.extend(f"--{name} is ignored because --dataset_config is given (as in sd-scripts); list its folder in "
                    f"{file} instead" for name in _FOLDER_OPTIONS if options.get(name) is not None)
    specs = []
    for index, table in enumerate(dataset_tables):
        kind = _dataset_kind(table, index, source, support)
        dataset = _check_table(table, ("datasets", index), "dataset", kind, source, support)
        subsets = [_check_subset(subset, ("datasets", index, "subsets", number), kind, source, support)
                   for number, subset in enumerate(table["subsets"])]
        specs.append(_resolve_dataset(kind, subsets, (dataset, general, cli), problems))
    return specs


def dataset_specs_from_dirs(options: Mapping[str, Any], *, problems: list[str] | None = None) -> list[DatasetSpec]:
    """The one dataset sd-scripts builds without --dataset_config: `<repeats>_<class tokens>` folders under
    --train_data_dir / --reg_data_dir, or --in_json (fine-tuning, images in --train_data_dir). Warnings (ignored
    folders) are appended to `problems`."""
    problems = [] if problems is None else problems
    cli = _option_values(options)
    train_dir, reg_dir, in_json = (options.get(name) for name in ("train_data_dir", "reg_data_dir", "in_json"))
    if in_json is not None:
        if reg_dir is not None:
            problems.append("--reg_data_dir is ignored with --in_json: fine-tuning has no regularisation images")
        if options.get("conditioning_data_dir") is not None:
            raise UserError("--conditioning_data_dir cannot be used with --in_json (fine-tuning metadata); use image "
                            "folders (--train_data_dir '<repeats>_<name>' folders, or a --dataset_config subset)")
        subset = {"metadata_file": str(in_json), "image_dir": None if train_dir is None else str(train_dir)}
        return [_resolve_dataset(FINE_TUNING, [subset], ({}, {}, cli), problems)]
    if train_dir is None:
        raise UserError("no training images: pass --train_data_dir (a folder of '<repeats>_<class tokens>' image "
                        "folders), --in_json with a metadata file, or --dataset_config")
    subsets = _folder_subsets(Path(train_dir), "train_data_dir", False, problems)
    if options.get("conditioning_data_dir") is not None:
        # Our reading (sd-scripts' train_network ignores the option): the masks of every training folder's images,
        # found by file name; regularisation images train unmasked.
        for subset in subsets:
            subset["conditioning_data_dir"] = str(options["conditioning_data_dir"])
    if reg_dir is not None:
        subsets += _folder_subsets(Path(reg_dir), "reg_data_dir", True, problems)
    return [_resolve_dataset(DREAMBOOTH, subsets, ({}, {}, cli), problems)]


def _folder_subsets(base: Path, option: str, is_reg: bool, problems: list[str]) -> list[dict]:
    """sd-scripts' generate_dreambooth_subsets_config_by_subdirs, sorted by name (sd-scripts keeps listing order)."""
    if not base.is_dir():
        raise UserError(f"--{option} '{base}' {'is not a folder' if base.exists() else 'does not exist'}")
    subsets, rejected = [], []
    for folder in sorted(p for p in base.iterdir() if p.is_dir()):
        prefix, _, class_tokens = folder.name.partition("_")
        try:
            repeats = int(prefix)
        except ValueError:
            rejected.append(f"'{folder.name}'")
            problems.append(f"--{option}: ignored folder '{folder.name}': its name has no '<repeats>_' prefix")
            continue
        if repeats > MOST_REPEATS:
            raise UserError(f"--{option}: folder '{folder.name}' repeats its images {repeats} times; at most "
                            f"{MOST_REPEATS} (an epoch lists every image that often): rename it with fewer repeats "
                            "and train more epochs instead")
        if repeats < 1:
            rejected.append(f"'{folder.name}' (repeats {repeats})")
            problems.append(f"--{option}: skipped folder '{folder.name}': repeats {repeats} is less than 1")
            continue
        subsets.append({"image_dir": str(folder), "num_repeats": repeats, "is_reg": is_reg,
                        "class_tokens": class_tokens})
    if not subsets:
        loose = sum(1 for p in base.iterdir() if p.is_file() and p.name.endswith(IMAGE_EXTENSIONS))
        found = ", ".join(rejected) or "no subfolders"
        if loose:
            found += f" ({loose} images directly inside, which are not used: move them into such a folder)"
        raise UserError(f"--{option} '{base}' has no image folders: name image folders '<repeats>_<class tokens>', "
                        f"e.g. '10_sks dog'; found: {found}")
    return subsets


# ---- resolution: subset → dataset → [general] → options → SubsetSpec/DatasetSpec default

def _resolve_dataset(kind: str, subsets: list[dict], levels: tuple[dict, dict, dict],
                     problems: list[str]) -> DatasetSpec:
    specs = [_resolve_subset(kind, subset, levels) for subset in subsets]
    values = {f.name: value for f in fields(DatasetSpec)
              if f.name != "subsets" and (value := _first(f.name, levels)) is not None}
    return DatasetSpec(subsets=tuple(_drop_duplicates(specs, problems)), **values)


def _resolve_subset(kind: str, subset: dict, levels: tuple[dict, dict, dict]) -> SubsetSpec:
    values = {}
    for f in fields(SubsetSpec):
        sources = (subset,) if kind == FINE_TUNING and f.name in _DREAMBOOTH_ONLY_FIELDS else (subset, *levels)
        if (value := _first(f.name, sources)) is not None:
            values[f.name] = value
    extension = values.get("caption_extension")
    if extension and not extension.startswith("."):  # sd-scripts' DreamBoothSubset adds the dot
        values["caption_extension"] = "." + extension
    return SubsetSpec(**values)


def _first(name: str, sources) -> Any:
    """sd-scripts' search_value: the first source where the key is set and not None."""
    return next((source[name] for source in sources if source.get(name) is not None), None)


def _drop_duplicates(specs: list[SubsetSpec], problems: list[str]) -> list[SubsetSpec]:
    """sd-scripts ignores a subset whose image_dir (metadata_file) an earlier used subset of the dataset has."""
    kept, seen = [], set()
    for spec in specs:
        name = spec.metadata_file if spec.is_fine_tuning else spec.image_dir
        if spec.num_repeats >= 1 and name in seen:
            problems.append(f"duplicate subset '{name}' in one dataset ignored; the first one is used "
                            "(as in sd-scripts)")
            continue
        if spec.num_repeats >= 1:
            seen.add(name)
        kept.append(spec)
    return kept


def _option_values(options: Mapping[str, Any]) -> dict[str, Any]:
    """The given dataset options under their config key names, checked like file values."""
    values = {}
    for name in DATASET_OPTION_NAMES:
        value = options.get(name)
        if value is None or name in _FOLDER_OPTIONS:
            continue
        key = _OPTION_TO_KEY.get(name, name)
        if key in ("resolution", "face_crop_aug_range"):
            value = _text_option(key, value)
        values[key] = _check_value(key, _ALL_KEYS[key], value, f"option --{name}")
    return values


def parse_size(text: str) -> list[int] | None:
    """sd-scripts' size text: "512" (a square) or "512,768" (width,height) -> [width, height]; None for another form."""
    try:
        parts = [int(part) for part in str(text).split(",")]
    except ValueError:
        return None
    if len(parts) == 1:
        parts *= 2
    return parts if len(parts) == 2 else None


def _text_option(name: str, value: Any) -> Any:
    """sd-scripts' prepare_dataset_args: --resolution "512" or "512,768", --face_crop_aug_range "2.0,4.0"."""
    if not isinstance(value, str):
        return value
    if name == "resolution":
        parts = parse_size(value)
        if parts is None:
            raise UserError(f"option --{name} must be 'size' or 'width,height' (e.g. 512 or 512,768), got '{value}'")
        return parts
    try:
        parts = [float(part) for part in value.split(",")]
    except ValueError:
        parts = []
    if len(parts) != 2 or parts[0] > parts[1]:
        raise UserError(f"option --{name} must be 'min,max' with min <= max (e.g. 2.0,4.0), got '{value}'")
    return parts


# ---- checking the file: keys per table, value types

def _allowed(level: str, kind: str | None, support: DatasetSupport) -> dict[str, str]:
    dropout = _DROPOUT_ANY_LEVEL if support.caption_dropout else {}
    if level == "general":
        dreambooth = _DREAMBOOTH_ANY_LEVEL if support.dreambooth else {}
        return {**_DATASET_LEVEL, **_SUBSET_ANY_LEVEL, **dreambooth, **dropout}
    dreambooth = _DREAMBOOTH_ANY_LEVEL if kind == DREAMBOOTH else {}
    if level == "dataset":
        return {**_DATASET_LEVEL, **_SUBSET_ANY_LEVEL, **dreambooth, **dropout}
    own = _DREAMBOOTH_SUBSET_ONLY if kind == DREAMBOOTH else _FINE_TUNING_SUBSET_ONLY
    return {**_SUBSET_ANY_LEVEL, **own, **dreambooth, **dropout}


def _check_table(table: dict, path: tuple, level: str, kind: str | None, source: _Source,
                 support: DatasetSupport) -> dict[str, Any]:
    allowed = _allowed(level, kind, support)
    checked = {}
    for key, value in table.items():
        if level == "dataset" and key == "subsets":
            continue
        if key not in allowed:
            raise UserError(f"{source.where(path, key)}: {_unknown_key(key, level, kind, allowed, support)}")
        checked[key] = _check_value(key, allowed[key], value, source.where(path, key))
    return checked


def _check_subset(table: dict, path: tuple, kind: str, source: _Source, support: DatasetSupport) -> dict[str, Any]:
    values = _check_table(table, path, "subset", kind, source, support)
    if kind == DREAMBOOTH and "image_dir" not in values:
        raise UserError(f"{source.where(path)}: image_dir is required in a DreamBooth subset; "
                        "add image_dir = 'path/to/images'")
    return values


def _unknown_key(key: str, level: str, kind: str | None, allowed: Mapping[str, str], support: DatasetSupport) -> str:
    if key in _NOT_YET:
        return f"{_NOT_YET[key]} is not supported yet; remove it"
    if key in _NOT_DATASET_KEYS:
        return f"'{key}' is not a dataset config key: {_NOT_DATASET_KEYS[key]}"
    if key in _DROPOUT_ANY_LEVEL:
        return f"'{key}': this training script has no caption dropout (as in sd-scripts); remove it"
    dreambooth_only = key in _DREAMBOOTH_ANY_LEVEL or key == "is_reg"
    if dreambooth_only and (kind == FINE_TUNING or not support.dreambooth):
        return (f"'{key}' applies to DreamBooth subsets only, and this dataset is fine-tuning (its subsets have "
                "metadata_file); remove it" if kind == FINE_TUNING else
                f"'{key}' applies to DreamBooth subsets only, which this training script does not train; remove it")
    places = [name for name, where in (("[general]", "general"), ("[[datasets]]", "dataset"),
                                       ("[[datasets.subsets]]", "subset"))
              if where != level and any(key in _allowed(where, k, support) for k in (DREAMBOOTH, FINE_TUNING))]
    if places:
        return f"'{key}' does not belong in this table; put it in {' or '.join(places)}"
    hint = did_you_mean(key, allowed)
    return f"unknown key '{key}'{hint}" + ("" if hint else "; remove it or fix its spelling")


def _check_value(key: str, kind: str, value: Any, where: str) -> Any:
    converted = _convert(kind, value)
    if converted is None:
        raise UserError(f"{where}: {key} must be {kind}, got {_show(value)}{_type_hint(kind, value)}")
    if key == "resize_interpolation" and converted not in _INTERPOLATIONS:
        raise UserError(f"{where}: resize_interpolation must be one of {', '.join(_INTERPOLATIONS)}, got "
                        f"'{converted}'{did_you_mean(converted, _INTERPOLATIONS)}")
    option = _KEY_OPTIONS.get(key)
    if option is not None:
        place = f"{where}: {key} = {_show(value)}"
        if kind in (PAIR, RESOLUTION):  # (w, h) or (min, max): each number within the option's range
            check_numbers(option, converted, place)
        elif kind in (INT, NUMBER, STR):
            check_value(option, converted, place)
    return converted


def _convert(kind: str, value: Any) -> Any:
    """The value in the type SubsetSpec/DatasetSpec hold, or None when it has the wrong type."""
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def is_number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    pair = isinstance(value, (list, tuple)) and len(value) == 2
    if kind == BOOL:
        return value if isinstance(value, bool) else None
    if kind == INT:
        return value if is_int(value) else None
    if kind == NUMBER:  # sd-scripts wants a float for some keys; 1 for 1.0 is accepted here
        return float(value) if is_number(value) else None
    if kind == STR:
        return value if isinstance(value, str) else None
    if kind == TABLE:
        return dict(value) if isinstance(value, dict) else None
    if kind == PAIR:
        return (float(value[0]), float(value[1])) if pair and all(map(is_number, value)) else None
    if is_int(value):  # RESOLUTION: a size for both sides, or (width, height)
        return value, value
    return (value[0], value[1]) if pair and all(map(is_int, value)) else None


def _show(value: Any) -> str:
    return f"'{value}'" if isinstance(value, str) else json.dumps(value, default=repr)


def _type_hint(kind: str, value: Any) -> str:
    quoted = isinstance(value, str) and kind in (INT, NUMBER, BOOL, RESOLUTION)
    if quoted and _convert(kind, _unquote(value)) is not None:
        return " (a string: remove the quotes)"
    if kind == STR and not isinstance(value, (dict, list)):
        return " (put it in quotes)"
    return ""


def _unquote(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


# ---- reading the file and naming places in it

def _read_config(file: Path) -> tuple[Any, _Source]:
    suffix = file.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise UserError(f"--dataset_config {file}: must be a .toml or .json file")
    try:
        text = file.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"--dataset_config {file}: no such file") from None
    except UnicodeDecodeError:
        raise UserError(f"--dataset_config {file}: not UTF-8 text; save it as UTF-8") from None
    except OSError as err:
        raise UserError(f"--dataset_config {file}: cannot read it ({err.strerror})") from None
    if suffix == ".json":
        return parse_json(text, file), _Source(str(file), {})
    return parse_toml(text, file), _Source(str(file), _toml_key_lines(text))


_TOML_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\[\]]+?)\s*\]")


def _toml_key_lines(text: str) -> dict[tuple, int]:
    """(table path, key or None for the header) → first line number; best effort, for messages only."""
    lines: dict[tuple, int] = {}
    table: tuple = ()
    dataset = subset = -1
    for number, line in enumerate(text.splitlines(), 1):
        header = _TOML_HEADER.match(line)
        if header:
            name = header[2].replace(" ", "")
            if header[1] == "[[" and name == "datasets":
                dataset, subset = dataset + 1, -1
                table = ("datasets", dataset)
            elif header[1] == "[[" and name == "datasets.subsets":
                subset += 1
                table = ("datasets", dataset, "subsets", subset)
            else:
                table = (name,)
            lines.setdefault((table, None), number)
        elif key := TOML_KEY.match(line):
            lines.setdefault((table, key[1].strip(QUOTES)), number)
    return lines


class _Source:
    """Names a place in the config file for messages: file, line (when found) and table."""

    def __init__(self, file: str, key_lines: dict[tuple, int]):
        self.file = file
        self.key_lines = key_lines

    def where(self, table: tuple, key: str | None = None) -> str:
        line = self.key_lines.get((table, key)) or self.key_lines.get((table, None))
        if not table and key:  # a top-level table's own header, e.g. a misspelt [genral]
            line = line or self.key_lines.get(((key,), None))
        return f"{self.file}:{line}: {_table_name(table)}" if line else f"{self.file}: {_table_name(table)}"


def _table_name(table: tuple) -> str:
    if not table:
        return "top level"
    if len(table) == 1:
        return f"[{table[0]}]"
    name = f"[[datasets]] #{table[1] + 1}"
    return name if len(table) == 2 else f"{name} > [[datasets.subsets]] #{table[3] + 1}"


def _top_level(data: Any, source: _Source) -> tuple[dict, list[dict]]:
    if not isinstance(data, dict):
        raise UserError(f"{source.file}: the config must be a table with [general] and [[datasets]]")
    for key in data:
        if key not in ("general", "datasets"):
            hint = ("; put it in [general] or [[datasets]]" if key in _ALL_KEYS
                    else did_you_mean(key, ("general", "datasets")) or "; only [general] and [[datasets]] go here")
            raise UserError(f"{source.where((), key)}: unknown key '{key}'{hint}")
    general = data.get("general", {})
    if not isinstance(general, dict):
        raise UserError(f"{source.where((), 'general')}: general must be a table: write [general] above its keys")
    datasets = data.get("datasets")
    if datasets is None or datasets == []:
        raise UserError(f"{source.file}: no [[datasets]]: add a [[datasets]] table and at least one "
                        "[[datasets.subsets]] with image_dir = 'path/to/images'")
    if not isinstance(datasets, list) or not all(isinstance(d, dict) for d in datasets):
        raise UserError(f"{source.where(('datasets',))}: datasets must be an array of tables: write [[datasets]] "
                        "with double brackets")
    return general, datasets


def _dataset_kind(table: dict, index: int, source: _Source, support: DatasetSupport) -> str:
    """DreamBooth when no subset has metadata_file, fine-tuning when all have it; sd-scripts refuses a mix."""
    where = source.where(("datasets", index))
    subsets = table.get("subsets")
    if subsets is not None and (not isinstance(subsets, list) or not all(isinstance(s, dict) for s in subsets)):
        raise UserError(f"{where}: subsets must be an array of tables: write [[datasets.subsets]] with double brackets")
    if not subsets:
        raise UserError(f"{where}: no [[datasets.subsets]]: add one below it with image_dir = 'path/to/images'")
    with_metadata = [number + 1 for number, subset in enumerate(subsets) if "metadata_file" in subset]
    if with_metadata and len(with_metadata) < len(subsets):
        without = next(n + 1 for n in range(len(subsets)) if n + 1 not in with_metadata)
        raise UserError(f"{where}: mixes DreamBooth subsets (#{without}: no metadata_file) and fine-tuning subsets "
                        f"(#{with_metadata[0]}: metadata_file); split them into two [[datasets]]")
    kind = FINE_TUNING if with_metadata else DREAMBOOTH
    if kind == FINE_TUNING and not support.fine_tuning:
        raise UserError(f"{where}: fine-tuning subsets (metadata_file) are not supported by this training script; "
                        "use image_dir subsets with caption files")
    if kind == DREAMBOOTH and not support.dreambooth:
        raise UserError(f"{source.where(('datasets', index, 'subsets', 0))}: metadata_file is required: this training "
                        "script trains fine-tuning datasets only (metadata_file = 'meta.json')")
    return kind
