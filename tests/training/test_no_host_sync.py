"""A training step makes the host wait for the device nowhere: CUDA's sync debug mode raises on any such wait.
Needs a CUDA device (marked `gpu`: never part of CI); on a CPU every op is synchronous, so there is nothing to check."""

from __future__ import annotations

import pytest
import torch

from library.config.declarations import OPTIONS
from library.config.options import NETWORK
from library.config.resolve import resolve
from library.data.dataset import Batch
from library.methods.network_method import NetworkMethod
from library.models.tiny import build_tiny

# Every per-step table and draw the issue names: SNR weights, Huber's SNR schedule, pyramid noise, offsets.
FLAGS = ["--min_snr_gamma", "5", "--loss_type", "huber", "--huber_schedule", "snr", "--multires_noise_iterations", "4",
         "--noise_offset", "0.05", "--noise_offset_random_strength", "--ip_noise_gamma", "0.1",
         "--debiased_estimation_loss", "--prior_loss_weight", "0.5", "--network_dim", "4", "--network_alpha", "2"]


def steps(device: torch.device, *, checked: bool) -> torch.Tensor:
    """Two LoRA optimizer steps on the tiny model; the second under sync debug mode "error" when `checked` (the
    first copies the schedule tables to the device and reads each adapter's scale once)."""
    config = resolve(["--pretrained_model_name_or_path", "tiny-sd1", "--output_dir", "unused", *FLAGS], NETWORK,
                     OPTIONS)
    method = NetworkMethod(config, build_tiny("tiny-sd1", seed=0), device, torch.float32)
    optimizer = torch.optim.AdamW(method.trainable_params(), lr=1e-3, foreach=True)
    batch = Batch(captions=["a photo", "a cat"], is_reg=torch.tensor([False, True]),
                  network_multipliers=torch.ones(2), images=None, latents=torch.randn(2, 4, 8, 8), alpha_masks=None,
                  image_paths=["a.png", "b.png"], skipped=[])
    for step in range(2):
        if checked and step:
            torch.cuda.set_sync_debug_mode("error")
        try:
            loss = method.loss(batch, torch.Generator(device).manual_seed(step))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(method.trainable_params(), 1.0, foreach=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        finally:
            if checked:
                torch.cuda.set_sync_debug_mode("default")
    return loss.detach()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (gpu tests never run in CI)")
def test_a_network_step_never_waits_for_the_device():
    assert torch.isfinite(steps(torch.device("cuda"), checked=True)).all()
