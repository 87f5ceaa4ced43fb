"""What train_network.py does until training lands: load the base model, describe it, re-save it and re-check it."""

from __future__ import annotations

from pathlib import Path

import torch

from library.config.run_config import RunConfig
from library.errors import UserError

SUFFIXES = {"safetensors": ".safetensors", "ckpt": ".ckpt", "diffusers": "", "diffusers_safetensors": ""}


def load_resave_and_check(config: RunConfig) -> Path:
    from library.models.loading import load_components
    from library.models.saving import save_model, to_ldm_state_dict

    if not config.pretrained_model_name_or_path:
        raise UserError("--pretrained_model_name_or_path is required: a .safetensors/.ckpt file, a diffusers folder, "
                        "or tiny-sd1 for the built-in demo model")
    if not config.output_dir:
        raise UserError("--output_dir is required: the folder where the re-saved model goes")
    save_as = config.save_model_as or "safetensors"
    if save_as not in SUFFIXES:
        raise UserError(f"--save_model_as {save_as}: a full model is saved as one of {', '.join(SUFFIXES)}")
    parts = load_components(config.pretrained_model_name_or_path, v2=config.v2,
                            v_parameterization=config.v_parameterization, vae=config.vae, tokenizer=config.tokenizer)
    print(parts.describe())
    dst = Path(config.output_dir) / f"{output_name(config, parts.source)}{SUFFIXES[save_as]}"
    save_model(parts, dst, precision=config.save_precision)
    again = load_components(str(dst))
    before, after = to_ldm_state_dict(parts, torch.float32), to_ldm_state_dict(again, torch.float32)
    same = before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    precision = "" if config.save_precision in (None, "float") else f" at float precision; saved as {config.save_precision}"
    print(f"saved: {dst} ({len(after)} tensors, {'identical to' if same else 'DIFFERENT from'} the loaded model{precision})")
    return dst


def output_name(config: RunConfig, source: str) -> str:
    return config.output_name or Path(source).stem or "model"
