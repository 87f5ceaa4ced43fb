"""Latents cached whenever the augmentations allow it (pixels that never change encode once): each VAE batch is encoded
when training first needs one of its images, or all before the first step with --strict (every image checked first).
"""

from __future__ import annotations

from pathlib import Path

import torch

from library.data.dataset import latent_requests
from library.data.decode_failures import DecodeFailures, nothing_decodes_message
from library.data.latent_cache import LatentCache, LatentRequest
from library.errors import UserError

# Subset settings that change pixels per epoch; with any of them the VAE runs every step instead.
PIXEL_AUGMENTATIONS = ("color_aug", "random_crop", "face_crop_aug_range")


def vae_identity(source: str, dtype, vae_file: str | None = None) -> str:
    """What cached latents depend on besides the image and its bucket: the model (its resolved path, so
    `./model.safetensors` and `model.safetensors` share a cache), the --vae file replacing its VAE, and the dtype.
    tools/prepare_buckets_latents.py writes its entries under the same identity, so training finds them current."""
    def resolved(name: str) -> str:
        path = Path(name).expanduser()
        return str(path.resolve()) if path.exists() else str(name)

    identity = f"{resolved(source)}:{dtype}"
    return identity + f":vae={resolved(vae_file)}" if vae_file else identity


def build_latent_cache(config, plan, parts, accelerator, *, lazy: bool | None = None) -> LatentCache | None:
    """The run's latent cache, or None when the VAE must run every step. `lazy` (default: unless --strict) plans the
    VAE batches and encodes each one the first time training asks for one of its images: the first step starts after
    one batch instead of all of them, and the latents are the same bit for bit (each batch has its own seed)."""
    subsets = [s for d in plan.datasets for s in d.spec.subsets]
    if any(getattr(s, name) for s in subsets for name in PIXEL_AUGMENTATIONS):
        accelerator.print("latents: encoded every step (colour/crop augmentations change the pixels)")
        return None
    vae = parts.vae
    stride = 2 ** (len(vae.config.block_out_channels) - 1)
    cache = LatentCache(to_disk=bool(config.cache_latents_to_disk),
                        vae_identity=vae_identity(parts.source, vae.dtype, config.get("vae")),
                        skip_check=bool(config.skip_cache_check), latent_stride=stride,
                        npz_suffix=parts.family.latent_cache_suffix)
    requests = latent_requests(plan)
    settings = {"batch_size": config.vae_batch_size or 1, "seed": config.seed, "device": accelerator.device,
                "dtype": vae.dtype}
    where = "disk" if config.cache_latents_to_disk else "memory"
    # --strict promises every image is decoded before training: that needs the upfront pass.
    lazy = not plan.strict if lazy is None else lazy
    if lazy:
        waiting = cache.plan_lazily(requests, vae, **settings)
        ready = len(requests) - waiting
        if waiting:
            already = f" ({ready} already cached)" if ready else ""
            accelerator.print(f"latents: {waiting} images to cache in {where}, encoded as training first needs "
                              f"them{already}")
        else:
            accelerator.print(f"latents: {ready} images cached in {where} (0 encoded now)")
        return cache
    return _encode_upfront(cache, plan, requests, vae, settings, accelerator.print, where)


def _encode_upfront(cache: LatentCache, plan, requests: list[LatentRequest], vae, settings: dict, say,
                    where: str) -> LatentCache:
    """Every missing latent encoded now; a broken image is named once and left out (the dataset fills its slots);
    with --strict it stops the run here, before any step."""
    failures = DecodeFailures((r.image_path for r in requests), strict=plan.strict)
    with torch.no_grad():
        encoded = cache.encode_missing(requests, vae, **settings, on_failure=failures.record)
    cached = sum(1 for r in requests if r.image_path not in cache.failed)
    broken = f", {len(cache.failed)} skipped: they cannot be decoded" if cache.failed else ""
    say(f"latents: {cached} images cached in {where} ({encoded} encoded now{broken})")
    train = {e.path for d in plan.datasets for e in d.train}
    if train and train <= cache.failed.keys():
        raise UserError(nothing_decodes_message("training images", len(train), failures.example()))
    return cache


def loader_workers(config, cache: LatentCache | None, say) -> int:
    """DataLoader workers for the run: none while latents wait to be encoded, since the VAE runs only in the main
    process (a worker cannot use the accelerator's VAE); reading cached latents needs no workers."""
    workers = config.max_data_loader_n_workers or 0
    if workers and cache is not None and cache.waiting:
        say(f"data loader: no worker processes (max_data_loader_n_workers {workers} ignored): latents are encoded in "
            "the main process as training first needs them")
        return 0
    return workers
