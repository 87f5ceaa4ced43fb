#!/usr/bin/env python
"""Merge LoRA/LyCORIS networks like sd-scripts' merge_lora.py / sdxl_merge_lora.py: into a base model (--sd_model),
or LoRAs into one LoRA. SD 1.x/2.x and SDXL alike: the family comes from the model file and the networks' names.

With --sd_model every file (LoRA, LoCon, LoHa, LoKr) is added as ratio·ΔW into the text encoder(s) and UNet, in
order, and the model is written as a single file or a diffusers folder by the form of --save_to. Without it,
LoRA/LoCon files are combined into one LoRA: by sd-scripts' rule (same rank per module, an approximation when inputs
differ), or with --concat exactly (rank = sum of the input ranks). --lbws weights each file's modules by block, as
sd-scripts does (26/17 values for SD 1.x/2.x, 20/12 for SDXL).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/merge_lora.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from library.errors import UserError, exit_on_user_error  # noqa: E402
from tools.merge_models import check_output, make_parser  # noqa: E402
from tools.resize_lora import NETWORK_SUFFIXES  # noqa: E402

MODEL_FILE_SUFFIXES = (".safetensors", ".ckpt")
PRECISION_CHOICES = ("float", "fp16", "bf16")


def add_common_arguments(parser: argparse.ArgumentParser, *, no_metadata_note: str = "") -> None:
    """The flags merge_lora and svd_merge_lora share (sd-scripts spells them the same in both)."""
    parser.add_argument("--models", nargs="+", default=None, metavar="FILE", help="network files to merge, in order")
    parser.add_argument("--ratios", nargs="+", type=float, default=None, metavar="RATIO",
                        help="one multiplier per file (default: 1 each)")
    parser.add_argument("--save_to", default=None, help="output path")
    parser.add_argument("--precision", choices=PRECISION_CHOICES, default="float",
                        help="precision the inputs are merged in (default: float; --save_precision defaults to it)")
    parser.add_argument("--lbws", nargs="+", default=None, metavar="JSON",
                        help="block weights per file, as sd-scripts: a JSON list each, e.g. '[1,0,0,1,1,1,1,1,1,1,1,1]'; "
                             "26 or 17 values for SD 1.x/2.x blocks, 20 or 12 for SDXL's (the first, BASE, weights the "
                             "text encoders)")
    parser.add_argument("--device", default="cpu", help="device for the maths (cuda to use a GPU)")
    parser.add_argument("--no_metadata", action="store_true", default=False,
                        help="write only the minimal ss_* metadata of a LoRA output (network module/dim/alpha/args, "
                             "ss_v2, ss_base_model_version; modelspec keys if any): no ss_training_comment"
                             + no_metadata_note)


def check_common(args) -> tuple[list[Path], list[float]]:
    """Input paths and one ratio each; fails before any slow reading."""
    if not args.models or not args.save_to:
        raise UserError("--models and --save_to are required; e.g. --models a.safetensors b.safetensors "
                        "--ratios 1 0.5 --save_to merged.safetensors")
    ratios = args.ratios if args.ratios is not None else [1.0] * len(args.models)
    if len(ratios) != len(args.models):
        raise UserError(f"--ratios: got {len(ratios)} values for {len(args.models)} --models; give one ratio per file")
    inputs = [Path(m) for m in args.models]
    for path in inputs:
        if not path.is_file():
            raise UserError(f"--models {path}: no such file; check the path")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: no CUDA device here; use --device cpu")
    return inputs, ratios


# ---------------------------------------------------------------- block weights (--lbws)

LBW_BLOCKS = ("BASE", *(f"IN{i:02d}" for i in range(12)), "MID", *(f"OUT{i:02d}" for i in range(12)))
# sd-scripts' svd_merge_lora.py presets: the number of values of a --lbws list -> (the blocks they weight, in
# order; whether they are SDXL's). SDXL has IN00-08 and OUT00-08 only, and attention in IN04/05/07/08, OUT00-05.
LBW_PRESETS = {
    26: (LBW_BLOCKS, False),
    17: (("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID",
          *(f"OUT{i:02d}" for i in range(3, 12))), False),
    20: (("BASE", *(f"IN{i:02d}" for i in range(9)), "MID", *(f"OUT{i:02d}" for i in range(9))), True),
    12: (("BASE", "IN04", "IN05", "IN07", "IN08", "MID", *(f"OUT{i:02d}" for i in range(6))), True),
}
_SD_BLOCK = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")


def lbw_block(name: str, sdxl: bool) -> int:
    """sd-scripts' get_lbw_block_index: a module's index in LBW_BLOCKS (0 = text encoders), -1 if none."""
    if "text_model_encoder_" in name:
        return 0
    body = name.removeprefix("lora_unet_")
    if sdxl:  # SGM names: input_blocks.N -> IN(N), middle_block -> MID, output_blocks.N -> OUT(N)
        first = body.split("_")
        if body.startswith(("time_embed_", "label_emb_")):
            return 1
        if body.startswith("input_blocks_"):
            return 1 + int(first[2])
        if body.startswith("middle_block_"):
            return 13
        if body.startswith("output_blocks_"):
            return 14 + int(first[2])
        return 23 if body.startswith("out_") else -1
    match = _SD_BLOCK.search(name)
    if match is None:
        return 13 if "mid_block_" in name else -1
    direction, i, kind, j = match.group(1), int(match.group(2)), match.group(3), int(match.group(4))
    if direction == "down":
        return 1 + (3 * i + j + 1 if kind in ("resnets", "attentions") else 3 * (i + 1))
    return 14 + (3 * i + j if kind in ("resnets", "attentions") else 3 * i + 2)


class BlockWeights:
    """One file's --lbws list: the weight of each module, by the block its name belongs to (1 for other blocks)."""

    def __init__(self, text: str, sdxl: bool, blocks: tuple[str, ...], values: list[float]):
        self.text, self.sdxl = text, sdxl
        self.by_index = {LBW_BLOCKS.index(block): float(v) for block, v in zip(blocks, values)}

    def __call__(self, name: str) -> float:
        return self.by_index.get(lbw_block(name, self.sdxl), 1.0)

    def check(self, path: Path, names) -> None:
        """Refuse block weights of the other family than the file's (they would silently weight nothing)."""
        from networks.lora_layouts import is_sdxl_kohya

        if is_sdxl_kohya(names) != self.sdxl:
            ours, theirs = ("SDXL", "SD 1.x/2.x") if self.sdxl else ("SD 1.x/2.x", "SDXL")
            fit = "26 or 17" if self.sdxl else "20 or 12"
            raise UserError(f"--lbws {self.text}: {len(self.by_index)} values weight {ours} blocks, but {path} is an "
                            f"{theirs} network; give it {fit} values")


