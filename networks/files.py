"""Network files: sd-scripts/LyCORIS key layout in safetensors (or .pt), read back with algorithm and ranks detected."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from library.errors import UserError
from library.models.checkpoint_io import read_safetensors_keys, read_state_dict
from library.formats.a1111_pickle import write_pickle
from library.safe_write import atomic_file
from networks.registry import all_module_classes, file_module_classes, signature_names

# LyCORIS under transformers >= 5 names text-encoder modules without `text_model_`; the ecosystem uses it.
_TE_SPELLINGS = (("lora_te_encoder_", "lora_te_text_model_encoder_"),)


# The UNet's 3×3 convolutions: diffusers names (SD 1.x/2.x: ResNet conv1/conv2, up/down-sampler conv) and SGM names
# (SDXL: ResBlock in_layers.2/out_layers.3, Downsample op, Upsample conv). LoHa and low-rank LoKr store a conv's
# factors as 2-D matrices over in·k·k columns, so only the layer's name tells a 3×3 kernel from a Linear.
KERNEL_NAME_ENDINGS = ("_conv1", "_conv2", "_conv", "_in_layers_2", "_out_layers_3", "_op")


def is_unet_kernel_name(name: str) -> bool:
    return as_lora_name(name).startswith("lora_unet_") and name.endswith(KERNEL_NAME_ENDINGS)


def canonical_key(key: str) -> str:
    for other, ours in _TE_SPELLINGS:
        if key.startswith(other):
            return ours + key[len(other):]
    return key


@dataclass
class NetworkFileInfo:
    algorithm: str
    module_class: Any
    dims: dict[str, int]
    alphas: dict[str, float]
    conv_modules: set[str] = field(default_factory=set)
    module_args: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The algorithm's common name: LoCon for a LoRA that adapts 3×3 convolutions, as sd-scripts says; DoRA
        added for weight-decomposed files."""
        cls = self.module_class
        label = cls.CONV_LABEL if self.conv_modules and cls.CONV_LABEL else cls.LABEL
        return f"{label} (DoRA)" if self.module_args.get("dora_wd") else label

    @property
    def needs_base_weights(self) -> str | None:
        """Why the file's change to a layer depends on that layer's weight (DoRA rescales it, OFT rotates it), or
        None: tools that work on ΔW alone (resize, svd merge, merging networks into one) cannot handle it."""
        if self.module_args.get("dora_wd"):
            return "a DoRA network (dora_scale) rescales the base weights, so its change depends on the model"
        if not self.module_class.ADDITIVE:
            return f"an {self.module_class.LABEL} network changes the base weights by more than adding ΔW"
        return None

    def refuse_without_model(self, source, what: str, instead: str) -> None:
        reason = self.needs_base_weights
        if reason:
            raise UserError(f"{source}: {reason}; {what} works on ΔW alone — {instead}")


