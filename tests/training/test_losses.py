"""Losses and loss weights against hand computations of sd-scripts' formulas (conditional_loss, apply_snr_weight)."""

from __future__ import annotations

import math

import pytest
import torch

from library.training.losses import (
    LossSettings, debiased_weight, elementwise_loss, huber_c_for, min_snr_weight, snr_scale, training_loss,
)
from library.training.noise import make_noise_scheduler


def _alphas_cumprod_by_hand() -> torch.Tensor:
    """SD's scaled-linear schedule in float64: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


AC = _alphas_cumprod_by_hand()
SNR = AC / (1 - AC)
TIMESTEPS = torch.tensor([0, 10, 300, 999])
# The scheduler's schedule is float32 (as in sd-scripts); at t=0, 1 - alphas_cumprod loses ~2.5e-5 relative.
RTOL = 1e-4
# Options as a run config would hold them; the rest take their declared defaults.
_settings = LossSettings.from_config


def _unit_batch(timesteps=TIMESTEPS, shape=(2, 4, 4)):
    """pred - target = 1 everywhere, so every l2 per-sample loss is 1 before weighting."""
    target = torch.zeros((len(timesteps),) + shape)
    return target + 1, target


def _per_sample(options, *, v=False, timesteps=TIMESTEPS, is_reg=None, ztsnr=False):
    scheduler = make_noise_scheduler(v_parameterization=v, zero_terminal_snr=ztsnr)
    pred, target = _unit_batch(timesteps)
    is_reg = torch.zeros(len(timesteps), dtype=torch.bool) if is_reg is None else is_reg
    return training_loss(pred, target, timesteps, is_reg, scheduler, _settings(options), v_parameterization=v)


# --- Huber parameter schedules ----------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_type", ["l2", "l1"])
def test_huber_c_is_none_for_l2_and_l1(loss_type):
    scheduler = make_noise_scheduler(v_parameterization=False)
    assert huber_c_for(TIMESTEPS, scheduler, _settings({"loss_type": loss_type, "huber_schedule": "constant"})) is None
    assert huber_c_for(TIMESTEPS, scheduler, _settings({})) is None  # loss_type defaults to l2


def test_huber_c_constant_is_c_times_scale():
    scheduler = make_noise_scheduler(v_parameterization=False)
    got = huber_c_for(TIMESTEPS, scheduler, _settings({"loss_type": "huber", "huber_schedule": "constant",
                                                       "huber_c": 0.2, "huber_scale": 3.0}))
    torch.testing.assert_close(got, torch.full((4,), 0.6))


def test_huber_c_exponential_decays_from_scale_to_c_times_scale():
    scheduler = make_noise_scheduler(v_parameterization=False)
    timesteps = torch.tensor([0, 500, 999])
    got = huber_c_for(timesteps, scheduler, _settings({"loss_type": "smooth_l1", "huber_schedule": "exponential",
                                                       "huber_c": 0.25, "huber_scale": 2.0}))
    # exp(ln(c) t / 1000) * scale = c^(t/1000) * scale
    expected = torch.tensor([2.0, 0.25**0.5 * 2.0, 0.25**0.999 * 2.0])
    torch.testing.assert_close(got, expected)


def test_huber_c_snr_schedule_by_hand_and_ignores_scale():
    scheduler = make_noise_scheduler(v_parameterization=False)
    options = {"loss_type": "huber", "huber_schedule": "snr", "huber_c": 0.1}
    got = huber_c_for(TIMESTEPS, scheduler, _settings(options))
    sigma = ((1 - AC[TIMESTEPS]) / AC[TIMESTEPS]).sqrt()
    expected = (1 - 0.1) / (1 + sigma) ** 2 + 0.1
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-7)
    assert torch.equal(huber_c_for(TIMESTEPS, scheduler, _settings(options | {"huber_scale": 5.0})), got)
    # huber_schedule defaults to snr, huber_c to 0.1
    assert torch.equal(huber_c_for(TIMESTEPS, scheduler, _settings({"loss_type": "huber"})), got)


def test_huber_c_snr_schedule_reads_the_zero_terminal_snr_schedule():
    scheduler = make_noise_scheduler(v_parameterization=True, zero_terminal_snr=True)
    got = huber_c_for(torch.tensor([999]), scheduler,
                      _settings({"loss_type": "huber", "huber_schedule": "snr", "huber_c": 0.1}))
    # alphas_cumprod = 0: sigma is infinite, so c = huber_c exactly
    assert got.tolist() == [pytest.approx(0.1)]


# --- element-wise losses ----------------------------------------------------------------------------------------

def test_elementwise_losses_by_hand():
    pred = torch.tensor([3.0, -1.0, 0.0]).view(1, 3, 1, 1)
    target = torch.zeros(1, 3, 1, 1)
    c = torch.tensor([4.0])
    flat = lambda t: t.flatten().tolist()  # noqa: E731
    assert flat(elementwise_loss(pred, target, "l2", None)) == [9.0, 1.0, 0.0]
    assert flat(elementwise_loss(pred, target, "l1", None)) == [3.0, 1.0, 0.0]
    # sqrt(d^2 + c^2) - c: d=3 -> 1, d=-1 -> sqrt(17) - 4, d=0 -> 0
    root17 = math.sqrt(17) - 4
    assert flat(elementwise_loss(pred, target, "huber", c)) == pytest.approx([8.0, 8 * root17, 0.0])
    assert flat(elementwise_loss(pred, target, "smooth_l1", c)) == pytest.approx([2.0, 2 * root17, 0.0])


def test_huber_c_is_broadcast_per_sample():
    pred = torch.full((2, 1, 2, 2), 3.0)
    got = elementwise_loss(pred, torch.zeros_like(pred), "huber", torch.tensor([4.0, 1.0]))
    assert torch.all(got[0] == 8.0)
    torch.testing.assert_close(got[1], torch.full((1, 2, 2), 2 * (math.sqrt(10) - 1)))


def test_unknown_loss_type_and_missing_huber_c_are_errors():
    x = torch.zeros(1, 1, 1, 1)
    with pytest.raises(ValueError, match="l3"):
        elementwise_loss(x, x, "l3", None)
    with pytest.raises(ValueError, match="huber_c"):
        elementwise_loss(x, x, "huber", None)


# --- prior loss weight and SNR weights --------------------------------------------------------------------------

def test_prior_loss_weight_weights_only_reg_samples():
    is_reg = torch.tensor([False, True, False, True])
    loss, per_sample = _per_sample({"prior_loss_weight": 0.25}, is_reg=is_reg)
    assert per_sample.tolist() == [1.0, 0.25, 1.0, 0.25]
    assert loss.item() == pytest.approx(0.625)
    # default 1.0, and None means the default
    assert _per_sample({"prior_loss_weight": None}, is_reg=is_reg)[1].tolist() == [1.0] * 4


@pytest.mark.parametrize("v", [False, True])
def test_min_snr_gamma_weights(v):
    _, per_sample = _per_sample({"min_snr_gamma": 5.0}, v=v)
    snr = SNR[TIMESTEPS]
    # sd-scripts' apply_snr_weight: min(snr, gamma) / snr, or / (snr + 1) for v; no cap on snr here
    expected = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / (snr + 1 if v else snr)
    torch.testing.assert_close(per_sample.double(), expected, rtol=RTOL, atol=0)
    assert snr[0] > 1000  # t=0: ~1175, uncapped
    torch.testing.assert_close(min_snr_weight(TIMESTEPS, make_noise_scheduler(v_parameterization=v), 5.0,
                                              v_parameterization=v), per_sample)


@pytest.mark.parametrize("v", [False, True])
def test_debiased_estimation_weights_cap_snr_at_1000(v):
    _, per_sample = _per_sample({"debiased_estimation_loss": True}, v=v)
    snr = SNR[TIMESTEPS].clamp(max=1000)
    expected = 1 / (snr + 1) if v else 1 / snr.sqrt()
    torch.testing.assert_close(per_sample.double(), expected, rtol=RTOL, atol=0)
    uncapped_first = 1 / (SNR[0] + 1) if v else 1 / SNR[0].sqrt()
    assert per_sample[0].item() != pytest.approx(uncapped_first.item(), rel=1e-3)
    torch.testing.assert_close(debiased_weight(TIMESTEPS, make_noise_scheduler(v_parameterization=v),
                                               v_parameterization=v), per_sample)


def test_scale_v_pred_loss_like_noise_pred():
    _, per_sample = _per_sample({"scale_v_pred_loss_like_noise_pred": True}, v=True)
    snr = SNR[TIMESTEPS].clamp(max=1000)
    torch.testing.assert_close(per_sample.double(), snr / (snr + 1), rtol=RTOL, atol=0)
    torch.testing.assert_close(snr_scale(TIMESTEPS, make_noise_scheduler(v_parameterization=True)), per_sample)


def test_v_pred_like_loss_adds_loss_over_scale_times_k():
    _, per_sample = _per_sample({"v_pred_like_loss": 0.3})
    snr = SNR[TIMESTEPS].clamp(max=1000)
    torch.testing.assert_close(per_sample.double(), 1 + 0.3 * (snr + 1) / snr, rtol=RTOL, atol=0)


def test_falsy_weight_options_are_off():
    options = {"min_snr_gamma": 0, "v_pred_like_loss": 0.0, "scale_v_pred_loss_like_noise_pred": False,
               "debiased_estimation_loss": False}
    assert _per_sample(options)[1].tolist() == [1.0] * 4


def test_weights_use_the_original_snr_under_zero_terminal_snr():
    # sd-scripts attaches all_snr before fixing the betas: weights stay finite at t=999.
    _, per_sample = _per_sample({"min_snr_gamma": 5.0, "debiased_estimation_loss": True}, v=True, ztsnr=True)
    snr = SNR[TIMESTEPS]
    expected = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / (snr + 1) / (snr.clamp(max=1000) + 1)
    torch.testing.assert_close(per_sample.double(), expected, rtol=RTOL, atol=0)


def test_post_process_order_all_at_once():
    options = {"min_snr_gamma": 2.0, "scale_v_pred_loss_like_noise_pred": True, "v_pred_like_loss": 0.5,
               "debiased_estimation_loss": True}
    _, per_sample = _per_sample(options, v=True)
    snr = SNR[TIMESTEPS]
    capped = snr.clamp(max=1000)
    loss = torch.minimum(snr, torch.tensor(2.0, dtype=torch.float64)) / (snr + 1)  # min-SNR (v)
    loss = loss * capped / (capped + 1)  # scale like noise prediction
    loss = loss + loss / (capped / (capped + 1)) * 0.5  # v-prediction-like loss
    loss = loss / (capped + 1)  # debiased (v)
    torch.testing.assert_close(per_sample.double(), loss, rtol=RTOL, atol=0)


# --- the whole loss ---------------------------------------------------------------------------------------------

def test_training_loss_on_a_hand_built_batch_step_by_step():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(3, 2, 4, 4, generator=g).half()
    target = torch.randn(3, 2, 4, 4, generator=g)
    timesteps = torch.tensor([0, 400, 999])
    is_reg = torch.tensor([False, True, False])
    mask = torch.rand(3, 8, 8, generator=g)
    options = {"loss_type": "huber", "huber_schedule": "snr", "huber_c": 0.2, "prior_loss_weight": 0.5,
               "min_snr_gamma": 5.0, "debiased_estimation_loss": True}
    scheduler = make_noise_scheduler(v_parameterization=True)
    loss, per_sample = training_loss(pred, target, timesteps, is_reg, scheduler, _settings(options),
                                     v_parameterization=True, loss_mask=mask)
    assert loss.dtype == torch.float32 and per_sample.shape == (3,)

    expected = []
    for i, t in enumerate(timesteps.tolist()):
        sigma = math.sqrt((1 - AC[t].item()) / AC[t].item())
        c = (1 - 0.2) / (1 + sigma) ** 2 + 0.2
        d = pred[i].double() - target[i].double()
        elementwise = 2 * c * (torch.sqrt(d**2 + c**2) - c)
        # area resize 8x8 -> 4x4: the mean of each 2x2 block
        small_mask = mask[i].double().reshape(4, 2, 4, 2).mean(dim=(1, 3))
        value = (elementwise * small_mask).mean().item()
        value *= 0.5 if is_reg[i] else 1.0
        snr = SNR[t].item()
        value *= min(snr, 5.0) / (snr + 1)
        value *= 1 / (min(snr, 1000.0) + 1)
        expected.append(value)
    torch.testing.assert_close(per_sample.double(), torch.tensor(expected, dtype=torch.float64), rtol=RTOL, atol=1e-8)
    assert loss.item() == pytest.approx(sum(expected) / 3, rel=RTOL)


def test_mask_of_ones_changes_nothing_and_channel_mask_is_accepted():
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    scheduler = make_noise_scheduler(v_parameterization=False)
    args = (pred, target, torch.tensor([5, 6]), torch.tensor([False, False]), scheduler, _settings({}))
    plain = training_loss(*args, v_parameterization=False)[1]
    ones = training_loss(*args, v_parameterization=False, loss_mask=torch.ones(2, 1, 32, 32))[1]
    torch.testing.assert_close(ones, plain)
    half = torch.ones(2, 1, 4, 4)
    half[:, :, :, 2:] = 0
    masked = training_loss(*args, v_parameterization=False, loss_mask=half)[1]
    expected = ((pred - target) ** 2)[..., :2].sum(dim=(1, 2, 3)) / (4 * 4 * 4)
    torch.testing.assert_close(masked, expected)
