"""Forward diffusion as sd-scripts trains it: the noise scheduler, the noise and timestep draw, and the target."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from diffusers import DDPMScheduler

from library.config.settings import settings_from_config

# sd-scripts' NetworkTrainer.get_noise_scheduler arguments.
_SCHEDULER_ARGS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                       clip_sample=False)


@dataclass(frozen=True)
class NoiseSettings:
    """The options draw_noise and draw_timesteps read, built once per run instead of looked up by name per step.

    None means off (or, for the timestep bounds, the whole schedule), as the declarations' defaults say.
    """

    noise_offset: float | None
    noise_offset_random_strength: bool
    adaptive_noise_scale: float | None
    multires_noise_iterations: int | None
    multires_noise_discount: float
    min_timestep: int | None
    max_timestep: int | None
    ip_noise_gamma: float | None
    ip_noise_gamma_random_strength: bool

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "NoiseSettings":
        return settings_from_config(cls, config)


def make_noise_scheduler(*, v_parameterization: bool, zero_terminal_snr: bool = False) -> DDPMScheduler:
    """sd-scripts' training DDPMScheduler with `all_snr` (alpha_t^2 / sigma_t^2 per timestep) attached."""
    prediction_type = "v_prediction" if v_parameterization else "epsilon"
    plain = DDPMScheduler(**_SCHEDULER_ARGS, prediction_type=prediction_type)
    # sd-scripts runs prepare_scheduler_for_custom_training *before* the zero-terminal-SNR fix, so all_snr (used
    # by min_snr_gamma, debiased estimation, v-pred scaling) stays the original schedule's: finite at t=999.
    alphas_cumprod = plain.alphas_cumprod
    all_snr = (torch.sqrt(alphas_cumprod) / torch.sqrt(1.0 - alphas_cumprod)) ** 2
    # diffusers' rescale_zero_terminal_snr is the same algorithm, op for op, as sd-scripts'
    # fix_noise_scheduler_betas_for_zero_terminal_snr (betas, alphas, alphas_cumprod all replaced).
    scheduler = (DDPMScheduler(**_SCHEDULER_ARGS, prediction_type=prediction_type, rescale_betas_zero_snr=True)
                 if zero_terminal_snr else plain)
    scheduler.all_snr = all_snr
    return scheduler


@dataclass(frozen=True)
class NoiseDraw:
    """One step's draw: the noise the model learns (the target's), the timesteps, and the model's input."""

    noise: torch.Tensor
    timesteps: torch.Tensor
    noisy_latents: torch.Tensor


def draw_noise(scheduler: DDPMScheduler, latents: torch.Tensor, settings: NoiseSettings,
               generator: torch.Generator) -> NoiseDraw:
    """sd-scripts' get_noise_noisy_latents_and_timesteps, every random number drawn from `generator`.

    `generator` must live on latents' device; draws are in latents' dtype (the pyramid's shrink factors in float32).
    Draw order:
    1. noise ~ N(0, 1), latents' shape;
    2. noise_offset (if set): [noise_offset_random_strength: one U(0, 1)], then one N(0, 1) per (sample, channel);
    3. multires_noise_iterations (if set): per level, one U(0, 1) for the scale factor, then that level's N(0, 1);
    4. timesteps: one integer per sample in [min_timestep, max_timestep) (none drawn when min >= max);
    5. ip_noise_gamma (if set): [ip_noise_gamma_random_strength: one U(0, 1)], then N(0, 1) of latents' shape.
    """
    noise = _randn(latents.shape, latents, generator)
    noise_offset = settings.noise_offset
    if noise_offset:
        if settings.noise_offset_random_strength:
            noise_offset = _rand(latents, generator) * noise_offset
        noise = _offset_noise(latents, noise, noise_offset, settings.adaptive_noise_scale, generator)
    if settings.multires_noise_iterations:
        noise = _pyramid_noise(noise, settings.multires_noise_iterations, settings.multires_noise_discount, generator)

    timesteps = draw_timesteps(latents.shape[0], settings, scheduler, generator, latents.device)

    model_noise = noise
    gamma = settings.ip_noise_gamma
    if gamma:
        if settings.ip_noise_gamma_random_strength:
            gamma = _rand(latents, generator) * gamma
        # Input perturbation: only the model's input gets the extra noise; the target keeps `noise`.
        model_noise = noise + gamma * _randn(latents.shape, latents, generator)
    # diffusers' add_noise, op for op, with the table already on the device
    sqrt_alpha, sqrt_one_minus_alpha = _schedule_factors(scheduler, timesteps, latents)
    noisy_latents = sqrt_alpha * latents + sqrt_one_minus_alpha * model_noise
    return NoiseDraw(noise=noise, timesteps=timesteps, noisy_latents=noisy_latents)


