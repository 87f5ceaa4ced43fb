"""Latents cached before training whenever the augmentations allow it (pixels that never change encode once)."""

from __future__ import annotations

import torch

from library.data.dataset import latent_requests
from library.data.latent_cache import LatentCache

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
                        skip_check=bool(config.skip_cache_check), latent_stride=stride)
    requests = latent_requests(plan)
    # channels_last: oneDNN/cuDNN convolutions skip a layout reorder per layer (~15% faster VAE encodes on a CPU).
    vae.to(accelerator.device, memory_format=torch.channels_last)
    generator = torch.Generator(accelerator.device).manual_seed(config.seed)
    try:
        with torch.no_grad():
            encoded = cache.encode_missing(requests, vae, batch_size=config.vae_batch_size or 1, generator=generator,
                                           device=accelerator.device, dtype=vae.dtype)
    finally:
        vae.to(memory_format=torch.contiguous_format)
    where = "disk" if config.cache_latents_to_disk else "memory"
    accelerator.print(f"latents: {len(requests)} images cached in {where} ({encoded} encoded now)")
    return cache
