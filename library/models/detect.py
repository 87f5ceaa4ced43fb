"""Tell what a checkpoint file holds from its key names, so a wrong file gets a clear error, not a KeyError."""

from __future__ import annotations

from typing import Iterable

from library.models.ldm_convert import CLIP_PREFIX, OPENCLIP_PREFIX, UNET_PREFIX, VAE_PREFIX


def foreign_kind(keys: Iterable[str], values: dict | None = None) -> str | None:
    """If the keys are not an SD 1.x/2.x base model, a phrase saying what they are; None if they are one."""
    keys = [k for k in keys if isinstance(k, str)]
    if values is not None and any(isinstance(k, int) for k in values):
        return "an AUTOMATIC1111 hypernetwork (pass it to the hypernetwork options instead)"
    has = lambda *parts: any(any(p in k for p in parts) for k in keys)  # noqa: E731
    starts = lambda *prefixes: any(k.startswith(prefixes) for k in keys)  # noqa: E731
    if starts("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_") or has(".lora_down.", ".lora_up.", "hada_w1_a", "lokr_w1"):
        return "a LoRA/LyCORIS network, not a base model (pass it as --network_weights, or merge it with tools/)"
    if has("emb_params", "string_to_param", "string_to_token", "clip_l", "clip_g") and len(keys) < 16:
        return "a textual-inversion embedding, not a base model"
    if starts("conditioner.embedders.", "model.diffusion_model.label_emb") and starts("conditioner."):
        return "an SDXL checkpoint; SDXL is not supported yet (SD 1.x/2.x only)"
    if not starts(UNET_PREFIX):
        if starts(VAE_PREFIX, "encoder.", "decoder.") and not starts(CLIP_PREFIX, OPENCLIP_PREFIX):
            return "a VAE, not a full model (pass it as --vae)"
        if starts("down_blocks.", "up_blocks.", "conv_in."):
            return "a lone diffusers UNet; pass the whole diffusers model folder (the one with model_index.json)"
        sample = ", ".join(sorted(keys)[:3]) or "no tensors"
        return f"an unknown architecture: no SD UNet ({UNET_PREFIX}*) found (keys start: {sample})"
    if not starts(VAE_PREFIX):
        return "a checkpoint without a VAE (no first_stage_model.* tensors); pass a complete model, or add --vae"
    if not starts(CLIP_PREFIX, OPENCLIP_PREFIX):
        return "a checkpoint without a text encoder (no cond_stage_model.* tensors); pass a complete SD 1.x/2.x model"
    return None


def has_openclip_text_encoder(keys: Iterable[str]) -> bool:
    return any(k.startswith(OPENCLIP_PREFIX) for k in keys)
