#!/usr/bin/env python
"""Identify and summarise a LoRA/LyCORIS network (--verbose: per module), SD checkpoint, embedding or hypernetwork."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/check_lora_weights.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from library.console import quiet_libraries  # noqa: E402
from library.errors import UserError, exit_on_user_error  # noqa: E402
from library.models.checkpoint_io import TensorFile, open_checkpoint  # noqa: E402

BASE_KEYS = ("ss_base_model_version", "ss_v2", "modelspec.architecture")
TRAINING_KEYS = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_output_name",
                 "ss_sd_model_name", "ss_steps", "ss_epoch", "ss_max_train_steps", "ss_num_train_images",
                 "ss_learning_rate", "ss_training_comment")
# Cross-attention context width -> the base model it belongs to (CLIP ViT-L, OpenCLIP ViT-H, SDXL's two encoders).
CONTEXT_WIDTHS = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}
EMBEDDING_WIDTHS = {768: "SD 1.x", 1024: "SD 2.x"}
PEFT_MARKERS = (".lora_A.", ".lora_B.", ".lora.down.", ".lora.up.", "lora_linear_layer")


@exit_on_user_error
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("file", help=".safetensors/.pt/.ckpt file to identify")
    parser.add_argument("--verbose", action="store_true",
                        help="for a network, one line per module: shapes and mean |w| of each tensor")
    parser.add_argument("--loaders", metavar="BASE_MODEL",
                        help="also check, on this base model (a checkpoint file or diffusers folder), that diffusers, "
                             "ComfyUI and AUTOMATIC1111 would each load every module of the network (the self-test "
                             "training runs after each save)")
    args = parser.parse_args(argv)
    quiet_libraries()  # before detect/networks import diffusers, whose bitsandbytes import logs a warning
    print("\n".join(describe(Path(args.file), verbose=args.verbose)))
    if args.loaders:
        print("\n".join(loader_lines(Path(args.file), args.loaders)))


def loader_lines(path: Path, base_model: str) -> list[str]:
    """The export self-test's lines for any network file, against `base_model`'s layers."""
    from library.formats.loader_check import check_network, report_lines
    from library.models.loading import load_components
    from networks.files import describe_network_file, read_network_file

    weights, _ = read_network_file(path, check=False)
    info = describe_network_file(weights, source=str(path))
    parts = load_components(base_model)
    return report_lines(f"loaders ({parts.family.label} {base_model})", check_network(weights, parts, info.algorithm))


def describe(path: Path, *, verbose: bool = False) -> list[str]:
    """Summary lines for the file; a file of no kind this tool knows -> UserError."""
    with open_checkpoint(path) as file:  # a .safetensors header only: a multi-GB checkpoint is not read
        keys, others = list(file.meta), list(file.non_tensor_keys)
        if any(isinstance(k, int) and not isinstance(k, bool) for k in others):
            return hypernetwork_summary(path)
        if _is_network(keys):
            kind = "network"
        elif _is_embedding(file):
            kind = "embedding"
        else:
            _refuse_foreign(path, keys, others)
            return checkpoint_summary(path, file)
    # Networks and embeddings are small: they are read whole, after the header-only file is closed.
    if kind == "network":
        return network_summary(path, verbose)
    family = _multi_encoder_embedding_family(keys)
    return embedding_summary(path) if family is None else multi_encoder_embedding_summary(path, family)


def _is_network(keys: list[str]) -> bool:
    from networks.registry import signature_names

    signatures = tuple(f".{name}" for name in signature_names())
    return any(k.endswith(signatures) for k in keys)


def _is_embedding(file: TensorFile) -> bool:
    if "string_to_param" in file.non_tensor_keys or set(file.meta) == {"clip_l", "clip_g"}:
        return True
    tensors = list(file.meta.values())
    return len(tensors) == 1 and tensors[0].dim() in (1, 2) and tensors[0].is_floating_point()


def _refuse_foreign(path: Path, keys: list[str], others: list) -> None:
    from library.models.detect import foreign_kind

    if any(marker in k for k in keys for marker in PEFT_MARKERS):
        kind = ("a LoRA in the diffusers/PEFT layout (lora_A/lora_B or lora.down/lora.up names); "
                "only the kohya layout (lora_unet_…/lora_te_…) is read")
    else:
        kind = foreign_kind([*keys, *(k for k in others if isinstance(k, str))])
    if kind:
        raise UserError(f"{path}: is not a LoRA, checkpoint, embedding or hypernetwork: it is {kind}")


# ---- networks ----------------------------------------------------------------------------------------------------

def network_summary(path: Path, verbose: bool) -> list[str]:
    from networks.files import as_lora_name, describe_network_file, read_network_file

    weights, metadata = read_network_file(path, check=False)  # described, with what we do not read named below
    info = describe_network_file(weights, source=str(path))
    modules = _grouped(weights, info.dims)
    algorithm = info.label  # LoCon for a LoRA that also adapts 3×3 convolutions (conv_dim), as sd-scripts says
    unet = sum(as_lora_name(name).startswith("lora_unet_") for name in modules)
    te = sum(name.startswith("lora_te") for name in modules)
    te_counts = _text_encoder_counts(modules, te)
    from networks.files import is_unet_kernel_name

    # LoHa/LoKr factors of a 3×3 conv are 2-D like a Linear's: the layer's name tells them apart.
    conv = sorted(set(info.conv_modules) | {n for n in modules if is_unet_kernel_name(n)})
    linear = [name for name in modules if name not in conv]
    lines = [f"{path}: {algorithm} network ({info.algorithm}, kohya key layout)",
             f"  modules: {len(modules)} (UNet {unet}, {te_counts}"
             + (f", other {len(modules) - unet - te}" if len(modules) - unet - te else "")
             + f"); conv 3×3 modules: {len(conv)}"]
    if not info.module_class.ADDITIVE:  # OFT: dim counts blocks, alpha is a constraint
        lines.append(f"  blocks (dim): {_tally(info.dims.values())}; "
                     f"constraint (alpha): {_tally(info.alphas.values())}")
        linear = conv = []
    if linear:
        lines.append(f"  rank (dim): {_tally(info.dims[n] for n in linear)}; "
                     f"alpha: {_tally(info.alphas[n] for n in linear)}")
    if conv:
        lines.append(f"  conv rank (conv_dim): {_tally(info.dims[n] for n in conv)}; "
                     f"conv alpha: {_tally(info.alphas[n] for n in conv)}")
    if info.module_args:
        lines.append("  options: " + ", ".join(f"{k}={v}" for k, v in sorted(info.module_args.items())))
    lines.append(f"  dtype: {_tally(str(v.dtype).removeprefix('torch.') for v in weights.values())}")
    lines.append(f"  base model: {_base_model(metadata, modules, info.module_class)}")
    lines += _untrained_note(modules, info.module_class)
    lines += _bundle_lines(weights)
    lines += _unknown_note(weights, info)
    lines += _metadata_lines(path, metadata)
    if verbose:
        lines.append("  per module (tensor shape, mean |w|):")
        lines += [_module_line(name, modules[name], info) for name in sorted(modules)]
    return lines


def _bundle_lines(weights: dict[str, torch.Tensor]) -> list[str]:
    """Pivotal tuning's embeddings bundled into the file (bundle_emb.<name>.*), as A1111 installs them."""
    from networks.files import BUNDLE_PREFIX, is_bundle_key

    found: dict[str, list[str]] = {}
    for key, value in weights.items():
        if is_bundle_key(key):
            name, _, rest = key[len(BUNDLE_PREFIX):].partition(".")
            found.setdefault(name, []).append(f"{rest.split('.')[0]} {tuple(value.shape)}")
    return [f"  bundled embedding '{name}': {', '.join(sorted(shapes))}" for name, shapes in sorted(found.items())]


