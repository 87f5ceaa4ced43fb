"""The validation loss (sd-scripts' --validation_split, --validate_every_n_steps/epochs, --max_validation_steps).

Held-out images (library/data/plan.py: validation_split, is_val subsets) are scored with the training loss, without
gradients, at fixed timesteps and with fixed noise, so two validations of the same weights give the same figure and a
falling curve means the model got better on images it never trained on. As sd-scripts (PR #1903): each batch at the 4
timesteps evenly inside [min_timestep, max_timestep] (200, 400, 600, 800 by default), the noise drawn from
--validation_seed (else --seed) afresh for each validation, the adapter in eval mode (no dropout). Unlike sd-scripts,
each figure is the mean of that validation alone (its moving average kept stale entries from earlier ones), and every
process scores the whole set (the same figure everywhere; sd-scripts logs rank 0's shard).
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import torch

from library.data.dataset import TrainingDataset
from library.data.plan import RunPlan
from library.errors import UserError

TIMESTEPS_PER_BATCH = 4


def validation_timesteps(min_timestep: int | None, max_timestep: int | None, total: int = 1000) -> list[int]:
    """sd-scripts' np.linspace(min, max, 6, dtype=int)[1:-1]: [200, 400, 600, 800] for the whole schedule."""
    low = 0 if min_timestep is None else min_timestep
    high = total if max_timestep is None else max_timestep
    return [int(t) for t in np.linspace(low, high, TIMESTEPS_PER_BATCH + 2, dtype=int)[1:-1]]


class Validator:
    def __init__(self, config, plan: RunPlan, method, accelerator, latent_cache=None):
        self.config, self.method, self.accelerator = config, method, accelerator
        held_out = RunPlan(plan.validation, strict=plan.strict)
        self.images = plan.validation_images
        self.dataset = TrainingDataset(held_out, seed=self._seed(), latent_cache=latent_cache,
                                       caption_transform=method.caption_transform,
                                       caption_variants=method.caption_variants)
        most = config.get("max_validation_steps")
        self.batches = len(self.dataset) if most is None else min(most, len(self.dataset))
        settings = method.noise_settings
        self.timesteps = validation_timesteps(settings.min_timestep, settings.max_timestep,
                                              method.scheduler.config.num_train_timesteps)

    def _seed(self) -> int:
        seed = self.config.get("validation_seed")
        return self.config.seed if seed is None else seed

    def loss(self) -> float:
        """The mean validation loss of the current weights over `batches` batches × 4 timesteps."""
        method = self.method
        device = self.accelerator.device
        generator = torch.Generator(device).manual_seed(self._seed())
        plain = method.noise_settings
        losses = []
        with _eval(method.sampling_modules()), torch.no_grad():
            try:
                for index in range(self.batches):
                    batch = self.dataset[index]
                    for timestep in self.timesteps:
                        method.noise_settings = dataclasses.replace(plain, min_timestep=timestep,
                                                                    max_timestep=timestep)
                        with self.accelerator.autocast():
                            losses.append(method.loss(batch, generator).detach().float())
            finally:
                method.noise_settings = plain
        return float(torch.stack(losses).mean()) if losses else float("nan")


@contextlib.contextmanager
def _eval(modules):
    """Dropout off in the trained adapter (sd-scripts evals the network only; the base models keep their mode)."""
    was = [(module, module.training) for module in modules]
    for module, _ in was:
        module.eval()
    try:
        yield
    finally:
        for module, training in was:
            module.train(training)


def make_validator(config, plan: RunPlan, method, accelerator, latent_cache, *, sharded) -> Validator | None:
    """The run's validator when it holds validation images; sharded engines (FSDP, DeepSpeed) are refused with them:
    a forward outside the engine would see parameter shards."""
    if not plan.validation:
        return None
    if sharded is not None:
        raise UserError("the validation loss (validation_split, is_val subsets) is not supported yet with FSDP or "
                        "DeepSpeed: set validation_split = 0, or train without sharding")
    return Validator(config, plan, method, accelerator, latent_cache)
