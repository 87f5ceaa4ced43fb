"""--fused_backward_pass: each parameter is stepped as soon as its gradient is complete, and the gradient freed at
once, so training never holds every gradient together (3.4 GB for SD 1.5's UNet in float32).

Per-parameter optimizers (AdamW, Lion, AdaFactor, the 8-bit ones) give exactly the weights of the usual step;
--max_grad_norm then clips each tensor on its own, as sd-scripts' fused pass does.
"""

from __future__ import annotations

import torch

from library.errors import UserError


def check_fused_backward(config, *, processes: int, device: torch.device) -> None:
    """The combinations a per-parameter step inside backward cannot honour, as one-line errors."""
    if not config.get("fused_backward_pass"):
        return
    if (config.get("gradient_accumulation_steps") or 1) > 1:
        raise UserError("--fused_backward_pass steps each parameter during backward, so it cannot accumulate "
                        "gradients: drop --gradient_accumulation_steps or --fused_backward_pass")
    if processes > 1:
        raise UserError("--fused_backward_pass cannot average gradients over processes: train on one process, or "
                        "drop --fused_backward_pass")
    if config.get("mixed_precision") == "fp16" and device.type != "cpu":
        raise UserError("--fused_backward_pass with --mixed_precision fp16: the fp16 gradient scaler needs every "
                        "gradient at once; use --mixed_precision bf16 (or no)")


class FusedBackward:
    """Steps `optimizer` one parameter at a time from each parameter's post-accumulate-grad hook."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
                 max_grad_norm: float | None):
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the real one
        self.max_grad_norm = max_grad_norm
        self.group_of = {p: group for group in self.optimizer.param_groups for p in group["params"]}
        self.handles = [p.register_post_accumulate_grad_hook(self._step_one) for p in params if p in self.group_of]

    def _step_one(self, param: torch.nn.Parameter) -> None:
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([param], self.max_grad_norm)
        groups = self.optimizer.param_groups
        kept = [group["params"] for group in groups]
        own = self.group_of[param]
        for group in groups:  # the optimizer's step sees this one parameter, with its own group's settings
            group["params"] = [param] if group is own else []
        try:
            self.optimizer.step()
        finally:
            for group, params in zip(groups, kept):
                group["params"] = params
        param.grad = None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
