"""Latents cached before training whenever the augmentations allow it (pixels that never change encode once)."""

from __future__ import annotations

import torch

from library.data.dataset import latent_requests
from library.data.decode_failures import DecodeFailures, nothing_decodes_message
from library.data.latent_cache import LatentCache
from library.errors import UserError

# Subset settings that change pixels per epoch; with any of them the VAE runs every step instead.
PIXEL_AUGMENTATIONS = ("color_aug", "random_crop", "face_crop_aug_range")


def build_latent_cache(config, plan, parts, accelerator) -> LatentCache | None:
    subsets = [s for d in plan.datasets for s in d.spec.subsets]
    if any(getattr(s, name) for s in subsets for name in PIXEL_AUGMENTATIONS):
        accelerator.print("latents: encoded every step (colour/crop augmentations change the pixels)")
        return None
    vae = parts.vae
    stride = 2 ** (len(vae.config.block_out_channels) - 1)
    cache = LatentCache(to_disk=bool(config.cache_latents_to_disk), vae_identity=f"{parts.source}:{vae.dtype}",
                        skip_check=bool(config.skip_cache_check), latent_stride=stride,
                        npz_suffix=parts.family.latent_cache_suffix)
    requests = latent_requests(plan)
    # A broken image is named once and left out (the dataset fills its slots); with --strict it stops the run here.
    failures = DecodeFailures((r.image_path for r in requests), strict=plan.strict)
    # channels_last: oneDNN/cuDNN convolutions skip a layout reorder per layer (~15% faster VAE encodes on a CPU).
    vae.to(accelerator.device, memory_format=torch.channels_last)
    generator = torch.Generator(accelerator.device).manual_seed(config.seed)
    try:
        with torch.no_grad():
            encoded = cache.encode_missing(requests, vae, batch_size=config.vae_batch_size or 1, generator=generator,
                                           device=accelerator.device, dtype=vae.dtype, on_failure=failures.record)
    finally:
        vae.to(memory_format=torch.contiguous_format)
    where = "disk" if config.cache_latents_to_disk else "memory"
    cached = sum(1 for r in requests if r.image_path not in cache.failed)
    broken = f", {len(cache.failed)} skipped: they cannot be decoded" if cache.failed else ""
    accelerator.print(f"latents: {cached} images cached in {where} ({encoded} encoded now{broken})")
    train = {e.path for d in plan.datasets for e in d.train}
    if train and train <= cache.failed.keys():
        raise UserError(nothing_decodes_message("training images", len(train), failures.example()))
    return cache
