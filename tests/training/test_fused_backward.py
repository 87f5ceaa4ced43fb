"""--fused_backward_pass: the same weights as the usual step, with never more than one gradient alive."""

from __future__ import annotations

import pytest
import torch

from library.errors import UserError
from library.training.fused_backward import FusedBackward, check_fused_backward


def _model_and_batch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    return model, torch.randn(5, 8), torch.randn(5, 4)


@pytest.mark.parametrize("make", [lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.01),
                                  lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)], ids=["adamw", "sgd"])
def test_per_parameter_steps_equal_the_usual_step_and_free_every_gradient(make):
    usual, x, y = _model_and_batch()
    fused, _, _ = _model_and_batch()
    opt_usual = make([{"params": usual[0].parameters()}, {"params": usual[2].parameters(), "lr": 0.05}])
    opt_fused = make([{"params": fused[0].parameters()}, {"params": fused[2].parameters(), "lr": 0.05}])
    params = list(fused.parameters())
    alive = []
    for p in params:  # registered first, so it runs before the fused step of the same parameter
        p.register_post_accumulate_grad_hook(lambda _: alive.append(sum(q.grad is not None for q in params)))
    hooks = FusedBackward(opt_fused, params, max_grad_norm=None)
    for _ in range(3):
        torch.nn.functional.mse_loss(usual(x), y).backward()
        opt_usual.step()
        opt_usual.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(fused(x), y).backward()
        assert all(p.grad is None for p in params)
    assert max(alive) == 1  # one gradient at a time
    for a, b in zip(usual.parameters(), fused.parameters()):
        assert torch.equal(a, b)
    hooks.remove()
    torch.nn.functional.mse_loss(fused(x), y).backward()
    assert all(p.grad is not None for p in params)  # removed: plain backward again


def test_max_grad_norm_clips_each_tensor_on_its_own():
    model, x, y = _model_and_batch()
    before = [p.detach().clone() for p in model.parameters()]
    FusedBackward(torch.optim.SGD(model.parameters(), lr=1.0), list(model.parameters()), max_grad_norm=1e-3)
    (1000 * torch.nn.functional.mse_loss(model(x), y)).backward()
    for old, new in zip(before, model.parameters()):  # every tensor's step was cut to norm 1e-3 (float error aside)
        assert float(torch.linalg.vector_norm(old - new.detach())) == pytest.approx(1e-3, rel=1e-2)


@pytest.mark.parametrize("options, processes, phrase", [
    ({"gradient_accumulation_steps": 2}, 1, "cannot accumulate"),
    ({}, 2, "one process"),
])
def test_impossible_combinations_are_one_line_errors(options, processes, phrase):
    with pytest.raises(UserError, match=phrase):
        check_fused_backward({"fused_backward_pass": True, **options}, processes=processes, device=torch.device("cpu"))
    check_fused_backward(options, processes=processes, device=torch.device("cpu"))  # off: nothing to check


def test_groups_step_inside_backward_once_each_group_is_complete_and_equal_the_usual_step():
    """--fused_optimizer_groups: at most N groups of about equal size, each stepped (and its gradients freed) during
    backward as soon as its last gradient arrives; a group left incomplete (an unused parameter) steps on flush."""
    from library.training.fused_backward import split_by_size

    usual, x, y = _model_and_batch()
    grouped, _, _ = _model_and_batch()
    params = list(grouped.parameters())
    chunks = split_by_size(params, 2)
    assert len(chunks) == 2 and [p for c in chunks for p in c] == params
    assert split_by_size(params, 10) == [[p] for p in params]  # more groups than tensors: one each
    opt_usual, opt_grouped = torch.optim.AdamW(usual.parameters(), lr=0.1), torch.optim.AdamW(params, lr=0.1)
    stepped_during_backward = []
    before = [p.detach().clone() for p in params]
    last = params[0]  # the first layer's weight: its gradient comes last, completing the first group
    last.register_post_accumulate_grad_hook(  # registered first: runs before the group's step
        lambda _: stepped_during_backward.append([not torch.equal(p, b) for p, b in zip(params, before)]))
    hooks = FusedBackward(opt_grouped, params, max_grad_norm=None, groups=2)
    for _ in range(2):
        torch.nn.functional.mse_loss(usual(x), y).backward()
        opt_usual.step()
        opt_usual.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(grouped(x), y).backward()
        hooks.flush()
        assert all(p.grad is None for p in params)
    # Groups by size: [first weight (128 values)], [first bias, last weight, last bias (84)]. When the first weight's
    # gradient arrived (the last one of backward), the other group had already stepped, inside backward.
    assert [len(c) for c in chunks] == [1, 3]
    assert stepped_during_backward[0] == [False, True, True, True]
    for a, b in zip(usual.parameters(), grouped.parameters()):
        assert torch.equal(a, b)
    hooks.remove()