def read_network_file(path, *, check: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (text-encoder names in sd-scripts' spelling) and metadata of a network file. Files that hold no
    adapters are refused, and so (unless `check` is False: inspection) are files with tensors we do not read."""
    weights, metadata = read_state_dict(path)
    weights = {canonical_key(k): v for k, v in weights.items() if isinstance(v, torch.Tensor)}
    info = describe_network_file(weights, source=str(path))
    if check:
        refuse_unknown_tensors(weights, info, source=str(path))
    return weights, metadata


def tensor_names(module_class) -> set[str]:
    """What one adapter of `module_class` stores: its weight names and alpha (and DoRA's dora_scale where the class
    has weight decomposition)."""
    return set(module_class.WEIGHT_NAMES) | {"alpha"} | ({"dora_scale"} if module_class.DECOMPOSABLE else set())


# Textual-inversion embeddings bundled into a network file (LyCORIS' pack_bundle, AUTOMATIC1111's Lora extension):
#   bundle_emb.<name>.string_to_param.*   (n, width)   SD 1.x/2.x, A1111's .pt layout flattened
#   bundle_emb.<name>.emb_params          (n, width)   SD 1.x/2.x, sd-scripts' layout (A1111 reads it too)
#   bundle_emb.<name>.clip_l / .clip_g    (n, 768) / (n, 1280)   SDXL
# A1111 splits the key at its first two dots: <name> holds no dot; the prompt uses <name> as the embedding's word.
BUNDLE_PREFIX = "bundle_emb."


def is_bundle_key(key: str) -> bool:
    return key.startswith(BUNDLE_PREFIX)


def without_bundle(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The network's own tensors: the file's without its bundled embeddings."""
    return {k: v for k, v in weights.items() if not is_bundle_key(k)}


def bundled_embeddings(weights: dict[str, torch.Tensor], keys: tuple[str, ...], *,
                       source: str) -> dict[str, list[torch.Tensor]]:
    """name -> one (n, width) tensor per text encoder (`keys`: the family's embedding keys, ("emb_params",) or
    ("clip_l", "clip_g")), as AUTOMATIC1111 reads the bundle."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in weights.items():
        if is_bundle_key(key):
            name, _, rest = key[len(BUNDLE_PREFIX):].partition(".")
            rest = "emb_params" if rest.startswith("string_to_param.") else rest
            found.setdefault(name, {})[rest] = value
    out = {}
    for name, tensors in found.items():
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise UserError(f"{source}: bundled embedding '{name}' has {', '.join(sorted(tensors))} but this model's "
                            f"text encoders need {', '.join(keys)} (an embedding for another model family)")
        out[name] = [tensors[k] for k in keys]
    return out


def bundle_tensors(name: str, vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The bundle keys of one embedding: SD 1.x/2.x's one vector set under A1111's string_to_param.*, SDXL's
    clip_l/clip_g pair under their own names."""
    if set(vectors) == {"emb_params"}:
        return {f"{BUNDLE_PREFIX}{name}.string_to_param.*": vectors["emb_params"]}
    return {f"{BUNDLE_PREFIX}{name}.{key}": value for key, value in vectors.items()}


def carried_bundles(paths) -> dict[str, torch.Tensor]:
    """The bundled embeddings of network files a tool rewrites (resize, merge, extract): carried into its output
    unchanged, so a pivotal-tuning file keeps its embeddings; two files bundling the same name are refused."""
    out: dict[str, torch.Tensor] = {}
    owner: dict[str, Path] = {}
    for path in paths:
        weights, _ = read_network_file(path)
        for key, value in weights.items():
            if not is_bundle_key(key):
                continue
            name = key[len(BUNDLE_PREFIX):].partition(".")[0]
            if owner.setdefault(name, Path(path)) != Path(path):
                raise UserError(f"{path} and {owner[name]} both bundle an embedding named '{name}'; a network file "
                                "holds one per name; merge without one of them")
            out[key] = value
    return out


def unknown_tensors(weights: dict[str, torch.Tensor], info: NetworkFileInfo) -> list[str]:
    """Keys that no adapter of the file's algorithm reads (DoRA's dora_scale, another algorithm's modules, stray
    keys). Loading would silently drop them, so what loads would be another network than the file's."""
    names = tensor_names(info.module_class)
    weighted = {canonical_key(key).partition(".")[0] for key in weights if not key.endswith(".alpha")}
    unknown = []
    for key in without_bundle(weights):  # bundled embeddings are read on their own (bundled_embeddings)
        module, _, rest = canonical_key(key).partition(".")
        if module in info.dims and rest in names:
            continue
        if rest == "alpha" and module not in weighted:
            continue  # an alpha without weights changes nothing
        unknown.append(key)
    return unknown


def refuse_unknown_tensors(weights: dict[str, torch.Tensor], info: NetworkFileInfo, *, source: str) -> None:
    unknown = unknown_tensors(weights, info)
    if unknown:
        raise UserError(not_understood(source, unknown, len(weights), what_it_is(unknown, info.algorithm)))


def not_understood(source: str, keys: list[str], total: int, what: str) -> str:
    """The one line for a file with tensors we cannot load as they are meant: how many, which, what it is."""
    examples = ", ".join(_examples(keys))
    return (f"{source}: {len(keys)} of its {total} tensors are not understood (e.g. {examples}): {what}; "
            "nothing was loaded")


def _examples(keys: list[str], count: int = 3) -> list[str]:
    # Weights before alphas, one key per module first, so the examples name as many modules as they can.
    ordered = sorted(keys, key=lambda key: (key.endswith(".alpha"), key))
    modules: dict[str, str] = {}
    for key in ordered:
        modules.setdefault(key.partition(".")[0], key)
    chosen = list(modules.values())[:count]
    return chosen + [key for key in ordered if key not in chosen][:count - len(chosen)]


# Tensor names of adapters we do not implement -> what a file holding them is.
_FOREIGN_TENSORS = (
    (("dora_scale",), "DoRA magnitudes (dora_scale) on a network type that has no weight decomposition here "
                      "(LoRA, LoHa and LoKr have)"),
    (("lora_mid.weight",), "a LoCon with Tucker decomposition (lora_mid, LyCORIS use_tucker/use_cp), which "
                           "networks.lora does not read: train without use_tucker"),
    (("diff", "diff_b"), "LyCORIS full/diff weights (diff), which are not supported"),
    (("w_norm", "b_norm"), "LyCORIS norm-layer weights (w_norm/b_norm, train_norm), which are not supported"),
    (("oft_blocks", "oft_diag", "oft_R"), "OFT/BOFT weights, which are not supported"),
    (("on_input", "weight"), "(IA)³ or full-weight tensors, which are not supported"),
)


def what_it_is(keys: list[str], algorithm: str) -> str:
    """A guess at what holds these keys, saying what to do about it."""
    rests = {canonical_key(k).partition(".")[2] for k in keys}
    ours = {name for cls in all_module_classes() for name in cls.WEIGHT_NAMES}
    for names, text in _FOREIGN_TENSORS:
        if rests & set(names) - ours:  # a kind registered since is no longer foreign
            return text
    if any(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys):
        return "a LoRA in the diffusers/PEFT layout: convert it with tools/convert_lora.py --to kohya first"
    for cls in file_module_classes():
        if cls.ALGORITHM != algorithm and rests & set(cls.WEIGHT_NAMES):
            return (f"it mixes {cls.ALGORITHM} modules into a {algorithm} network; one algorithm per file is read "
                    "(merge them into the model one file at a time)")
    return "tensors this project does not read (a file of another tool or adapter type?)"


# Module-name prefixes by model family in sd-scripts' layout -> what the file is.
SDXL_TEXT_ENCODER_PREFIXES = ("lora_te1_", "lora_te2_")
LDM_UNET_PREFIXES = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")
SD_PREFIXES = ("lora_te_", "lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_")


def other_model_hint(module_names: list[str]) -> str:
    """Which model family the modules' names belong to, saying what to do about it (the model at hand has none of
    them; it may be of the same family at another size, so the hint names the family, not the model)."""
    module_names = [as_lora_name(name) for name in module_names]
    if any(name.startswith(SDXL_TEXT_ENCODER_PREFIXES) for name in module_names):
        return ("an SDXL network (lora_te1_/lora_te2_: two text encoders): use it with the SDXL model it was "
                "trained for")
    if any(name.startswith(LDM_UNET_PREFIXES) for name in module_names):
        return ("its UNet modules use the original (LDM/SGM) names input_blocks/middle_block/output_blocks, as SDXL "
                "networks do (SD 1.x/2.x networks name them down_blocks/mid_block/up_blocks): use it with the SDXL "
                "model it was trained for")
    if any(name.startswith(SD_PREFIXES) for name in module_names):
        return ("an SD 1.x/2.x network (lora_te_ text encoder, down_blocks/up_blocks UNet names): use it with the "
                "SD 1.x/2.x model it was trained for (SD 1.x vs 2.x?), not an SDXL model")
    return "is it for another base model (SD 1.x vs 2.x, SDXL) or a different text encoder? use it with that model"


def family_of_network(module_names, metadata: dict[str, str] | None = None):
    """(model family, v-parameterization) a network file is for: from its ss_base_model_version, else from its
    module names (lora_te1_/lora_te2_ text encoders, SGM UNet names: SDXL); (None, False) when neither tells
    (SD 1.x and 2.x networks share their names)."""
    from library.models.family import families

    version = (metadata or {}).get("ss_base_model_version")
    for family in families():
        for v_parameterization in (False, True):
            if version and family.base_model_version(v_parameterization) == version:
                return family, v_parameterization
    names = [as_lora_name(name) for name in module_names]
    fitting = [family for family in families() if names and _names_fit(family, names)]
    return (fitting[0], False) if len(fitting) == 1 else (None, False)


def _names_fit(family, names: list[str]) -> bool:
    """Whether every module name has one of the family's prefixes and its style of UNet block names."""
    text = tuple(f"{targets.prefix}_" for targets in family.text_encoder_targets)
    unet = f"{family.unet_targets.prefix}_"
    sgm = family.unet_targets.path_map is not None  # the family names UNet blocks input_blocks/... (SGM)
    for name in names:
        if name.startswith(unet):
            if name.startswith(LDM_UNET_PREFIXES) != sgm and name.startswith(LDM_UNET_PREFIXES + SD_PREFIXES[1:]):
                return False
        elif not name.startswith(text):
            return False
    return True


def describe_network_file(weights: dict[str, torch.Tensor], *, source: str) -> NetworkFileInfo:
    """Algorithm, per-module rank and alpha from the tensor names and shapes (`--dim_from_weights`)."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in weights.items():
        name, _, rest = canonical_key(key).partition(".")
        grouped.setdefault(name, {})[rest] = value
    for cls in file_module_classes():
        # A module is recognised by any of its signature tensors (LoKr's w1 may be one matrix or two factors).
        signatures = cls.signature_names()
        modules = {name: ws for name, ws in grouped.items() if any(s in ws for s in signatures)}
        if modules:
            dims = {name: cls.dim_from_weights(ws) for name, ws in modules.items()}
            alphas = {name: float(ws["alpha"]) if "alpha" in ws else float(dims[name]) for name, ws in modules.items()}
            conv = {name for name, ws in modules.items() if cls.is_conv_kernel(ws)}
            _check_prefix(cls, modules, source)
            args = cls.module_args_from_weights(modules)
            scales = [ws["dora_scale"] for ws in modules.values() if "dora_scale" in ws]
            if cls.DECOMPOSABLE and scales:
                args["dora_wd"] = True
                # LyCORIS' default layout (out, 1, …) against A1111's (1, in, …): a file keeps one for all modules.
                if all(s.dim() >= 2 and s.shape[1] == 1 and s.shape[0] > 1 for s in scales):
                    args["wd_on_output"] = True
            return NetworkFileInfo(cls.ALGORITHM, cls, dims, alphas, conv, args)
    sample = ", ".join(sorted(weights)[:3]) or "no tensors"
    expected = " / ".join(cls.signature_names()[0].removesuffix(".weight") for cls in file_module_classes())
    raise UserError(f"{source}: not a LoRA/LyCORIS network file (no {expected} tensors; keys start: {sample})")


def _check_prefix(cls, modules: dict, source: str) -> None:
    """An algorithm with its own name prefix (sd-scripts' OFT: oft_unet_) reads only files named that way: LyCORIS'
    diag-OFT / BOFT also store `oft_blocks`, under lora_ names, with another constraint and layout."""
    if cls.NAME_PREFIX == "lora":
        return
    other = sorted(name for name in modules if not name.startswith(f"{cls.NAME_PREFIX}_"))
    if other:
        raise UserError(f"{source}: {other[0]} holds {cls.signature_names()[0]} under a lora_ name: a LyCORIS "
                        f"diag-OFT/BOFT network, which {cls.MODULE} ({cls.LABEL} as sd-scripts writes it, "
                        f"{cls.NAME_PREFIX}_unet_ names) does not read; load it with --network_module lycoris.kohya")


def as_lora_name(name: str) -> str:
    """sd-scripts' OFT module names (oft_unet_…) as the lora_ names the family hints know."""
    return "lora_" + name[4:] if name.startswith("oft_") else name


def save_network_file(state_dict: dict[str, torch.Tensor], file, *, dtype=None,
                      metadata: dict[str, str] | None = None) -> Path:
    """Write the network atomically: safetensors with string metadata and sshs_* hashes, or a torch pickle."""
    from library.formats.kohya_metadata import model_hashes

    file = Path(file)
    _refuse_foreign_overwrite(file)
    tensors = {}
    for key, value in state_dict.items():
        value = value.detach().to("cpu")
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        tensors[key] = value.contiguous().clone()
    with atomic_file(file) as tmp:
        if file.suffix.lower() == ".safetensors":
            metadata = dict(metadata or {})
            metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = model_hashes(tensors, metadata)
            save_file(tensors, str(tmp), metadata=metadata)
        else:
            write_pickle(tensors, tmp)  # not torch.save: A1111's safe unpickler refuses its extra zip entries
    return file


def _refuse_foreign_overwrite(file: Path) -> None:
    """Replacing an older network is fine; replacing a base model or another kind of file with one is not."""
    if not file.exists():
        return
    if file.is_dir():
        raise UserError(f"{file}: is a folder; choose a file name for the network")
    keys = read_safetensors_keys(file) if file.suffix.lower() == ".safetensors" else list(read_state_dict(file)[0])
    signatures = tuple(f".{name}" for name in signature_names())
    if not any(k.endswith(signatures) for k in keys):
        raise UserError(f"{file}: already exists and is not a network file; refusing to overwrite it, "
                        "choose another --output_name")
