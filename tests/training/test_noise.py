"""Noise scheduler, noise draws and targets against diffusers, sd-scripts' formulas and independent rewrites."""

from __future__ import annotations

import random

import pytest
import torch
from diffusers import DDPMScheduler

from library.models.family import family_named
from library.training.noise import NoiseDraw, NoiseSettings, draw_noise, make_noise_scheduler, target_for

SD_SCRIPTS_ARGS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                       clip_sample=False)


def _latents(shape=(2, 4, 8, 8), seed=1, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _draw(options, latents=None, seed=0, scheduler=None):
    scheduler = scheduler or make_noise_scheduler(v_parameterization=False)
    latents = _latents() if latents is None else latents
    return draw_noise(scheduler, latents, NoiseSettings.from_config(options), torch.Generator().manual_seed(seed))


def _zero_terminal_snr_by_hand(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1, written out in float64: returns alphas_cumprod."""
    alphas_bar_sqrt = torch.cumprod(1 - betas.double(), 0).sqrt()
    first, last = alphas_bar_sqrt[0].item(), alphas_bar_sqrt[-1].item()
    rescaled = (alphas_bar_sqrt - last) * first / (first - last)
    return rescaled**2


# --- scheduler --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("v", [False, True])
def test_scheduler_equals_diffusers_ddpm_with_sd_scripts_args(v):
    ours = make_noise_scheduler(v_parameterization=v)
    theirs = DDPMScheduler(**SD_SCRIPTS_ARGS)
    assert torch.equal(ours.betas, theirs.betas)
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)
    assert ours.config.num_train_timesteps == 1000 and ours.config.clip_sample is False
    assert ours.config.prediction_type == ("v_prediction" if v else "epsilon")
    # sd-scripts' NetworkTrainer.vae_scale_factor, the SD families' latent scale.
    assert family_named("sd1").latent_scale == family_named("sd2").latent_scale == 0.18215


def test_zero_terminal_snr_makes_last_alphas_cumprod_zero_and_matches_the_paper():
    fixed = make_noise_scheduler(v_parameterization=True, zero_terminal_snr=True)
    plain = DDPMScheduler(**SD_SCRIPTS_ARGS)
    assert fixed.alphas_cumprod[-1].item() == 0.0
    assert plain.alphas_cumprod[-1].item() > 0.0
    expected = _zero_terminal_snr_by_hand(plain.betas)
    torch.testing.assert_close(fixed.alphas_cumprod.double(), expected, rtol=1e-5, atol=1e-7)
    # The first step is kept; betas and alphas were replaced consistently.
    torch.testing.assert_close(fixed.alphas_cumprod[0], plain.alphas_cumprod[0])
    torch.testing.assert_close(torch.cumprod(1 - fixed.betas, 0), fixed.alphas_cumprod)
    torch.testing.assert_close(fixed.alphas, 1 - fixed.betas)


def test_all_snr_is_alpha_over_sigma_squared_of_the_original_schedule():
    plain_ac = DDPMScheduler(**SD_SCRIPTS_ARGS).alphas_cumprod.double()
    expected = plain_ac / (1 - plain_ac)
    for ztsnr in (False, True):
        scheduler = make_noise_scheduler(v_parameterization=False, zero_terminal_snr=ztsnr)
        assert scheduler.all_snr.shape == (1000,) and scheduler.all_snr.dtype == torch.float32
        # sd-scripts computes all_snr before the zero-terminal-SNR fix, so it stays finite at t=999.
        torch.testing.assert_close(scheduler.all_snr.double(), expected, rtol=1e-5, atol=0)
        assert torch.isfinite(scheduler.all_snr).all()


# --- timesteps --------------------------------------------------------------------------------------------------

def test_timesteps_default_range_and_reproducible():
    latents = _latents((256, 4, 2, 2))
    first = _draw({}, latents, seed=3)
    again = _draw({}, latents, seed=3)
    other = _draw({}, latents, seed=4)
    assert first.timesteps.dtype == torch.long
    assert 0 <= first.timesteps.min() and first.timesteps.max() < 1000
    assert torch.equal(first.timesteps, again.timesteps) and torch.equal(first.noise, again.noise)
    assert not torch.equal(first.timesteps, other.timesteps)


def test_timesteps_stay_in_min_max():
    draw = _draw({"min_timestep": 100, "max_timestep": 103}, _latents((512, 4, 2, 2)))
    assert set(draw.timesteps.tolist()) == {100, 101, 102}


def test_timesteps_min_not_below_max_gives_max():
    # sd-scripts' get_timesteps: torch.full(max_timestep) when min_timestep >= max_timestep.
    draw = _draw({"min_timestep": 500, "max_timestep": 500}, _latents((4, 4, 2, 2)))
    assert draw.timesteps.tolist() == [500] * 4


def test_every_random_number_comes_from_the_generator():
    options = {"noise_offset": 0.1, "noise_offset_random_strength": True, "adaptive_noise_scale": 0.01,
               "multires_noise_iterations": 4, "ip_noise_gamma": 0.1, "ip_noise_gamma_random_strength": True}
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    _draw(options)
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state


# --- noise offset -----------------------------------------------------------------------------------------------

def test_noise_offset_adds_a_per_channel_constant():
    latents = _latents((2, 4, 8, 8))
    plain = _draw({}, latents, seed=5)
    offset = _draw({"noise_offset": 0.3}, latents, seed=5)
    # Draw order: noise, then one N(0,1) per (sample, channel).
    g = torch.Generator().manual_seed(5)
    base = torch.randn(latents.shape, generator=g)
    per_channel = torch.randn((2, 4, 1, 1), generator=g)
    assert torch.equal(offset.noise, base + 0.3 * per_channel)
    diff = offset.noise - plain.noise
    torch.testing.assert_close(diff, diff[:, :, :1, :1].expand_as(diff))


def test_noise_offset_shifts_channel_means_by_about_the_offset():
    latents = torch.zeros(256, 4, 32, 32)
    draw = _draw({"noise_offset": 0.5}, latents, seed=11)
    channel_means = draw.noise.mean(dim=(2, 3))
    # Each (sample, channel) mean is ~ N(0, 0.5^2 + 1/1024): its std is about the offset, not ~1/32.
    assert 0.45 < channel_means.std().item() < 0.55
    plain_means = _draw({}, latents, seed=11).noise.mean(dim=(2, 3))
    assert plain_means.std().item() < 0.05


def test_adaptive_noise_scale_formula_with_clamp():
    latents = torch.zeros(1, 4, 4, 4)
    latents[0, 0] = 2.0
    latents[0, 1] = -3.0
    latents[0, 2] = 0.5
    options = {"noise_offset": 0.1, "adaptive_noise_scale": -0.1}
    draw = _draw(options, latents, seed=9)
    g = torch.Generator().manual_seed(9)
    base = torch.randn(latents.shape, generator=g)
    z = torch.randn((1, 4, 1, 1), generator=g)
    # offset = max(0, 0.1 - 0.1 * |channel mean|): 0 (clamped), 0 (clamped), 0.05, 0.1
    offset = torch.tensor([0.0, 0.0, 0.05, 0.1]).view(1, 4, 1, 1)
    torch.testing.assert_close(draw.noise, base + offset * z)


def test_noise_offset_random_strength_scales_the_offset_by_a_uniform_draw():
    latents = _latents((2, 4, 4, 4))
    draw = _draw({"noise_offset": 0.2, "noise_offset_random_strength": True}, latents, seed=2)
    g = torch.Generator().manual_seed(2)
    base = torch.randn(latents.shape, generator=g)
    strength = torch.rand(1, generator=g) * 0.2
    z = torch.randn((2, 4, 1, 1), generator=g)
    torch.testing.assert_close(draw.noise, base + strength * z)


# --- multires (pyramid) noise -----------------------------------------------------------------------------------

def _pyramid_by_hand(shape, iterations, discount, g):
    """Multi-resolution noise (Whitaker), written independently with the same draw order."""
    b, c, h, w = shape
    noise = torch.randn(shape, generator=g)
    for i in range(iterations):
        r = 2 + 2 * torch.rand((), generator=g).item()
        small_h, small_w = max(1, int(h / r**i)), max(1, int(w / r**i))
        small = torch.randn((b, c, small_h, small_w), generator=g)
        noise = noise + _upsample(small, (h, w)) * discount**i
        if small_h == 1 or small_w == 1:
            break
    return noise / noise.std()


def _upsample(x, size):
    return torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)


@pytest.mark.parametrize("iterations", [1, 3, 10])
def test_pyramid_noise_equals_independent_reimplementation(iterations):
    latents = _latents((2, 4, 16, 12))
    draw = _draw({"multires_noise_iterations": iterations, "multires_noise_discount": 0.3}, latents, seed=7)
    expected = _pyramid_by_hand(latents.shape, iterations, 0.3, torch.Generator().manual_seed(7))
    torch.testing.assert_close(draw.noise, expected)


def test_pyramid_noise_discount_default_is_sd_scripts_option_default():
    latents = _latents((2, 4, 16, 16))
    draw = _draw({"multires_noise_iterations": 2}, latents, seed=7)
    expected = _pyramid_by_hand(latents.shape, 2, 0.3, torch.Generator().manual_seed(7))
    torch.testing.assert_close(draw.noise, expected)


# --- input perturbation -----------------------------------------------------------------------------------------

def test_ip_noise_gamma_perturbs_the_input_not_the_target():
    scheduler = make_noise_scheduler(v_parameterization=True)
    latents = _latents((2, 4, 8, 8))
    plain = _draw({}, latents, seed=4, scheduler=scheduler)
    perturbed = _draw({"ip_noise_gamma": 0.1}, latents, seed=4, scheduler=scheduler)
    assert torch.equal(plain.noise, perturbed.noise) and torch.equal(plain.timesteps, perturbed.timesteps)
    assert not torch.allclose(plain.noisy_latents, perturbed.noisy_latents)
    for v in (False, True):
        assert torch.equal(target_for(scheduler, latents, plain.noise, plain.timesteps, v_parameterization=v),
                           target_for(scheduler, latents, perturbed.noise, perturbed.timesteps, v_parameterization=v))
    # The extra noise is the next draw after the timesteps: x_t = sqrt(a) x0 + sqrt(1-a) (noise + 0.1 z).
    g = torch.Generator().manual_seed(4)
    torch.randn(latents.shape, generator=g)
    torch.randint(0, 1000, (2,), generator=g)
    z = torch.randn(latents.shape, generator=g)
    a = scheduler.alphas_cumprod[perturbed.timesteps].view(-1, 1, 1, 1)
    expected = a.sqrt() * latents + (1 - a).sqrt() * (plain.noise + 0.1 * z)
    torch.testing.assert_close(perturbed.noisy_latents, expected)


# --- noisy latents and targets ----------------------------------------------------------------------------------

def test_noisy_latents_follow_the_forward_process():
    scheduler = make_noise_scheduler(v_parameterization=False)
    latents = _latents((3, 4, 8, 8))
    draw = _draw({}, latents, seed=12, scheduler=scheduler)
    assert isinstance(draw, NoiseDraw)
    a = scheduler.alphas_cumprod.double()[draw.timesteps].view(-1, 1, 1, 1)
    expected = a.sqrt() * latents.double() + (1 - a).sqrt() * draw.noise.double()
    torch.testing.assert_close(draw.noisy_latents.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ztsnr", [False, True])
def test_v_target_is_alpha_noise_minus_sigma_x0(ztsnr):
    scheduler = make_noise_scheduler(v_parameterization=True, zero_terminal_snr=ztsnr)
    x0, noise = _latents((4, 4, 8, 8), seed=1), _latents((4, 4, 8, 8), seed=2)
    timesteps = torch.tensor([0, 250, 700, 999])
    a = scheduler.alphas_cumprod.double()[timesteps].view(-1, 1, 1, 1)
    expected = a.sqrt() * noise.double() - (1 - a).sqrt() * x0.double()
    got = target_for(scheduler, x0, noise, timesteps, v_parameterization=True)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    if ztsnr:  # pure noise at the last step: v = -x0
        torch.testing.assert_close(got[3], -x0[3])
    assert target_for(scheduler, x0, noise, timesteps, v_parameterization=False) is noise


def test_scheduler_is_left_as_it_was():
    scheduler = make_noise_scheduler(v_parameterization=True)
    alphas_cumprod = scheduler.alphas_cumprod
    draw = _draw({"ip_noise_gamma": 0.1}, scheduler=scheduler)
    target_for(scheduler, _latents(), draw.noise, draw.timesteps, v_parameterization=True)
    assert scheduler.alphas_cumprod is alphas_cumprod


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_draws_in_the_latents_dtype(dtype):
    options = {"noise_offset": 0.1, "multires_noise_iterations": 3, "ip_noise_gamma": 0.1}
    draw = _draw(options, _latents(dtype=dtype))
    assert draw.noise.dtype == dtype and draw.noisy_latents.dtype == dtype
    assert torch.isfinite(draw.noisy_latents.float()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_noisy_latents_and_v_target_are_diffusers_add_noise_and_get_velocity_bit_for_bit(dtype):
    # Our table lives on the device; the arithmetic must still be diffusers' own, op for op.
    ours, theirs = make_noise_scheduler(v_parameterization=True), make_noise_scheduler(v_parameterization=True)
    latents = _latents((3, 4, 8, 8), dtype=dtype)
    draw = _draw({}, latents, seed=5, scheduler=ours)
    assert torch.equal(draw.noisy_latents, theirs.add_noise(latents, draw.noise, draw.timesteps))
    velocity = target_for(ours, latents, draw.noise, draw.timesteps, v_parameterization=True)
    assert torch.equal(velocity, theirs.get_velocity(latents, draw.noise, draw.timesteps))


def test_schedule_tables_are_copied_once_per_device_and_dtype():
    from library.training.noise import schedule_table

    scheduler = make_noise_scheduler(v_parameterization=False)
    first = schedule_table(scheduler, "alphas_cumprod", torch.device("cpu"), torch.bfloat16)
    assert schedule_table(scheduler, "alphas_cumprod", torch.device("cpu"), torch.bfloat16) is first
    assert torch.equal(first, scheduler.alphas_cumprod.to(torch.bfloat16))
    scheduler.alphas_cumprod = scheduler.alphas_cumprod * 0.5  # a replaced table is not served stale
    assert torch.equal(schedule_table(scheduler, "alphas_cumprod", torch.device("cpu"), torch.bfloat16),
                       scheduler.alphas_cumprod.to(torch.bfloat16))