def block_weights(args, count: int) -> list[BlockWeights | None]:
    """One BlockWeights per input (None each without --lbws), checked as sd-scripts' format_lbws checks them."""
    if not args.lbws:
        return [None] * count
    if len(args.lbws) != count:
        raise UserError(f"--lbws: got {len(args.lbws)} lists for {count} --models; give one per file")
    parsed = []
    for text in args.lbws:
        try:
            values = json.loads(text)
        except ValueError:
            values = None
        if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                   for v in values):
            raise UserError(f"--lbws {text}: not a JSON list of numbers; e.g. '[1,1,1,1,1,1,1,1,1,1,1,1]'")
        if len(values) not in LBW_PRESETS:
            raise UserError(f"--lbws {text}: {len(values)} values; give {', '.join(map(str, LBW_PRESETS))} "
                            "(26/17: SD 1.x/2.x blocks, 20/12: SDXL's)")
        parsed.append((text, values))
    if len({len(values) for _, values in parsed}) != 1:
        raise UserError("--lbws: the lists have different lengths; give every file the same number of values")
    return [BlockWeights(text, LBW_PRESETS[len(values)][1], LBW_PRESETS[len(values)][0], values)
            for text, values in parsed]


def check_network_output(dst: Path, inputs: list[Path]) -> None:
    """A network output must have a network file's extension and must not replace one of its inputs."""
    if dst.suffix.lower() not in NETWORK_SUFFIXES:
        raise UserError(f"--save_to {dst}: a network is written as {', '.join(NETWORK_SUFFIXES)}; change the extension")
    _refuse_input(dst, inputs)