def _text_encoder_counts(modules: dict, total: int) -> str:
    """"text encoder N", or SDXL's two (lora_te1_ / lora_te2_) counted each on its own."""
    numbered = sorted({name[len("lora_te"):].partition("_")[0] for name in modules if name.startswith("lora_te")} - {""})
    if not numbered:
        return f"text encoder {total}"
    return ", ".join(f"text encoder {n} {sum(name.startswith(f'lora_te{n}_') for name in modules)}" for n in numbered)


def _grouped(weights: dict[str, torch.Tensor], names) -> dict[str, dict[str, torch.Tensor]]:
    modules: dict[str, dict[str, torch.Tensor]] = {name: {} for name in names}
    for key, value in weights.items():
        name, _, rest = key.partition(".")
        if name in modules:
            modules[name][rest] = value
    return modules


def _tally(values) -> str:
    """One value as itself; several as `value ×count` each (per-block dims, mixed dtypes)."""
    counts = Counter(_number(v) for v in values)
    if len(counts) == 1:
        return next(iter(counts))
    return ", ".join(f"{value} ×{count}" for value, count in sorted(counts.items(), key=lambda item: _order(item[0])))


def _number(value) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def _order(text: str):
    try:
        return (0, float(text), "")
    except ValueError:
        return (1, 0.0, text)


