"""Tell what a checkpoint file holds from its key names, so a wrong file gets a clear error, not a KeyError."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

from library.errors import UserError
from library.models.checkpoint_io import CHECKPOINT_SUFFIXES, open_checkpoint
from library.models import ldm_convert as lc
from library.models.ldm_convert import CLIP_PREFIX, OPENCLIP_PREFIX, UNET_PREFIX, VAE_PREFIX
from library.models.family import tiny_model_names

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
REFINER_PHRASE = ("an SDXL refiner, which cannot be trained here (nor in sd-scripts); train SDXL base or one of its "
                  "fine-tunes")
SDXL_TEXT_PREFIX = "conditioner.embedders."


def check_base_model(source: str):
    """Refuse at once a base model that is not a Stable Diffusion model, from headers only (a file's tensor names, a
    folder's model_index.json): the trainers call it before the dataset scan, the loader before it loads. Returns
    the model's family when the headers tell it (None for a hub id or an unrecognised layout: the loader decides)."""
    from library.models.family import family_of_file, family_of_tiny

    source = str(source)
    path = Path(source).expanduser()
    if source in tiny_model_names():
        return family_of_tiny(source)
    if path.is_dir():
        return _check_diffusers_folder(path, str(path))
    elif path.exists():
        # Reads the names and shapes only: a .safetensors header, a zipped .ckpt's pickle (tensor data memory-mapped).
        with open_checkpoint(path) as file:
            kind = foreign_kind([*file.meta, *file.non_tensor_keys], file.non_tensor_keys)
            family = None if kind else family_of_file(file.meta)
        if kind:
            raise UserError(f"{path}: this file is {kind}")
        return family
    elif not is_hub_id(source):
        raise UserError(f"{source}: no such file or folder; pass a .safetensors/.ckpt file, a diffusers folder, "
                        f"a hub id, or {' / '.join(tiny_model_names())} for a built-in demo model")


def is_hub_id(source: str) -> bool:
    """`owner/name` that is not a local path: a Hugging Face Hub model id."""
    return bool(HUB_ID.match(source)) and Path(source).suffix.lower() not in CHECKPOINT_SUFFIXES


def _check_diffusers_folder(root: Path, source: str) -> None:
    index = root / "model_index.json"
    if not index.is_file():
        hint = " (it looks like one part of a model; pass its parent folder)" if (root / "config.json").is_file() else ""
        raise UserError(f"{source}: folder is not a diffusers model (no model_index.json){hint}; "
                        "pass the model folder, or a .safetensors/.ckpt file")
    try:
        model_index = json.loads(index.read_text())
        pipeline = model_index.get("_class_name", "")
    except (OSError, ValueError, AttributeError):
        return None  # the loader reports what it cannot read, part by part
    if "XL" in str(pipeline) and model_index.get("text_encoder") in (None, [None, None]):
        raise UserError(f"{source}: this folder is {REFINER_PHRASE} ({pipeline} without text_encoder)")
    from library.models.family import family_of_folder

    return family_of_folder(model_index)


def foreign_kind(keys: Iterable[str], values: dict | None = None) -> str | None:
    """If the keys are not a base model we train (SD 1.x/2.x, SDXL), a phrase saying what they are; None if they are."""
    keys = [k for k in keys if isinstance(k, str)]
    if values is not None and any(isinstance(k, int) for k in values):
        return "an AUTOMATIC1111 hypernetwork (pass it to the hypernetwork options instead)"
    has = lambda *parts: any(any(p in k for p in parts) for k in keys)  # noqa: E731
    starts = lambda *prefixes: any(k.startswith(prefixes) for k in keys)  # noqa: E731
    from networks.registry import signature_names  # every registered adapter's tensor names

    if starts("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_") or has(".lora_down.", ".lora_up.", *signature_names()):
        return "a LoRA/LyCORIS network, not a base model (pass it as --network_weights, or merge it with tools/)"
    if has("emb_params", "string_to_param", "string_to_token", "clip_l", "clip_g") and len(keys) < 16:
        return "a textual-inversion embedding, not a base model"
    if starts("conditioner.embedders.0.model.") and not starts("conditioner.embedders.1."):
        return REFINER_PHRASE
    if not starts(UNET_PREFIX):
        if starts(VAE_PREFIX, "encoder.", "decoder.") and not starts(CLIP_PREFIX, OPENCLIP_PREFIX):
            return "a VAE, not a full model (pass it as --vae)"
        if starts("down_blocks.", "up_blocks.", "conv_in."):
            return "a lone diffusers UNet; pass the whole diffusers model folder (the one with model_index.json)"
        sample = ", ".join(sorted(keys)[:3]) or "no tensors"
        return f"an unknown architecture: no SD UNet ({UNET_PREFIX}*) found (keys start: {sample})"
    if not starts(VAE_PREFIX):
        return "a checkpoint without a VAE (no first_stage_model.* tensors); pass a complete model, or add --vae"
    if not starts(CLIP_PREFIX, OPENCLIP_PREFIX, SDXL_TEXT_PREFIX):
        return ("a checkpoint without a text encoder (no cond_stage_model.* / conditioner.embedders.* tensors); "
                "pass a complete SD 1.x/2.x or SDXL model")
    return None


def has_openclip_text_encoder(keys: Iterable[str]) -> bool:
    return lc.has_openclip(keys)