def _refuse_input(dst: Path, inputs: list[Path]) -> None:
    for src in inputs:
        if dst.exists() and src.exists() and dst.resolve() == src.resolve():
            raise UserError(f"--save_to {dst}: is also an input; refusing to overwrite it, choose another output path")


def check_model_output(dst: Path, inputs: list[Path]) -> None:
    """A single file (.safetensors/.ckpt) or a diffusers folder; never an input, never someone else's file/folder."""
    if dst.suffix.lower() in MODEL_FILE_SUFFIXES:
        return check_output(dst, inputs)
    if dst.suffix.lower() in (".pt", ".pth", ".bin"):
        raise UserError(f"--save_to {dst}: write the merged model as .safetensors or .ckpt, or a folder for diffusers")
    _refuse_input(dst, inputs)
    # save_diffusers would refuse this too, but only after the whole merge.
    if dst.exists() and (not dst.is_dir() or (any(dst.iterdir()) and not (dst / "model_index.json").is_file())):
        raise UserError(f"--save_to {dst}: exists and is not a diffusers model folder; refusing to overwrite it, "
                        "choose another path")


def merge_dtypes(args) -> tuple[torch.dtype, torch.dtype]:
    """(merge dtype, save dtype): sd-scripts saves in the merge precision unless --save_precision says otherwise."""
    from library.models.saving import save_dtype

    merge = save_dtype(args.precision)
    return merge, save_dtype(args.save_precision, merge)


# ---------------------------------------------------------------- into a model

def merge_file_into(parts, path: Path, ratio: float, device: str, weights_of: BlockWeights | None = None) -> str:
    """Add ratio·ΔW (times each module's block weight) of one network file into parts' text encoders and UNet;
    a one-line summary."""
    from networks.files import describe_network_file, is_bundle_key, read_network_file
    from networks.network import network_from_weights

    weights, _ = read_network_file(path)
    info = describe_network_file(weights, source=str(path))
    network = network_from_weights(ratio, path, parts.network_text_encoder, parts.unet, weights_sd=weights,
                                   for_inference=True)
    network.to(device)
    network.load_state_dict_flexible(weights, source=str(path))  # refuses tensors it cannot merge as meant
    if weights_of is not None:
        weights_of.check(path, info.dims)
        for module in network.text_encoder_loras + network.unet_loras:
            module.multiplier = ratio * weights_of(module.lora_name)
    network.merge_to(parts.network_text_encoder, parts.unet)
    te, unet = len(network.text_encoder_loras), len(network.unet_loras)
    bundled = sorted({k.split(".")[1] for k in weights if is_bundle_key(k)})
    note = (f"; its bundled embeddings ({', '.join(bundled)}) are new words, not weights: a checkpoint cannot hold "
            f"them, use {path.stem}-embeddings/ (or the network file) with the merged model") if bundled else ""
    return (f"merged {path.name} ({info.label}) at ratio {ratio:g}: {te + unet} modules ({te} text encoder, "
            f"{unet} UNet){note}")


def merge_into_model(args, inputs: list[Path], ratios: list[float]) -> Path:
    from library.console import quiet_libraries
    from library.models.loading import load_components
    from library.models.saving import save_model, save_single_file

    quiet_libraries()  # the model loaders' imports log at info level
    dst = Path(args.save_to)
    check_model_output(dst, inputs + [Path(args.sd_model)])
    merge_dtype, _ = merge_dtypes(args)
    parts = load_components(args.sd_model, options=args, dtype=merge_dtype)
    for module in (*parts.text_encoders, parts.unet):
        module.to(args.device)
    with torch.no_grad():
        for path, ratio, weights_of in zip(inputs, ratios, block_weights(args, len(inputs))):
            print(merge_file_into(parts, path, ratio, args.device, weights_of))
    for module in (*parts.text_encoders, parts.unet):
        module.to("cpu")
    precision = args.save_precision or args.precision
    if dst.suffix.lower() == ".safetensors":
        # sd-scripts' merge scripts name the merged models in the checkpoint's modelspec.
        merged = merged_from([Path(args.sd_model), *inputs])
        return save_single_file(parts, dst, precision=precision, metadata={"modelspec.merged_from": merged})
    return save_model(parts, dst, precision=precision)