def _base_model(metadata: dict[str, str], modules: dict, module_class) -> str:
    from networks.files import family_of_network

    recorded = [f"{key}={metadata[key]}" for key in BASE_KEYS if metadata.get(key)]
    if recorded:
        return ", ".join(recorded)
    family, _ = family_of_network(modules)
    if family is not None:  # names only one family gives (SDXL's lora_te1_/lora_te2_, SGM block names)
        prefixes = "/".join(f"{t.prefix}_" for t in family.text_encoder_targets)
        sgm = " and SGM UNet names" if family.unet_targets.path_map is not None else ""
        return f"not recorded; {prefixes} text encoders{sgm}: {family.label}"
    width = _context_width(modules, module_class)
    if width is None:
        return "not recorded in the metadata"
    family = CONTEXT_WIDTHS.get(width, "no SD release (a test model?)")
    return f"not recorded; {width}-wide cross-attention context suggests {family}"


def _context_width(modules: dict, module_class) -> int | None:
    # The text-encoder width is the in-width of every attn2 to_k, where the algorithm's tensors tell it.
    for name, tensors in modules.items():
        if name.endswith("attn2_to_k"):
            width = module_class.in_width(tensors)
            if width is not None:
                return width
    return None


def _untrained_note(modules: dict, module_class) -> list[str]:
    # Every algorithm here multiplies its factors, so one all-zero factor (LoRA's up, LoHa's w2_a start at zero)
    # makes the module's ΔW zero: it changes nothing.
    names = set(module_class.WEIGHT_NAMES)
    zero = sum(any(not t.any() for k, t in ts.items() if k in names) for ts in modules.values())
    if not zero:
        return []
    return [f"  warning: {zero} of {len(modules)} modules have an all-zero weight tensor, so they change nothing "
            f"(an untrained network's up weights start at zero)"]


def _unknown_note(weights: dict[str, torch.Tensor], info) -> list[str]:
    from networks.files import unknown_tensors, what_it_is

    unknown = unknown_tensors(weights, info)
    if not unknown:
        return []
    return [f"  warning: {len(unknown)} tensors are not read by this project (e.g. {', '.join(sorted(unknown)[:3])}):"
            f" {what_it_is(unknown, info.algorithm)}; training, merging and generation refuse the file"]


def _metadata_lines(path: Path, metadata: dict[str, str]) -> list[str]:
    if not metadata:
        pickle = path.suffix.lower() != ".safetensors"
        return ["  metadata: none" + (" (a torch pickle has no header)" if pickle else "")]
    lines = [f"  metadata: {len(metadata)} keys (tools/show_metadata.py prints them all)"]
    return lines + [f"    {key}: {_short(metadata[key])}" for key in TRAINING_KEYS if key in metadata]


def _short(value: str, limit: int = 120) -> str:
    value = value.replace("\n", "\\n")
    return value if len(value) <= limit else f"{value[:limit]}... ({len(value)} chars)"