def draw_timesteps(batch_size: int, settings: NoiseSettings, scheduler: DDPMScheduler,
                   generator: torch.Generator, device: torch.device | str) -> torch.Tensor:
    """sd-scripts' get_timesteps: uniform integers in [min_timestep, max_timestep); all max_timestep if min >= max.
    An unset bound is the schedule's end (0, or its num_train_timesteps)."""
    low = 0 if settings.min_timestep is None else settings.min_timestep
    high = scheduler.config.num_train_timesteps if settings.max_timestep is None else settings.max_timestep
    if low < high:
        return torch.randint(low, high, (batch_size,), generator=generator, device=device, dtype=torch.long)
    return torch.full((batch_size,), high, device=device, dtype=torch.long)


def target_for(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, *,
               v_parameterization: bool) -> torch.Tensor:
    """What the model should predict: the noise, or the velocity sqrt(a_t)*noise - sqrt(1-a_t)*latents."""
    if not v_parameterization:
        return noise
    # diffusers' get_velocity, op for op, with the table already on the device
    sqrt_alpha, sqrt_one_minus_alpha = _schedule_factors(scheduler, timesteps, latents)
    return sqrt_alpha * noise - sqrt_one_minus_alpha * latents


def _offset_noise(latents: torch.Tensor, noise: torch.Tensor, noise_offset: float | torch.Tensor,
                  adaptive_noise_scale: float | None, generator: torch.Generator) -> torch.Tensor:
    """sd-scripts' apply_noise_offset: a random constant per (sample, channel), optionally grown by |latent mean|."""
    if adaptive_noise_scale is not None:
        latent_mean = torch.abs(latents.mean(dim=(2, 3), keepdim=True))
        # sd-scripts clamps only here, for a negative adaptive scale; a plain noise_offset is used as given.
        noise_offset = torch.clamp(noise_offset + adaptive_noise_scale * latent_mean, 0.0, None)
    return noise + noise_offset * _randn((latents.shape[0], latents.shape[1], 1, 1), latents, generator)


def _pyramid_noise(noise: torch.Tensor, iterations: int, discount: float, generator: torch.Generator) -> torch.Tensor:
    """sd-scripts' pyramid_noise_like (multi-resolution noise), its Python `random` draws taken from `generator`."""
    b, c, h, w = noise.shape
    upsample = torch.nn.Upsample(size=(h, w), mode="bilinear")
    # The shrink factors set grid sizes, so the host needs them: on an accelerator they come from a CPU generator
    # seeded from this batch's seed (reading a device draw back would make the host wait every level).
    factors = generator if generator.device.type == "cpu" else torch.Generator().manual_seed(generator.initial_seed())
    for level in range(iterations):
        # A fresh shrink factor in [2, 4) per level (drawn at level 0 too, where it has no effect); float32 so a
        # half-precision draw cannot round it onto a different grid size.
        r = 2.0 + 2.0 * torch.rand((), generator=factors, dtype=torch.float32).item()
        hn, wn = max(1, int(h / (r**level))), max(1, int(w / (r**level)))
        noise = noise + upsample(_randn((b, c, hn, wn), noise, generator)) * discount**level
        if hn == 1 or wn == 1:
            break
    # One std over the whole batch, as sd-scripts does (not per sample).
    return noise / noise.std()


def schedule_table(scheduler: DDPMScheduler, name: str, device: torch.device, dtype: torch.dtype | None = None
                   ) -> torch.Tensor:
    """`scheduler.<name>` (alphas_cumprod, all_snr) on `device` in `dtype`, copied there once per run: indexing a
    CPU table with device timesteps (or copying it to the device) every step makes the host wait for the device."""
    tables = scheduler.__dict__.setdefault("_device_tables", {})
    source = getattr(scheduler, name)
    key = (name, torch.device(device), dtype or source.dtype)
    cached = tables.get(key)
    if cached is None or cached[0] is not source:  # a replaced table (another schedule) is copied again
        cached = tables[key] = (source, source.to(device=key[1], dtype=key[2]))
    return cached[1]


def _schedule_factors(scheduler: DDPMScheduler, timesteps: torch.Tensor, like: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t) per sample, shaped to broadcast over `like` (diffusers' add_noise
    and get_velocity compute exactly these, in `like`'s dtype)."""
    alphas_cumprod = schedule_table(scheduler, "alphas_cumprod", like.device, like.dtype)
    at_t = alphas_cumprod[timesteps.to(like.device)]
    shape = (-1,) + (1,) * (like.dim() - 1)
    return (at_t ** 0.5).flatten().reshape(shape), ((1 - at_t) ** 0.5).flatten().reshape(shape)


def _randn(shape: tuple[int, ...] | torch.Size, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=generator, device=like.device, dtype=like.dtype)


def _rand(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(1, generator=generator, device=like.device, dtype=like.dtype)