# ---------------------------------------------------------------- LoRAs into one LoRA

def read_lora_modules(path: Path, dtype: torch.dtype) -> tuple[dict[str, dict], dict[str, str]]:
    """name -> {"up", "down", "alpha"} of a LoRA/LoCon file, in `dtype`; LoHa/LoKr are refused."""
    from networks.files import describe_network_file, read_network_file

    weights, metadata = read_network_file(path)
    info = describe_network_file(weights, source=str(path))
    if info.algorithm != "lora":
        raise UserError(f"{path}: a {info.algorithm} network; merging networks into one supports LoRA/LoCon only, "
                        "merge it into a checkpoint instead (--sd_model BASE)")
    info.refuse_without_model(path, "merging networks into one", "merge it into a checkpoint instead (--sd_model BASE)")
    modules = {}
    for name, rank in info.dims.items():
        up = weights.get(f"{name}.lora_up.weight")
        if up is None:
            raise UserError(f"{path}: {name} has lora_down but no lora_up tensor; the file is damaged")
        alpha = info.alphas[name] or float(rank)  # alpha 0 means "no scaling", as the modules read it
        modules[name] = {"up": up.to(dtype), "down": weights[f"{name}.lora_down.weight"].to(dtype), "alpha": alpha}
    return modules, dict(metadata)


def _like(tensor: torch.Tensor, ref: torch.Tensor, axis: int, where: str) -> torch.Tensor:
    """`tensor` in ref's form (2-D vs 1×1 4-D, as SD 2.x files differ), only the rank axis may differ."""
    shape = list(ref.shape)
    shape[axis] = tensor.shape[axis]
    if tensor.numel() != math.prod(shape):
        raise UserError(f"{where}: shape {tuple(tensor.shape)} does not fit {tuple(ref.shape)} of the first file; "
                        "the LoRAs are for different base models (SD 1.x vs 2.x?)")
    return tensor.reshape(shape)


def sum_like_sd_scripts(loaded: list[tuple[Path, dict]], ratios: list[float],
                        lbws: list[BlockWeights | None] | None = None) -> dict[str, torch.Tensor]:
    """sd-scripts' merge_lora_models without --concat: alpha is the first file's (per module), and each file's
    factors are added as up·|s| and down·s with s = sqrt(alpha / base alpha)·ratio. The result's ΔW is
    (Σ|s_i|·up_i)(Σ s_j·down_j)·alpha/rank: cross terms included, and a lone file at ratio r comes out at r·|r|, so
    this is not Σ ratio_i·ΔW_i (use --concat or svd_merge_lora for that); it is what sd-scripts users get. A block
    weight w multiplies both up and down, as in sd-scripts, so it weights ΔW by w²."""
    merged: dict[str, dict] = {}
    for (path, modules), ratio, weights_of in zip(loaded, ratios, lbws or [None] * len(loaded)):
        for name, m in modules.items():
            base = merged.setdefault(name, {"alpha": m["alpha"], "source": path})
            scale = math.sqrt(m["alpha"] / base["alpha"]) * ratio
            w = weights_of(name) if weights_of is not None else 1.0
            up, down = m["up"] * (abs(scale) * w), m["down"] * (scale * w)
            if "up" not in base:
                base["up"], base["down"] = up, down
                continue
            if down.shape[0] != base["down"].shape[0]:
                raise UserError(f"{path}: {name} has rank {down.shape[0]} but {base['down'].shape[0]} in "
                                f"{base['source']}; without --concat every LoRA needs the same rank per module, "
                                "add --concat or use tools/svd_merge_lora.py")
            base["up"] = base["up"] + _like(up, base["up"], 1, f"{path}: {name}")
            base["down"] = base["down"] + _like(down, base["down"], 0, f"{path}: {name}")
    return _as_state_dict(merged)


