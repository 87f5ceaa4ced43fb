"""AUTOMATIC1111 lr schedule strings: parsing, rate lookup, the torch scheduler over real SGD steps, and resume."""

from __future__ import annotations

import io

import pytest
import torch

from library.errors import UserError
from library.training.a1111_schedule import (
    A1LearningRate,
    A1Schedule,
    check_schedule_covers,
    parse_a1_schedule,
)

TEXT = "0.005:100, 1e-3:1000, 1e-5"


def _expected(step: int) -> float:
    """The documented meaning of TEXT, written out by hand."""
    if step <= 100:
        return 0.005
    return 1e-3 if step <= 1000 else 1e-5


def _sgd(lr: float = 123.0, groups: int = 1) -> torch.optim.SGD:
    params = [{"params": [torch.nn.Parameter(torch.zeros(2))]} for _ in range(groups)]
    return torch.optim.SGD(params, lr=lr)


def _train(optimizer, scheduler, steps: int) -> list[float]:
    """Run `steps` optimizer steps, reading the lr each one uses, stepping the scheduler after each like a loop does."""
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def test_rate_at_follows_the_a1_example():
    schedule = parse_a1_schedule(TEXT)
    for step in (0, 1, 100):
        assert schedule.rate_at(step) == 0.005
    for step in (101, 1000):
        assert schedule.rate_at(step) == 1e-3
    for step in (1001, 5000):
        assert schedule.rate_at(step) == 1e-5
    assert schedule.end is None
    assert schedule.rates == ((0.005, 100), (1e-3, 1000), (1e-5, None))
    assert schedule.text == TEXT


def test_scheduler_gives_each_optimizer_step_its_rate():
    optimizer = _sgd()
    scheduler = A1LearningRate(optimizer, parse_a1_schedule(TEXT))
    assert scheduler.last_epoch == 0
    seen = _train(optimizer, scheduler, 1002)
    assert seen == [_expected(i) for i in range(1, 1003)]
    assert scheduler.get_last_lr() == [optimizer.param_groups[0]["lr"]] == [1e-5]


def test_scheduler_sets_every_param_group_to_the_absolute_rate():
    optimizer = _sgd(lr=7.0, groups=3)
    A1LearningRate(optimizer, parse_a1_schedule("0.25:3, 0.5"))
    assert [group["lr"] for group in optimizer.param_groups] == [0.25, 0.25, 0.25]


def test_minus_one_runs_to_the_end_and_ignores_later_entries():
    schedule = parse_a1_schedule("0.1:10, 0.2:-1, 0.3:50")
    assert schedule.rates == ((0.1, 10), (0.2, None))
    assert schedule.end is None
    assert schedule.rate_at(11) == schedule.rate_at(10_000) == 0.2


def test_bare_rate_runs_to_the_end_and_ignores_later_entries():
    schedule = parse_a1_schedule("0.1:10, 0.2, 0.3:50,")
    assert schedule.rates == ((0.1, 10), (0.2, None))
    assert parse_a1_schedule("  1e-4 ").rates == ((1e-4, None),)


def test_blank_entries_are_skipped():
    assert parse_a1_schedule(" , 0.1:10,, 0.2:20 ,").rates == ((0.1, 10), (0.2, 20))


def test_schedule_with_a_final_step_ends_there():
    schedule = parse_a1_schedule("0.1:10, 0.2:20")
    assert schedule.end == 20
    assert schedule.rate_at(20) == 0.2
    assert schedule.rate_at(21) is None


def test_scheduler_keeps_the_last_rate_past_the_end():
    optimizer = _sgd()
    scheduler = A1LearningRate(optimizer, parse_a1_schedule("0.1:2, 0.2:4"))
    assert _train(optimizer, scheduler, 6) == [0.1, 0.1, 0.2, 0.2, 0.2, 0.2]


def test_step_offset_starts_from_the_resumed_step():
    optimizer = _sgd()
    scheduler = A1LearningRate(optimizer, parse_a1_schedule(TEXT), step_offset=100)
    assert optimizer.param_groups[0]["lr"] == 1e-3
    seen = _train(optimizer, scheduler, 902)
    assert seen == [_expected(100 + i) for i in range(1, 903)]


