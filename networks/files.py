"""Network files: sd-scripts/LyCORIS key layout in safetensors (or .pt), read back with algorithm and ranks detected."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from library.errors import UserError
from library.models.checkpoint_io import read_safetensors_keys, read_state_dict
from library.safe_write import atomic_file
from networks.registry import all_module_classes

# LyCORIS under transformers >= 5 names text-encoder modules without `text_model_`; the ecosystem uses it.
_TE_SPELLINGS = (("lora_te_encoder_", "lora_te_text_model_encoder_"),)


# SD's UNet 3×3 convolutions (ResNet conv1/conv2, up/down-sampler conv). LoHa and low-rank LoKr store a conv's
# factors as 2-D matrices over in·k·k columns, so only the layer's name tells a 3×3 kernel from a Linear.
KERNEL_NAME_ENDINGS = ("_conv1", "_conv2", "_conv")


def is_unet_kernel_name(name: str) -> bool:
    return name.startswith("lora_unet_") and name.endswith(KERNEL_NAME_ENDINGS)


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


def read_network_file(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    weights, metadata = read_state_dict(path)
    weights = {canonical_key(k): v for k, v in weights.items() if isinstance(v, torch.Tensor)}
    describe_network_file(weights, source=str(path))  # refuses files that hold no adapters
    return weights, metadata


def describe_network_file(weights: dict[str, torch.Tensor], *, source: str) -> NetworkFileInfo:
    """Algorithm, per-module rank and alpha from the tensor names and shapes (`--dim_from_weights`)."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in weights.items():
        name, _, rest = canonical_key(key).partition(".")
        grouped.setdefault(name, {})[rest] = value
    for cls in all_module_classes():
        # A module is recognised by any of its signature tensors (LoKr's w1 may be one matrix or two factors).
        signatures = getattr(cls, "DETECT_NAMES", cls.WEIGHT_NAMES[:1])
        modules = {name: ws for name, ws in grouped.items() if any(s in ws for s in signatures)}
        if modules:
            dims = {name: cls.dim_from_weights(ws) for name, ws in modules.items()}
            alphas = {name: float(ws["alpha"]) if "alpha" in ws else float(dims[name]) for name, ws in modules.items()}
            conv = {name for name, ws in modules.items() if cls.is_conv_kernel(ws)}
            return NetworkFileInfo(cls.ALGORITHM, cls, dims, alphas, conv, cls.module_args_from_weights(modules))
    sample = ", ".join(sorted(weights)[:3]) or "no tensors"
    raise UserError(f"{source}: not a LoRA/LyCORIS network file (no lora_down / hada_w1_a / lokr_w1 tensors; "
                    f"keys start: {sample})")


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
            torch.save(tensors, tmp)
    return file


def _refuse_foreign_overwrite(file: Path) -> None:
    """Replacing an older network is fine; replacing a base model or another kind of file with one is not."""
    if not file.exists():
        return
    if file.is_dir():
        raise UserError(f"{file}: is a folder; choose a file name for the network")
    keys = read_safetensors_keys(file) if file.suffix.lower() == ".safetensors" else list(read_state_dict(file)[0])
    signatures = tuple(f".{name}" for cls in all_module_classes()
                       for name in getattr(cls, "DETECT_NAMES", cls.WEIGHT_NAMES[:1]))
    if not any(k.endswith(signatures) for k in keys):
        raise UserError(f"{file}: already exists and is not a network file; refusing to overwrite it, "
                        "choose another --output_name")