def concat_exact(loaded: list[tuple[Path, dict]], ratios: list[float],
                 lbws: list[BlockWeights | None] | None = None) -> dict[str, torch.Tensor]:
    """--concat: stack the factors along the rank axis. sd-scripts keeps the first alpha (so the scale changes with
    the new rank); here alpha = the new rank (scale 1) and each file's ratio·alpha/rank is folded into its `up`
    columns, so the merged ΔW is exactly Σ ratio_i·w_i·ΔW_i (w_i: the module's --lbws block weight, once)."""
    pieces: dict[str, dict] = {}
    for (path, modules), ratio, weights_of in zip(loaded, ratios, lbws or [None] * len(loaded)):
        for name, m in modules.items():
            scale = ratio * m["alpha"] / m["down"].shape[0] * (weights_of(name) if weights_of is not None else 1.0)
            entry = pieces.setdefault(name, {"up": [], "down": []})
            up, down = m["up"] * scale, m["down"]
            if entry["up"]:
                up = _like(up, entry["up"][0], 1, f"{path}: {name}")
                down = _like(down, entry["down"][0], 0, f"{path}: {name}")
            entry["up"].append(up)
            entry["down"].append(down)
    merged = {}
    for name, entry in pieces.items():
        down = torch.cat(entry["down"], dim=0)
        merged[name] = {"up": torch.cat(entry["up"], dim=1), "down": down, "alpha": float(down.shape[0])}
    return _as_state_dict(merged)


