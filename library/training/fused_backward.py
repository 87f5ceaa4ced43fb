"""--fused_backward_pass: each parameter is stepped as soon as its gradient is complete, and the gradient freed at
once, so training never holds every gradient together (3.4 GB for SD 1.5's UNet in float32). --fused_optimizer_groups N
(sd-scripts' sdxl_train.py): the same with N groups of parameters, each stepped once all of its gradients are there.

Per-parameter optimizers (AdamW, Lion, AdaFactor, the 8-bit ones) give exactly the weights of the usual step;
--max_grad_norm then clips each tensor (each group) on its own, as sd-scripts' fused passes do.
"""

from __future__ import annotations

import torch

from library.errors import UserError


def fused_flag(config) -> str | None:
    """The option that steps inside backward, if one is set."""
    if config.get("fused_backward_pass"):
        return "--fused_backward_pass"
    return "--fused_optimizer_groups" if config.get("fused_optimizer_groups") else None


def check_fused_backward(config, *, processes: int, device: torch.device) -> None:
    """The combinations a step inside backward cannot honour, as one-line errors."""
    flag = fused_flag(config)
    if flag is None:
        return
    if config.get("fused_backward_pass") and config.get("fused_optimizer_groups"):
        raise UserError("--fused_backward_pass and --fused_optimizer_groups are two ways of stepping inside backward "
                        "(as in sd-scripts, give one): each parameter alone, or N groups")
    if (config.get("gradient_accumulation_steps") or 1) > 1:
        raise UserError(f"{flag} steps parameters during backward, so it cannot accumulate gradients: drop "
                        f"--gradient_accumulation_steps or {flag}")
    if processes > 1:
        raise UserError(f"{flag} cannot average gradients over processes: train on one process, or drop {flag}")
    if config.get("mixed_precision") == "fp16" and device.type != "cpu":
        raise UserError(f"{flag} with --mixed_precision fp16: the fp16 gradient scaler needs every gradient at once; "
                        "use --mixed_precision bf16 (or no)")


def split_by_size(params: list[torch.nn.Parameter], count: int) -> list[list[torch.nn.Parameter]]:
    """At most `count` consecutive groups of about equal numbers of values (sd-scripts' fused_optimizer_groups)."""
    total = sum(p.numel() for p in params)
    share = max(1, -(-total // max(1, count)))
    groups: list[list[torch.nn.Parameter]] = [[]]
    size = 0
    for param in params:
        if groups[-1] and size + param.numel() > share and len(groups) < count:
            groups.append([])
            size = 0
        groups[-1].append(param)
        size += param.numel()
    return groups


class FusedBackward:
    """Steps `optimizer` from the parameters' post-accumulate-grad hooks: each parameter as its gradient is complete,
    or with `groups`, each of that many groups of parameters once all of its gradients are."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
                 max_grad_norm: float | None, groups: int | None = None):
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the real one
        self.max_grad_norm = max_grad_norm
        self.group_of = {p: group for group in self.optimizer.param_groups for p in group["params"]}
        params = [p for p in params if p in self.group_of]
        self.chunks = split_by_size(params, groups) if groups else [[p] for p in params]
        self.chunk_of = {p: index for index, chunk in enumerate(self.chunks) for p in chunk}
        self.ready: list[list[torch.nn.Parameter]] = [[] for _ in self.chunks]
        self.handles = [p.register_post_accumulate_grad_hook(self._ready) for p in params]

    def _ready(self, param: torch.nn.Parameter) -> None:
        index = self.chunk_of[param]
        self.ready[index].append(param)
        if len(self.ready[index]) == len(self.chunks[index]):
            self._step(index)

    def _step(self, index: int) -> None:
        params, self.ready[index] = self.ready[index], []
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        groups = self.optimizer.param_groups
        kept = [group["params"] for group in groups]
        for group in groups:  # the optimizer's step sees these parameters only, each with its own group's settings
            group["params"] = [p for p in params if self.group_of[p] is group]
        try:
            self.optimizer.step()
        finally:
            for group, old in zip(groups, kept):
                group["params"] = old
        for param in params:
            param.grad = None

    def flush(self) -> None:
        """After backward: step the groups some of whose parameters got no gradient (unused this step, or frozen
        mid-run), with the gradients that did arrive."""
        for index, ready in enumerate(self.ready):
            if ready:
                self._step(index)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
