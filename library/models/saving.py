"""Save models as AUTOMATIC1111/ComfyUI single files or diffusers folders, atomically; the model's family gives the
layout (`ModelFamily.single_file_state_dict`, `save_diffusers`)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from library.errors import UserError
from library.formats.a1111_pickle import write_pickle
from library.formats.modelspec import checkpoint_metadata
from library.models import ldm_convert as lc
from library.models.checkpoint_io import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, read_safetensors_keys, read_state_dict
from library.models.components import Components
from library.models.detect import foreign_kind
from library.safe_write import atomic_dir, atomic_file

PRECISIONS = {"float": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def save_dtype(precision: str | None, default: torch.dtype = torch.float32) -> torch.dtype:
    if precision is None:
        return default
    try:
        return PRECISIONS[precision]
    except KeyError:
        raise UserError(f"--save_precision {precision}: expected one of float, fp16, bf16") from None


def to_ldm_state_dict(parts: Components, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The whole model in the single-file layout sd-scripts writes for its family (A1111 / ComfyUI load it)."""
    return {k: _cast(v, dtype) for k, v in parts.family.single_file_state_dict(parts).items()}


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    t = t.detach()
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    # safetensors refuses shared or non-contiguous storage; a fresh contiguous copy per tensor avoids both.
    return t.contiguous().clone() if not t.is_contiguous() or t.storage_offset() else t.contiguous()


def save_single_file(parts: Components, dst: str | Path, *, precision: str | None = "float", epoch: int = 0,
                     global_step: int = 0, metadata: dict[str, str] | None = None) -> Path:
    """Write a `.safetensors` (with modelspec metadata) or `.ckpt` ({"state_dict", "epoch", "global_step"})."""
    dst = Path(dst)
    suffix = dst.suffix.lower()
    if suffix not in SAFETENSORS_SUFFIXES | {".ckpt"}:
        raise UserError(f"{dst}: a single-file model must end in .safetensors or .ckpt")
    refuse_foreign_overwrite(dst)
    sd = to_ldm_state_dict(parts, save_dtype(precision, parts.source_dtype))
    with atomic_file(dst) as tmp:
        if suffix in SAFETENSORS_SUFFIXES:
            meta = checkpoint_metadata(parts.family, v_parameterization=parts.v_parameterization, title=dst.stem)
            save_file(sd, str(tmp), metadata=meta | (metadata or {}))
        else:
            # Not torch.save: A1111's safe unpickler refuses the zip entries torch >= 2.x adds.
            write_pickle({"state_dict": sd, "epoch": epoch, "global_step": global_step}, tmp)
    return dst


def save_diffusers(parts: Components, dst: str | Path, *, precision: str | None = "float") -> Path:
    """Write a diffusers pipeline folder (safetensors weights) that StableDiffusionPipeline.from_pretrained loads."""
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or (any(dst.iterdir()) and not (dst / "model_index.json").is_file())):
        raise UserError(f"{dst}: exists and is not a diffusers model folder; refusing to overwrite it, choose another path")
    dtype = save_dtype(precision, parts.source_dtype)
    with _cast_temporarily(parts.modules(), dtype), atomic_dir(dst) as tmp:
        parts.family.save_diffusers(parts, tmp)
    return dst


@contextlib.contextmanager
def _cast_temporarily(modules, dtype: torch.dtype):
    """Give the modules' floating-point tensors `dtype` for the save, then put the very same values back.

    Casting the modules back and forth (module.to) would leave a model being trained rounded to fp16/bf16 after every
    save; swapping each tensor's data keeps the originals untouched (and the parameters the optimizer holds).
    """
    originals = []
    try:
        for module in modules:
            for tensor in (*module.parameters(), *module.buffers()):
                if tensor.is_floating_point() and tensor.dtype != dtype:
                    originals.append((tensor, tensor.data))
                    tensor.data = tensor.data.to(dtype)
        yield
    finally:
        for tensor, data in originals:
            tensor.data = data


def respell_text_encoder(folder: Path) -> None:
    """Rewrite the text encoder's weights with `text_model.` keys: transformers >= 5 saves them without, and then
    ComfyUI's diffusers loader (and transformers 4) finds none of them and runs an uninitialised text encoder."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # a sharded save: rename in the index and in every shard
        data = json.loads(index.read_text(encoding="utf-8"))
        data["weight_map"] = lc.clip_to_transformers4(data["weight_map"])
        shards = sorted({folder / name for name in data["weight_map"].values()})
        index.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    else:
        shards = [folder / "model.safetensors"]
    for shard in shards:
        with safe_open(str(shard), framework="pt", device="cpu") as f:
            metadata = f.metadata()
            tensors = lc.clip_to_transformers4({key: f.get_tensor(key) for key in f.keys()})
        # A new name, then a rename: the old file may still be memory-mapped by the tensors just read.
        respelled = shard.with_name(shard.name + ".respelled")
        save_file(tensors, str(respelled), metadata=metadata)
        os.replace(respelled, shard)


def save_model(parts: Components, dst: str | Path, *, precision: str | None = "float") -> Path:
    """The form of `dst` decides: a `.safetensors`/`.ckpt` path is a single file, anything else a diffusers folder."""
    dst = Path(dst)
    if dst.suffix.lower() in SAFETENSORS_SUFFIXES | {".ckpt"}:
        return save_single_file(parts, dst, precision=precision)
    if dst.suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(f"{dst}: write full models as .safetensors or .ckpt (or a folder for diffusers)")
    return save_diffusers(parts, dst, precision=precision)


def refuse_foreign_overwrite(dst: Path) -> None:
    """Replacing a model with a newer model is fine; replacing a user's LoRA, VAE or folder with one is not."""
    if not dst.exists():
        return
    if dst.is_dir():
        raise UserError(f"{dst}: is a folder; refusing to replace it with a single-file model")
    if dst.suffix.lower() in SAFETENSORS_SUFFIXES:
        keys, values = read_safetensors_keys(dst), None
    else:
        sd, _ = read_state_dict(dst)
        keys, values = list(sd.keys()), sd
    kind = foreign_kind(keys, values)
    if kind:
        raise UserError(f"{dst}: already exists and is {kind.split(',')[0].split(' (')[0]}; refusing to overwrite it "
                        "with a full model, choose another output path")
