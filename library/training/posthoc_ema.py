"""Post-hoc EMA (#21 item 4; Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models",
2024): instead of guessing an EMA decay before training, keep power-function EMAs of the trained weights at two
widths and save snapshots of both along the run; tools/posthoc_ema.py then reconstructs the weights of an EMA of any
width at any snapshot step, as a least-squares combination of the snapshots.

A power-function EMA of exponent γ averages the weights θ_τ seen up to step t with weights ∝ τ^γ: at its t-th update
it takes β_t = (1 − 1/t)^(γ+1) of the average and the rest from θ_t. Its width is σ_rel, the standard deviation of
that profile relative to t: σ_rel² = (γ+1) / ((γ+2)² (γ+3)). The reconstruction matches the continuous profiles
∫ p_i(τ) p_j(τ) dτ exactly; the discrete EMA follows them closely once t is in the tens of steps.
"""

from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path

import numpy as np
import torch

SNAPSHOT_NAME = re.compile(r"-sigma(?P<sigma>[0-9.]+)-step(?P<step>\d+)(?P<suffix>\.[A-Za-z0-9]+)$")


def gamma_for(sigma_rel: float) -> float:
    """The exponent γ of a power-function EMA of width σ_rel (0 < σ_rel < √(1/12), the width at γ = 0): the largest
    real root of σ²(γ+2)²(γ+3) − (γ+1) = 0."""
    s2 = sigma_rel ** 2
    roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1])
    real = [float(r.real) for r in roots if abs(r.imag) < 1e-9 and r.real >= 0]
    if not real:
        raise ValueError(f"σ_rel {sigma_rel} has no power-function EMA (it must be above 0 and below 0.2886)")
    return max(real)


def sigma_rel_for(gamma: float) -> float:
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


