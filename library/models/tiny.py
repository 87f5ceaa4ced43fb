"""Built-in tiny random SD 1.x/2.x models (`tiny-sd1`, `tiny-sd2`): demos and tests without any download."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from library.models.components import Components
from library.models.ldm_configs import make_text_config, make_unet_config, make_vae_config

TINY_WIDTH = 32
TINY_VAE_CHANNELS = [32, 32, 64, 64]  # 4 levels, 3 downsamples: SD's latent stride of 8


def tiny_configs(v2: bool, latent_scale: float) -> tuple[dict, dict, dict]:
    """UNet, VAE and CLIP text configs of the tiny models: SD's structure at width 32/64.

    The UNet has 3 levels (SD has 4) so 32 px images (4x4 latents) still go down to 1x1. The VAE has SD's 4 levels,
    hence SD's 8x downsampling: a real config's `resolution = 512` gives 64x64 latents and caches in seconds.
    """
    unet = make_unet_config(
        in_channels=4, out_channels=4, block_out_channels=[32, 64, 64], layers_per_block=2,
        attention_levels=[True, True, False], transformer_depth=1, cross_attention_dim=TINY_WIDTH,
        use_linear_projection=v2, v2=v2,
    )
    # SD's VAE is [128, 256, 512, 512] x 2 layers; 32 is the narrowest GroupNorm(32) allows at full resolution.
    vae = make_vae_config(in_channels=3, out_channels=3, block_out_channels=TINY_VAE_CHANNELS, layers_per_block=1,
                          latent_channels=4, scaling_factor=latent_scale)
    text = make_text_config(vocab_size=49408, hidden_size=TINY_WIDTH, num_layers=2, intermediate_size=64,
                            max_positions=77, v2=v2)
    return unet, vae, text


def build_tiny(name: str, seed: int = 0, tokenizer=None) -> Components:
    """The built-in tiny model `name` of whichever family has it (`load_components(name)` ends here too)."""
    from library.models.family import family_of_tiny

    family = family_of_tiny(name)
    if family is None:
        raise KeyError(f"no built-in tiny model {name!r}")
    return family.build_tiny(name, seed=seed, tokenizer=tokenizer)


def seeded_modules(seed: int, *factories) -> list[torch.nn.Module]:
    """Modules built in order from `seed`, every tensor then perturbed so no two are equal (swaps show in tests);
    the caller's torch random state is left as it was."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        modules = [make() for make in factories]
        with torch.no_grad():
            for module in modules:
                for p in module.parameters():
                    p.add_(torch.randn_like(p) * 0.02)
    finally:
        torch.random.set_rng_state(state)
    return modules


def build_tiny_sd(family, *, v2: bool, seed: int, tokenizer) -> Components:
    """An SD 1.x/2.x family's seeded random tiny model; every tensor is perturbed so no two tensors are equal
    (swaps show in tests)."""
    unet_cfg, vae_cfg, text_cfg = tiny_configs(v2, family.latent_scale)
    unet, vae, text_encoder = seeded_modules(seed, lambda: UNet2DConditionModel(**unet_cfg),
                                             lambda: AutoencoderKL(**vae_cfg),
                                             lambda: CLIPTextModel(CLIPTextConfig(**text_cfg)))
    return Components(
        unet=unet.eval(), vae=vae.eval(),
        text_encoders=(text_encoder.eval(),), tokenizers=(tokenizer,), family=family, v_parameterization=False,
        source=family.tiny_models[0],
    )