def shuffle_ranks(weights: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """--shuffle: sd-scripts permutes each merged module's rank axis (down rows and up columns by the same
    permutation), which leaves up·down, and so ΔW, unchanged; here the permutations are seeded (reproducible)."""
    generator = torch.Generator().manual_seed(seed)
    out = dict(weights)
    for key in sorted(k for k in weights if k.endswith(".lora_down.weight")):
        name = key.removesuffix(".lora_down.weight")
        perm = torch.randperm(weights[key].shape[0], generator=generator)
        out[key] = weights[key][perm]
        out[f"{name}.lora_up.weight"] = weights[f"{name}.lora_up.weight"][:, perm]
    return out


def _as_state_dict(merged: dict[str, dict]) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in merged.items():
        out[f"{name}.lora_up.weight"] = m["up"]
        out[f"{name}.lora_down.weight"] = m["down"]
        out[f"{name}.alpha"] = torch.tensor(float(m["alpha"]))
    return out


def merged_from(paths: list[Path]) -> str:
    """sd-scripts' modelspec.merged_from: each input's modelspec.title, else its file name without extension."""
    from library.models.checkpoint_io import open_checkpoint

    titles = []
    for path in paths:
        metadata = {}
        if path.suffix.lower() == ".safetensors" and path.is_file():
            with open_checkpoint(path) as file:  # the header only
                metadata = dict(file.metadata)
        titles.append(metadata.get("modelspec.title") or path.stem)
    return ", ".join(titles)


def network_modelspec(weights: dict[str, torch.Tensor], first: dict[str, str], inputs: list[Path],
                      title: str) -> dict[str, str]:
    """The LoRA modelspec sd-scripts' merge scripts write (architecture of the inputs' family, merged_from)."""
    from library.formats.kohya_metadata import network_modelspec as modelspec
    from library.models.family import families
    from networks.files import family_of_network

    family, v_parameterization = family_of_network({k.partition(".")[0] for k in weights}, first)
    family = family or families()[0]  # sd-scripts assumes SD 1.x when neither metadata nor names tell
    return modelspec(family, v_parameterization=v_parameterization, timestamp=time.time(), title=title,
                     extra={"merged_from": merged_from(inputs)})


def network_metadata(weights: dict[str, torch.Tensor], first: dict[str, str], inputs: list[Path],
                     ratios: list[float], *, note: str = "merged", minimal: bool = False,
                     title: str | None = None) -> dict[str, str]:
    """sd-scripts' minimum LoRA metadata of the result; base model keys come from the first input (or, where it
    has none, from the family its names tell). Unless `minimal` (--no_metadata: only kohya_metadata.MINIMUM_KEYS,
    as sd-scripts writes then), the comment and, with a `title`, sd-scripts' modelspec keys are added."""
    from networks.files import family_of_network
    from tools.resize_lora import _common

    names = [k.removesuffix(".lora_down.weight") for k in weights if k.endswith(".lora_down.weight")]
    kernel = {n for n in names if weights[f"{n}.lora_down.weight"].dim() == 4
              and weights[f"{n}.lora_down.weight"].shape[2:] != (1, 1)}
    linear = [n for n in names if n not in kernel] or names
    rank = lambda n: weights[f"{n}.lora_down.weight"].shape[0]  # noqa: E731
    alpha = lambda n: float(weights[f"{n}.alpha"])  # noqa: E731
    metadata = {key: first[key] for key in ("ss_v2", "ss_base_model_version") if key in first}
    family, v_parameterization = family_of_network({k.partition(".")[0] for k in weights}, first)
    if family is not None:
        metadata = {key: str(value) for key, value in family.ss_keys(v_parameterization).items()} | metadata
    net_args = {}
    if kernel:
        net_args = {"conv_dim": _common((rank(n) for n in kernel), False),
                    "conv_alpha": _common((alpha(n) for n in kernel), False)}
    sources = ", ".join(f"{p.name} ({r:g})" for p, r in zip(inputs, ratios))
    metadata.update({"ss_network_module": "networks.lora", "ss_network_dim": _common(map(rank, linear), False),
                     "ss_network_alpha": _common(map(alpha, linear), False), "ss_network_args": json.dumps(net_args),
                     "ss_training_comment": f"{note} from {sources}"})
    if minimal:
        from library.formats.kohya_metadata import minimal_metadata

        return minimal_metadata(metadata)
    if title is not None:
        metadata |= network_modelspec(weights, first, inputs, title)
    return metadata


def merge_networks(args, inputs: list[Path], ratios: list[float]) -> Path:
    from networks.files import carried_bundles, save_network_file

    dst = Path(args.save_to)
    check_network_output(dst, inputs)
    merge_dtype, dtype = merge_dtypes(args)
    loaded = [(path, read_lora_modules(path, merge_dtype)) for path in inputs]
    modules = [(path, mods) for path, (mods, _) in loaded]
    lbws = block_weights(args, len(inputs))
    for (path, mods), weights_of in zip(modules, lbws):
        if weights_of is not None:
            weights_of.check(path, mods)
    with torch.no_grad():
        weights = (concat_exact if args.concat else sum_like_sd_scripts)(modules, ratios, lbws)
        if args.shuffle:
            weights = shuffle_ranks(weights)
    metadata = network_metadata(weights, loaded[0][1][1], inputs, ratios,
                                note="concatenated" if args.concat else "merged", minimal=args.no_metadata,
                                title=dst.stem)
    save_network_file({**weights, **carried_bundles(inputs)}, dst, dtype=dtype, metadata=metadata)
    downs = [w for k, w in weights.items() if k.endswith(".lora_down.weight")]
    ranks = sorted({w.shape[0] for w in downs})
    print(f"merged {len(inputs)} LoRAs into {len(downs)} modules "
          f"(rank {ranks[0] if len(ranks) == 1 else f'{ranks[0]}..{ranks[-1]}'}"
          f"{', concatenated' if args.concat else ''})")
    return dst


def _parse(argv) -> argparse.Namespace:
    parser = make_parser(__doc__)
    add_common_arguments(parser, no_metadata_note=". With --sd_model: accepted; has no effect (the merged checkpoint "
                                                  "keeps its modelspec header)")
    parser.add_argument("--sd_model", default=None, help="base model to merge into (file, diffusers folder, hub id); "
                        "without it the LoRAs are merged into one LoRA")
    parser.add_argument("--v2", action="store_true", default=False, help="insist that --sd_model is SD 2.x")
    parser.add_argument("--concat", action="store_true", default=False,
                        help="LoRA output: concatenate ranks (exact Σ ratio·ΔW; rank = sum of the input ranks)")
    parser.add_argument("--shuffle", action="store_true", default=False,
                        help="LoRA output: permute each module's rank order (down rows and up columns alike, seeded) "
                             "as sd-scripts does; the merged ΔW is unchanged. Has no effect with --sd_model")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv=None) -> Path:
    args = _parse(argv)
    inputs, ratios = check_common(args)
    if args.sd_model and args.concat:
        raise UserError("--concat applies to merging LoRAs into one LoRA; drop it when merging into --sd_model")
    dst = merge_into_model(args, inputs, ratios) if args.sd_model else merge_networks(args, inputs, ratios)
    print(f"wrote {dst}")
    return dst


if __name__ == "__main__":
    main()