class PowerEMA:
    """A power-function EMA of some tensors, in float32, on their device."""

    def __init__(self, params: list[torch.Tensor], sigma_rel: float):
        self.sigma_rel, self.gamma = sigma_rel, gamma_for(sigma_rel)
        self.average = [p.detach().float().clone() for p in params]
        self.updates = 0

    @torch.no_grad()
    def update(self, params: list[torch.Tensor]) -> None:
        self.updates += 1
        beta = (1 - 1 / self.updates) ** (self.gamma + 1)
        current = [p.detach().float() for p in params]
        torch._foreach_lerp_(self.average, current, 1 - beta)

    @contextlib.contextmanager
    def swapped_into(self, params: list[torch.nn.Parameter]):
        """Context: the parameters hold this EMA (in their dtype) inside, their own values again after."""
        with torch.no_grad():
            kept = [p.detach().clone() for p in params]
            for param, value in zip(params, self.average):
                param.copy_(value.to(param.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for param, value in zip(params, kept):
                    param.copy_(value)


def snapshot_name(stem: str, sigma_rel: float, step: int, suffix: str) -> str:
    return f"{stem}-sigma{sigma_rel:.4f}-step{step:08d}{suffix}"


def parse_snapshot(path: Path) -> tuple[float, int] | None:
    """(σ_rel, step) from a snapshot's file name, or None for another file."""
    match = SNAPSHOT_NAME.search(path.name)
    return (float(match["sigma"]), int(match["step"])) if match else None


# ------------------------------------------------------------------------------------------------ reconstruction
def profile_dot(t_a: float, gamma_a: float, t_b: float, gamma_b: float) -> float:
    """∫ p_a p_b over [0, min(t_a, t_b)] for p(τ) = (γ+1) τ^γ / t^(γ+1) on [0, t] (each integrates to 1)."""
    low = min(t_a, t_b)
    return ((gamma_a + 1) * (gamma_b + 1) * low ** (gamma_a + gamma_b + 1)
            / ((gamma_a + gamma_b + 1) * t_a ** (gamma_a + 1) * t_b ** (gamma_b + 1)))


def solve_weights(snapshots: list[tuple[int, float]], step: int, gamma: float) -> np.ndarray:
    """Coefficients x_i so that Σ x_i · snapshot_i best matches (least squares over the profiles) an EMA of exponent
    `gamma` at `step`; snapshots are (step, γ) pairs."""
    a = np.array([[profile_dot(ti, gi, tj, gj) for tj, gj in snapshots] for ti, gi in snapshots], dtype=np.float64)
    b = np.array([profile_dot(ti, gi, step, gamma) for ti, gi in snapshots], dtype=np.float64)
    return np.linalg.lstsq(a, b, rcond=None)[0]


def combine(trees: list, weights: np.ndarray):
    """Σ w_i · tree_i over nested dicts/lists of tensors (a file's contents): tensors the same in every snapshot (an
    alpha, a fixed buffer) are kept as they are; others are summed in float64 and stored in their own dtype;
    anything not a tensor is taken from the last snapshot."""
    first, last = trees[0], trees[-1]
    if isinstance(first, torch.Tensor):
        if not first.is_floating_point() or all(torch.equal(first, t) for t in trees[1:]):
            return last
        total = sum(float(w) * t.double() for w, t in zip(weights, trees))
        return total.to(first.dtype)
    if isinstance(first, dict):
        return {key: combine([tree[key] for tree in trees], weights) for key in first}
    if isinstance(first, (list, tuple)):
        return type(first)(combine([tree[i] for tree in trees], weights) for i in range(len(first)))
    return last


# ---------------------------------------------------------------------------------------------------- during a run
class PosthocTracker:
    """The run's power-function EMAs (--posthoc_ema_sigma_rels) of the method's trained parameters, updated after every
    optimizer step and written as snapshots (the run's own file format, EMA weights swapped in) every
    `every` steps and at the end, into `folder`. Registered for checkpointing: a resumed run continues them."""

    def __init__(self, params: list[torch.nn.Parameter], sigma_rels: list[float], every: int, folder: Path):
        self.params, self.every, self.folder = list(params), every, folder
        self.emas = [PowerEMA(self.params, float(s)) for s in sigma_rels]
        self.last_snapshot = None

    def update(self) -> None:
        for ema in self.emas:
            ema.update(self.params)

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def write(self, step: int, stem: str, suffix: str, export) -> list[Path]:
        """export(path) once per EMA, with that EMA's weights in the parameters."""
        self.folder.mkdir(parents=True, exist_ok=True)
        written = []
        for ema in self.emas:
            path = self.folder / snapshot_name(stem, ema.sigma_rel, step, suffix)
            with ema.swapped_into(self.params):
                export(path)
            written.append(path)
        self.last_snapshot = step
        return written

    # accelerate's register_for_checkpointing
    def state_dict(self) -> dict:
        return {"updates": [e.updates for e in self.emas], "sigma_rels": [e.sigma_rel for e in self.emas],
                "averages": [[t.cpu() for t in e.average] for e in self.emas]}

    def load_state_dict(self, state: dict) -> None:
        if [float(s) for s in state["sigma_rels"]] != [e.sigma_rel for e in self.emas]:
            raise ValueError(f"the state's post-hoc EMAs have σ_rel {state['sigma_rels']}, this run "
                             f"{[e.sigma_rel for e in self.emas]}")
        for ema, updates, averages in zip(self.emas, state["updates"], state["averages"]):
            ema.updates = int(updates)
            for target, value in zip(ema.average, averages):
                target.copy_(value.to(target.device))


def make_tracker(config, method, max_steps: int) -> PosthocTracker | None:
    """--posthoc_ema: the tracker, snapshots every --posthoc_ema_every steps (default: 20 over the run) into
    <output_dir>/<output_name>-posthoc_ema/."""
    if not config.get("posthoc_ema"):
        return None
    sigmas = config.get("posthoc_ema_sigma_rels") or "0.05,0.1"
    values = [float(v) for v in str(sigmas).split(",") if v.strip()] if isinstance(sigmas, str) else list(sigmas)
    every = config.get("posthoc_ema_every") or max(1, math.ceil(max_steps / 20))
    folder = Path(config.output_dir) / f"{config.output_name}-posthoc_ema"
    return PosthocTracker(method.trainable_params(), values, every, folder)
