"""The training loss as sd-scripts computes it: element-wise loss, mask, per-sample mean, prior and SNR weights."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from library.config.settings import settings_from_config
from library.training.noise import schedule_table

LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
# sd-scripts caps the SNR at 1000 in get_snr_scale and apply_debiased_estimation (not in apply_snr_weight).
_SNR_CAP = 1000.0


@dataclass(frozen=True)
class LossSettings:
    """The options the loss reads, built once per run instead of looked up by name per step (defaults: declared).

    None means off for min_snr_gamma and v_pred_like_loss; so does a falsy value, as in sd-scripts.
    """

    loss_type: str
    huber_schedule: str
    huber_c: float
    huber_scale: float
    prior_loss_weight: float
    min_snr_gamma: float | None
    scale_v_pred_loss_like_noise_pred: bool
    v_pred_like_loss: float | None
    debiased_estimation_loss: bool

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "LossSettings":
        return settings_from_config(cls, config)


def huber_c_for(timesteps: torch.Tensor, scheduler: DDPMScheduler, settings: LossSettings) -> torch.Tensor | None:
    """sd-scripts' get_huber_threshold_if_needed: the per-sample Huber parameter, None for l2/l1."""
    if settings.loss_type not in ("huber", "smooth_l1"):
        return None
    schedule, huber_c, huber_scale = settings.huber_schedule, settings.huber_c, settings.huber_scale
    if schedule == "exponential":
        # c at t=0 decaying to huber_c at t=T: exp(-alpha t) with alpha = -ln(c)/T, times huber_scale.
        alpha = -math.log(huber_c) / scheduler.config.num_train_timesteps
        return torch.exp(-alpha * timesteps) * huber_scale
    if schedule == "snr":
        # sd-scripts ignores huber_scale here, and reads the (possibly zero-terminal-SNR) alphas_cumprod.
        alphas_cumprod = schedule_table(scheduler, "alphas_cumprod", timesteps.device)[timesteps]
        sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5
        return (1 - huber_c) / (1 + sigmas) ** 2 + huber_c
    if schedule == "constant":
        return torch.full((timesteps.shape[0],), huber_c * huber_scale, device=timesteps.device)
    raise ValueError(f"huber_schedule {schedule!r} is not one of {', '.join(HUBER_SCHEDULES)}")


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str,
                     huber_c: torch.Tensor | None) -> torch.Tensor:
    """sd-scripts' conditional_loss with reduction "none"; huber_c holds one value per sample."""
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    if loss_type not in ("huber", "smooth_l1"):
        raise ValueError(f"loss_type {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    if huber_c is None:
        raise ValueError(f"loss_type {loss_type!r} needs huber_c (from huber_c_for)")
    c = huber_c.reshape((-1,) + (1,) * (pred.dim() - 1))
    # Pseudo-Huber: quadratic near 0, linear far out; "huber" scales it by 2c, "smooth_l1" by 2.
    smooth = torch.sqrt((pred - target) ** 2 + c**2) - c
    return 2 * c * smooth if loss_type == "huber" else 2 * smooth


def training_loss(pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, is_reg: torch.Tensor,
                  scheduler: DDPMScheduler, settings: LossSettings, *, v_parameterization: bool,
                  loss_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of sd-scripts' NetworkTrainer.process_batch: (batch mean, per-sample losses), in float32.

    `loss_mask` is a [B, H, W] or [B, 1, H, W] weight in 0..1 at any resolution (an alpha mask, or a
    conditioning image already mapped to 0..1); it is area-resized to the latents as sd-scripts' apply_masked_loss.
    """
    huber_c = huber_c_for(timesteps, scheduler, settings)
    loss = elementwise_loss(pred.float(), target.float(), settings.loss_type, huber_c)
    if loss_mask is not None:
        loss = loss * _resized_mask(loss_mask, loss)
    loss = loss.mean(dim=tuple(range(1, loss.dim())))
    # sd-scripts' batch["loss_weights"]: prior_loss_weight for regularization images, 1 for the rest (float32).
    # (Python numbers, not tensors made from them: building a device tensor from a host value is a copy to wait for.)
    is_reg = torch.as_tensor(is_reg, dtype=torch.bool).to(loss.device, non_blocking=True)
    loss = loss * torch.where(is_reg, float(settings.prior_loss_weight), 1.0)
    loss = post_process_loss(loss, timesteps, scheduler, settings, v_parameterization=v_parameterization)
    return loss.mean(), loss


def post_process_loss(loss: torch.Tensor, timesteps: torch.Tensor, scheduler: DDPMScheduler,
                      settings: LossSettings, *, v_parameterization: bool) -> torch.Tensor:
    """sd-scripts' NetworkTrainer.post_process_loss on per-sample losses, in its order (a falsy option is off)."""
    gamma = settings.min_snr_gamma
    if gamma:
        loss = loss * min_snr_weight(timesteps, scheduler, gamma, v_parameterization=v_parameterization)
    if settings.scale_v_pred_loss_like_noise_pred:
        loss = loss * snr_scale(timesteps, scheduler)
    v_pred_like = settings.v_pred_like_loss
    if v_pred_like:
        loss = loss + loss / snr_scale(timesteps, scheduler) * v_pred_like
    if settings.debiased_estimation_loss:
        loss = debiased_weight(timesteps, scheduler, v_parameterization=v_parameterization) * loss
    return loss


def min_snr_weight(timesteps: torch.Tensor, scheduler: DDPMScheduler, gamma: float, *,
                   v_parameterization: bool) -> torch.Tensor:
    """sd-scripts' apply_snr_weight factor: min(snr, gamma) / snr, or / (snr + 1) for v-prediction; SNR uncapped."""
    snr = _snr(timesteps, scheduler)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    return torch.div(clipped, snr + 1 if v_parameterization else snr).float()


def snr_scale(timesteps: torch.Tensor, scheduler: DDPMScheduler) -> torch.Tensor:
    """sd-scripts' get_snr_scale: snr / (snr + 1) with the SNR capped at 1000."""
    snr = torch.clamp(_snr(timesteps, scheduler), max=_SNR_CAP)
    return snr / (snr + 1)


def debiased_weight(timesteps: torch.Tensor, scheduler: DDPMScheduler, *, v_parameterization: bool) -> torch.Tensor:
    """sd-scripts' apply_debiased_estimation factor: 1/sqrt(snr), or 1/(snr + 1) for v-prediction; SNR capped."""
    snr = torch.clamp(_snr(timesteps, scheduler), max=_SNR_CAP)
    return 1 / (snr + 1) if v_parameterization else 1 / torch.sqrt(snr)


def _snr(timesteps: torch.Tensor, scheduler: DDPMScheduler) -> torch.Tensor:
    """The SNR that make_noise_scheduler attached, at each sample's timestep."""
    return schedule_table(scheduler, "all_snr", timesteps.device)[timesteps]


def _resized_mask(mask: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    mask = mask.to(device=loss.device, dtype=loss.dtype, non_blocking=True)
    if mask.dim() == loss.dim() - 1:
        mask = mask.unsqueeze(1)
    return F.interpolate(mask, size=loss.shape[2:], mode="area")