def test_num_processes_advances_once_per_optimizer_step():
    optimizer = _sgd()
    scheduler = A1LearningRate(optimizer, parse_a1_schedule("0.1:1, 0.2:2, 0.3"), num_processes=2)
    # accelerate steps a prepared scheduler once per process, so two scheduler steps make one optimizer step
    assert _train(optimizer, scheduler, 6) == [0.1, 0.1, 0.2, 0.2, 0.3, 0.3]


def test_state_dict_round_trip_continues_the_sequence():
    schedule = parse_a1_schedule("0.1:3, 0.2:6, 0.3")
    optimizer = _sgd()
    scheduler = A1LearningRate(optimizer, schedule, step_offset=1, num_processes=2)
    _train(optimizer, scheduler, 4)
    buffer = io.BytesIO()
    torch.save({"scheduler": scheduler.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    rest = _train(optimizer, scheduler, 10)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    assert not any(isinstance(value, torch.optim.Optimizer) for value in saved["scheduler"].values())
    resumed_optimizer = _sgd()
    # a fresh scheduler built with other settings: the saved state decides
    resumed = A1LearningRate(resumed_optimizer, parse_a1_schedule("9.0"))
    resumed_optimizer.load_state_dict(saved["optimizer"])
    resumed.load_state_dict(saved["scheduler"])
    assert resumed.schedule == schedule
    assert _train(resumed_optimizer, resumed, 10) == rest


def test_state_dict_loads_with_weights_only():
    optimizer = _sgd()
    scheduler = A1LearningRate(optimizer, parse_a1_schedule(TEXT))
    _train(optimizer, scheduler, 3)
    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["last_epoch"] == 3


@pytest.mark.parametrize("text", [
    "abc", "0.1:x", "0.1:100, 0.2:50", "0.1:100, 0.2:100", "", " , ", "0.1:100:5", "0.1:0", "0.1:-5", ":100",
    "nan", "0.1:1.5",
])
def test_bad_strings_name_the_option(text):
    with pytest.raises(UserError) as err:
        parse_a1_schedule(text, option="--my_schedule")
    message = str(err.value)
    assert "--my_schedule" in message
    assert "\n" not in message


def test_check_schedule_covers():
    ends_at_20 = parse_a1_schedule("0.1:10, 0.2:20")
    check_schedule_covers(ends_at_20, last_step=20)
    check_schedule_covers(ends_at_20, last_step=5)
    check_schedule_covers(parse_a1_schedule("0.1:10, 0.2"), last_step=10_000)
    with pytest.raises(UserError) as err:
        check_schedule_covers(ends_at_20, last_step=21, option="--my_schedule")
    message = str(err.value)
    for part in ("--my_schedule", "step 20", "step 21", "--max_train_steps 20"):
        assert part in message


def test_schedule_is_frozen():
    schedule = A1Schedule(rates=((0.1, None),), text="0.1")
    with pytest.raises(AttributeError):
        schedule.text = "0.2"  # type: ignore[misc]


def test_make_scheduler_uses_the_a1111_string_with_the_resumed_step_count():
    from library.training.schedulers import make_scheduler

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    options = {"ti_lr_schedule": "0.005:100, 1e-3:1000, 1e-5", "lr_scheduler": "constant", "lr_warmup_steps": 0}
    scheduler = make_scheduler(options, optimizer, num_training_steps=1001)
    seen = {}
    for step in range(1, 1002):  # the lr optimizer step `step` runs with
        seen[step] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
    assert (seen[1], seen[100], seen[101], seen[1000], seen[1001]) == (0.005, 0.005, 1e-3, 1e-3, 1e-5)

    resumed = torch.optim.SGD([param], lr=1.0)
    make_scheduler(options, resumed, num_training_steps=10, step_offset=1000)
    assert resumed.param_groups[0]["lr"] == 1e-5  # the file's 1000 steps are behind it


def test_make_scheduler_refuses_a_second_schedule_and_a_schedule_that_ends_early():
    from library.training.schedulers import make_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(UserError, match="--lr_scheduler cosine both set the learning rate"):
        make_scheduler({"ti_lr_schedule": "0.1", "lr_scheduler": "cosine"}, optimizer, num_training_steps=10)
    with pytest.raises(UserError, match="ends at step 5"):
        make_scheduler({"ti_lr_schedule": "0.1:5"}, optimizer, num_training_steps=10)