def _module_line(name: str, tensors: dict[str, torch.Tensor], info) -> str:
    """Like sd-scripts' check_lora_weights: each tensor's shape and mean |w|, after the module's dim and alpha."""
    kernel = ", conv 3×3" if name in info.conv_modules else ""
    parts = [f"{name}: dim {info.dims[name]}, alpha {info.alphas[name]:g}{kernel}"]
    for key in sorted(k for k in tensors if k != "alpha"):
        tensor = tensors[key]
        shape = "×".join(map(str, tensor.shape))
        parts.append(f"{key.removesuffix('.weight')} {shape} mean|w| {tensor.float().abs().mean().item():.4g}")
    return "    " + " | ".join(parts)


# ---- other kinds -------------------------------------------------------------------------------------------------

def checkpoint_summary(path: Path, file: TensorFile) -> list[str]:
    """From the tensor names and shapes alone: the header of a .safetensors is all that was read."""
    from library.models.family import family_of_file

    meta = file.meta
    family = family_of_file(meta)
    params = sum(t.numel() for t in meta.values())
    dtypes = _tally(str(t.dtype).removeprefix("torch.") for t in meta.values() if t.is_floating_point())
    encoders, notes = family.file_notes(meta) if family else ([], [])
    second = list(encoders)
    ema = sum(k.startswith("model_ema.") for k in meta)
    if ema:
        second.append(f"{ema} EMA tensors")
    if file.metadata.get("modelspec.architecture"):
        second.append(f"modelspec.architecture={file.metadata['modelspec.architecture']}")
    second += notes
    title = family.full_name if family else "unrecognised"
    return [f"{path}: {title} checkpoint (single file): {len(meta)} tensors, "
            f"{params / 1e6:.1f} M parameters, dtype {dtypes}",
            "  " + "; ".join(second)]


def embedding_summary(path: Path) -> list[str]:
    from library.formats.embedding_files import load_embedding

    embedding = load_embedding(path)
    count, width = embedding.vectors.shape
    layout = {"a1111": "AUTOMATIC1111", "kohya": "sd-scripts"}.get(embedding.layout, embedding.layout)
    name = f", name {embedding.name!r}" if embedding.name else ""
    family = EMBEDDING_WIDTHS.get(width, "no SD 1.x/2.x text encoder (a test model?)")
    return [f"{path}: textual-inversion embedding ({layout} layout): {count} vectors × {width} wide, "
            f"step {embedding.step}{name}",
            f"  {width}-wide vectors fit {family}"]


def _multi_encoder_embedding_family(keys: list[str]):
    """The family whose embedding files hold one tensor per text encoder under exactly these names (SDXL's
    clip_l / clip_g), else None."""
    from library.models.family import families

    for family in families():
        try:
            names = family.embedding_keys()
        except NotImplementedError:
            continue
        if len(names) > 1 and set(names) == set(keys):
            return family
    return None


def multi_encoder_embedding_summary(path: Path, family) -> list[str]:
    from library.models.checkpoint_io import read_state_dict

    tensors, _ = read_state_dict(path)
    shapes = ", ".join(f"{key} {tensors[key].shape[0]}×{tensors[key].shape[-1]}" for key in family.embedding_keys())
    counts = {tensors[key].shape[0] for key in family.embedding_keys()}
    note = "" if len(counts) == 1 else "; warning: the text encoders have different vector counts (damaged?)"
    return [f"{path}: textual-inversion embedding ({family.label} layout, one tensor per text encoder): {shapes}",
            f"  fits {family.label}{note}"]


def hypernetwork_summary(path: Path) -> list[str]:
    from networks.hypernetwork import load_hypernetwork

    network, info = load_hypernetwork(path)
    params = sum(p.numel() for p in network.parameters())
    dropout = f", dropout {list(network.dropout_structure)}" if any(network.dropout_structure) else ""
    trained_on = f", trained on {info['sd_checkpoint_name']}" if info.get("sd_checkpoint_name") else ""
    return [f"{path}: AUTOMATIC1111 hypernetwork: sizes {', '.join(map(str, network.sizes))}, layer structure "
            f"{list(network.layer_structure)}, activation {network.activation_func or 'linear'}, "
            f"layer norm {'yes' if network.add_layer_norm else 'no'}{dropout}",
            f"  step {info['step']}, name {info['name']!r}{trained_on}, {params} parameters"]


if __name__ == "__main__":
    main()
