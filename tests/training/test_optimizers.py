"""Optimizers and lr schedules as sd-scripts' get_optimizer / get_scheduler_fix build them, checked by hand."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from library.errors import UserError
from library.training.optimizers import KNOWN_OPTIMIZERS, make_optimizer, parse_optimizer_args, uses_relative_step
from library.training.schedulers import make_scheduler, warmup_steps

LR = 1e-3
# bitsandbytes keeps 32-bit state for tensors under min_8bit_size (4096 elements): 8-bit needs a bigger one.
BIG = 64 * 80

EXPECTED_CLASS = {
    "AdamW": "torch.optim.adamw.AdamW",
    "AdamW8bit": "bitsandbytes.optim.adamw.AdamW8bit",
    "PagedAdamW": "bitsandbytes.optim.adamw.PagedAdamW",
    "PagedAdamW8bit": "bitsandbytes.optim.adamw.PagedAdamW8bit",
    "PagedAdamW32bit": "bitsandbytes.optim.adamw.PagedAdamW32bit",
    "Lion": "lion_pytorch.lion_pytorch.Lion",
    "Lion8bit": "bitsandbytes.optim.lion.Lion8bit",
    "PagedLion8bit": "bitsandbytes.optim.lion.PagedLion8bit",
    "SGDNesterov": "torch.optim.sgd.SGD",
    "SGDNesterov8bit": "bitsandbytes.optim.sgd.SGD8bit",
    "AdaFactor": "transformers.optimization.Adafactor",
}
NEEDS_PACKAGE = {name: spec.package for name, spec in KNOWN_OPTIMIZERS.items() if name not in EXPECTED_CLASS}


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(BIG // 64, 64), torch.nn.Linear(64, 2))


def one_step(optimizer: torch.optim.Optimizer, model: torch.nn.Module, scheduler=None) -> None:
    """backward, step, then the scheduler before zero_grad, in the loop's order (AdafactorSchedule reads grads)."""
    model(torch.randn(3, BIG // 64, generator=torch.Generator().manual_seed(1))).square().sum().backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def options(**values):
    return {"learning_rate": LR, "max_grad_norm": 1.0} | values


# ---- --optimizer_args -----------------------------------------------------------------------------------------

def test_optimizer_args_are_python_literals_as_sd_scripts_reads_them():
    parsed = parse_optimizer_args(["betas=0.9,0.999", "weight_decay=0.01", "relative_step=False", "eps=1e-8",
                                   "decouple=True", "d_coef=2"])
    assert parsed == {"betas": (0.9, 0.999), "weight_decay": 0.01, "relative_step": False, "eps": 1e-8,
                      "decouple": True, "d_coef": 2}
    assert isinstance(parsed["betas"], tuple) and isinstance(parsed["d_coef"], int)


def test_optimizer_args_that_are_not_literals_stay_text():
    parsed = parse_optimizer_args(["mode=cosine", "step_rules=1:10,0.1:20,0.01", "name='quoted'", "x=a=b"])
    assert parsed == {"mode": "cosine", "step_rules": "1:10,0.1:20,0.01", "name": "quoted", "x": "a=b"}


def test_lowercase_booleans_are_booleans_not_truthy_text():
    assert parse_optimizer_args(["relative_step=false", "scale_parameter=true"]) == {
        "relative_step": False, "scale_parameter": True}


@pytest.mark.parametrize("item", ["weight_decay", "=0.1", " =1"])
def test_an_item_without_key_and_value_is_refused_by_name(item):
    with pytest.raises(UserError, match=rf"--optimizer_args {item!r}: write key=value"):
        parse_optimizer_args([item])


def test_no_optimizer_args():
    assert parse_optimizer_args(None) == {} and parse_optimizer_args([]) == {}


# ---- every --optimizer_type -----------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
@pytest.mark.parametrize("name", list(EXPECTED_CLASS))
def test_each_optimizer_builds_and_steps_on_cpu(name):
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer, class_name, _ = make_optimizer(options(optimizer_type=name), model.parameters())
    one_step(optimizer, model)
    assert class_name == EXPECTED_CLASS[name]
    for old, new in zip(before, model.parameters()):
        assert torch.isfinite(new).all() and not torch.equal(old, new), name


@pytest.mark.parametrize("name", list(NEEDS_PACKAGE))
def test_dadaptation_and_prodigy_build_when_installed_else_name_the_package(name):
    package = NEEDS_PACKAGE[name]
    model = tiny_model()
    if importlib.util.find_spec(package) is None:
        with pytest.raises(UserError, match=rf"needs the {package} package: pip install {package}"):
            make_optimizer(options(optimizer_type=name, learning_rate=1.0), model.parameters())
        return
    optimizer, class_name, _ = make_optimizer(options(optimizer_type=name, learning_rate=1.0), model.parameters())
    before = model[0].weight.detach().clone()
    one_step(optimizer, model)
    assert class_name.startswith(KNOWN_OPTIMIZERS[name].module)
    assert not torch.equal(before, model[0].weight)


def test_default_is_adamw_and_names_are_case_insensitive():
    model = tiny_model()
    assert isinstance(make_optimizer(options(), model.parameters())[0], torch.optim.AdamW)
    _, class_name, _ = make_optimizer(options(optimizer_type="adamw8BIT"), model.parameters())
    assert class_name == "bitsandbytes.optim.adamw.AdamW8bit"


def test_eight_bit_adamw_really_runs_8bit_on_cpu_and_tracks_torch_adamw():
    def run(name):
        model = tiny_model()
        optimizer, _, _ = make_optimizer(options(optimizer_type=name), model.parameters())
        for _ in range(3):
            one_step(optimizer, model)
        return model, optimizer

    start = tiny_model()[0].weight.detach()
    reference, _ = run("AdamW")
    model, optimizer = run("AdamW8bit")
    state = optimizer.state[model[0].weight]
    assert model[0].weight.numel() >= 4096
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    # quantised moments: the weights land within a few percent of torch's AdamW, measured against how far they moved
    moved = (reference[0].weight - start).abs().mean()
    assert 0 < (model[0].weight - reference[0].weight).abs().mean() < 0.05 * moved


def test_paged_optimizers_fall_back_to_unpaged_on_cpu_with_a_warning():
    model = tiny_model()
    optimizer, _, _ = make_optimizer(options(optimizer_type="PagedLion8bit"), model.parameters())
    with pytest.warns(UserWarning, match="Paged optimizers are not supported on CPU"):
        one_step(optimizer, model)
    assert optimizer.state[model[0].weight]["state1"].dtype == torch.uint8


def test_sgd_nesterov_gets_sd_scripts_momentum_unless_given():
    model = tiny_model()
    optimizer, _, kwargs = make_optimizer(options(optimizer_type="SGDNesterov", optimizer_args=["weight_decay=0.1"]),
                                          model.parameters())
    assert list(kwargs.items()) == [("weight_decay", 0.1), ("momentum", 0.9)]  # appended, as ss_optimizer shows it
    assert optimizer.param_groups[0]["nesterov"] is True and optimizer.param_groups[0]["momentum"] == 0.9
    optimizer, _, kwargs = make_optimizer(options(optimizer_type="sgdnesterov", optimizer_args=["momentum=0.5"]),
                                          model.parameters())
    assert kwargs == {"momentum": 0.5} and optimizer.param_groups[0]["momentum"] == 0.5


def test_optimizer_args_reach_the_optimizer_and_are_returned_for_metadata():
    model = tiny_model()
    optimizer, _, kwargs = make_optimizer(options(optimizer_args=["weight_decay=0.05", "betas=0.8,0.9"]),
                                          model.parameters())
    assert kwargs == {"weight_decay": 0.05, "betas": (0.8, 0.9)}
    assert optimizer.param_groups[0]["weight_decay"] == 0.05 and optimizer.param_groups[0]["betas"] == (0.8, 0.9)


def test_optimizer_args_the_class_refuses_are_a_user_error():
    with pytest.raises(UserError, match=r"--optimizer_args no_such=1: AdamW refused them"):
        make_optimizer(options(optimizer_args=["no_such=1"]), tiny_model().parameters())


def test_param_groups_keep_their_own_learning_rates():
    model = tiny_model()
    groups = [{"params": model[0].parameters(), "lr": 1e-4}, {"params": model[1].parameters()}]
    optimizer, _, _ = make_optimizer(options(), groups)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-4, LR]


@pytest.mark.parametrize("path, expected", [
    ("torch.optim.RMSprop", torch.optim.RMSprop),  # dotted: any module
    ("RMSprop", torch.optim.RMSprop),  # bare: sd-scripts looks in torch.optim
    ("bitsandbytes.optim.AdEMAMix8bit", None),
])
def test_a_class_path_builds_that_class(path, expected):
    model = tiny_model()
    optimizer, class_name, _ = make_optimizer(options(optimizer_type=path), model.parameters())
    one_step(optimizer, model)
    assert class_name.endswith("." + path.rpartition(".")[2])
    if expected is not None:
        assert type(optimizer) is expected


@pytest.mark.parametrize("name, message", [
    ("AdamW9bit", r"unknown optimizer 'AdamW9bit' \(did you mean 'AdamW8bit'\?\)"),
    ("Lion8bt", r"did you mean 'Lion8bit'\?"),
    ("Prodigi", r"did you mean 'Prodigy'\?"),
    ("torch.optim.AdamX", r"torch.optim has no optimizer class AdamX \(did you mean"),
    ("no_such_module.Opt", r"cannot import no_such_module"),
    ("AdamWScheduleFree", r"not supported yet"),
])
def test_unknown_optimizers_are_user_errors(name, message):
    with pytest.raises(UserError, match=message):
        make_optimizer(options(optimizer_type=name), tiny_model().parameters())


def test_legacy_flags_map_as_sd_scripts_maps_them():
    model = tiny_model()
    assert make_optimizer(options(use_8bit_adam=True), model.parameters())[1].endswith("AdamW8bit")
    assert make_optimizer(options(use_lion_optimizer=True), model.parameters())[1] == EXPECTED_CLASS["Lion"]
    with pytest.raises(UserError, match="--use_8bit_adam and --use_lion_optimizer both given"):
        make_optimizer(options(use_8bit_adam=True, use_lion_optimizer=True), model.parameters())
    with pytest.raises(UserError, match="--use_8bit_adam and --optimizer_type Lion both given"):
        make_optimizer(options(use_8bit_adam=True, optimizer_type="Lion"), model.parameters())


# ---- Adafactor's relative_step rules --------------------------------------------------------------------------

def test_adafactor_defaults_to_relative_step_with_no_lr_and_its_own_schedule():
    model = tiny_model()
    groups = [{"params": list(model[0].parameters()), "lr": 5e-4}, {"params": list(model[1].parameters())}]
    optimizer, _, kwargs = make_optimizer(options(optimizer_type="AdaFactor"), groups)
    assert kwargs == {"relative_step": True} and uses_relative_step(optimizer)
    assert all(g["lr"] is None for g in optimizer.param_groups)
    assert groups[0]["lr"] == 5e-4  # the caller's groups are not changed
    # sd-scripts replaces whatever --lr_scheduler says by the adafactor schedule
    scheduler = make_scheduler(options(optimizer_type="AdaFactor", lr_scheduler="cosine"), optimizer,
                               num_training_steps=10)
    assert scheduler.get_last_lr() == [LR, LR]  # learning_rate is only the value shown before the first step
    weight = model[0].weight.detach().clone()
    one_step(optimizer, model, scheduler)
    # Adafactor's relative step size at step 1: min(1e-2, 1/sqrt(1)) × max(eps2, RMS(weight before the step))
    rms = weight.norm() / math.sqrt(weight.numel())
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-2 * max(1e-3, rms.item()), rel=1e-5)


def test_adafactor_warmup_init_turns_relative_step_on():
    optimizer, _, kwargs = make_optimizer(
        options(optimizer_type="adafactor", optimizer_args=["relative_step=False", "warmup_init=True"]),
        tiny_model().parameters())
    assert kwargs == {"relative_step": True, "warmup_init": True}
    assert optimizer.param_groups[0]["relative_step"] is True and optimizer.param_groups[0]["lr"] is None


def test_adafactor_without_relative_step_uses_learning_rate_and_any_schedule():
    optimizer, _, kwargs = make_optimizer(
        options(optimizer_type="AdaFactor", optimizer_args=["relative_step=False", "scale_parameter=False"]),
        tiny_model().parameters())
    assert kwargs == {"relative_step": False, "scale_parameter": False} and not uses_relative_step(optimizer)
    assert optimizer.param_groups[0]["lr"] == LR
    scheduler = make_scheduler(options(lr_scheduler="constant_with_warmup", lr_warmup_steps=2), optimizer,
                               num_training_steps=10)
    assert scheduler.get_last_lr()[0] == 0.0
    with pytest.raises(UserError, match="--lr_scheduler adafactor only goes with"):
        make_scheduler(options(lr_scheduler="adafactor"), optimizer, num_training_steps=10)


def test_adafactor_schedule_refuses_a_warmup_another_optimizer_or_a_scheduler_class():
    adafactor = make_optimizer(options(optimizer_type="AdaFactor"), tiny_model().parameters())[0]
    with pytest.raises(UserError, match="relative_step=True has no warmup"):
        make_scheduler(options(lr_scheduler="adafactor", lr_warmup_steps=10), adafactor, num_training_steps=100)
    with pytest.raises(UserError, match="--lr_scheduler_type cannot schedule Adafactor"):
        make_scheduler(options(lr_scheduler_type="StepLR", lr_scheduler_args=["step_size=2"]), adafactor,
                       num_training_steps=10)
    adamw = make_optimizer(options(), tiny_model().parameters())[0]
    with pytest.raises(UserError, match="only goes with --optimizer_type AdaFactor"):
        make_scheduler(options(lr_scheduler="adafactor"), adamw, num_training_steps=10)


# ---- schedules ------------------------------------------------------------------------------------------------

def lr_curve(opts: dict, steps: int, *, num_processes: int = 1) -> list[float]:
    """The lr of each scheduler step, as the loop sees it before stepping."""
    model = torch.nn.Linear(2, 1)
    optimizer, _, _ = make_optimizer(opts, model.parameters())
    scheduler = make_scheduler(opts, optimizer, num_training_steps=steps, num_processes=num_processes)
    lrs = []
    for _ in range(steps * num_processes):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return lrs


def warm(step: int, warmup: int) -> float | None:
    return step / warmup if step < warmup else None


def half_cosine(progress: float) -> float:
    return 0.5 * (1 + math.cos(math.pi * progress))


N, W = 20, 4  # steps, warmup steps

SCHEDULE_CASES = {
    "constant": ({}, lambda s: 1.0),
    "constant_with_warmup": ({"lr_warmup_steps": W}, lambda s: warm(s, W) if s < W else 1.0),
    "linear": ({"lr_warmup_steps": W}, lambda s: warm(s, W) if s < W else (N - s) / (N - W)),
    "cosine": ({"lr_warmup_steps": W, "lr_scheduler_num_cycles": 3},  # cosine ignores num_cycles
               lambda s: warm(s, W) if s < W else half_cosine((s - W) / (N - W))),
    "cosine_with_restarts": ({"lr_warmup_steps": W, "lr_scheduler_num_cycles": 2},
                             lambda s: warm(s, W) if s < W else half_cosine((2 * (s - W) / (N - W)) % 1.0)),
    # transformers' polynomial decays to lr_end=1e-7, not to 0
    "polynomial": ({"lr_warmup_steps": W, "lr_scheduler_power": 2.0},
                   lambda s: warm(s, W) if s < W else ((LR - 1e-7) * (1 - (s - W) / (N - W)) ** 2 + 1e-7) / LR),
    "cosine_with_min_lr": ({"lr_warmup_steps": W, "lr_scheduler_min_lr_ratio": 0.2},
                           lambda s: warm(s, W) if s < W else 0.2 + 0.8 * half_cosine((s - W) / (N - W))),
    # warmup from min_lr_ratio, stable, then half a cosine down over the decay steps
    "warmup_stable_decay": ({"lr_warmup_steps": W, "lr_decay_steps": 0.25, "lr_scheduler_min_lr_ratio": 0.1},
                            lambda s: 0.1 + 0.9 * s / W if s < W else 1.0 if s < N - 5
                            else 0.1 + 0.9 * half_cosine((s - (N - 5)) / 5)),
    "inverse_sqrt": ({"lr_warmup_steps": W, "lr_scheduler_timescale": 8},
                     lambda s: warm(s, W) if s < W else 1 / math.sqrt((s + 8 - W) / 8)),
    "piecewise_constant": ({"lr_scheduler_args": ["step_rules=1:5,0.5:12,0.1"]},
                           lambda s: 1.0 if s < 5 else 0.5 if s < 12 else 0.1),
}


@pytest.mark.parametrize("name", list(SCHEDULE_CASES))
def test_schedule_curve_matches_its_formula(name):
    extra, formula = SCHEDULE_CASES[name]
    lrs = lr_curve(options(lr_scheduler=name, **extra), N)
    expected = [LR * (formula(s) if formula(s) is not None else 0.0) for s in range(N)]
    assert lrs == pytest.approx(expected, abs=1e-12), name


def test_the_schedule_spans_steps_times_processes_and_a_warmup_count_is_not_multiplied():
    lrs = lr_curve(options(lr_scheduler="linear", lr_warmup_steps=2), 5, num_processes=2)
    assert lrs == pytest.approx([LR * x for x in (0, 0.5, 1, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8)])


def test_warmup_ratio_is_a_fraction_of_all_steps():
    assert warmup_steps({"lr_warmup_steps": 0.1}, 100) == 10
    assert warmup_steps({"lr_warmup_steps": 0.15}, 10) == 1  # int() as sd-scripts: rounds down
    assert warmup_steps({"lr_warmup_steps": 10}, 100) == 10
    assert warmup_steps({"lr_warmup_steps": "10%"}, 50) == 5
    assert warmup_steps({}, 100) == 0
    assert lr_curve(options(lr_scheduler="constant_with_warmup", lr_warmup_steps=0.25), 4, num_processes=2)[:3] == \
        pytest.approx([0.0, LR / 2, LR])


@pytest.mark.parametrize("value, message", [(10.0, "must be below 1; write 10"), (-1, "give a step count"),
                                            ("ten", "give a step count")])
def test_bad_warmup_values_are_user_errors(value, message):
    with pytest.raises(UserError, match=message):
        warmup_steps({"lr_warmup_steps": value}, 100)


def test_unknown_scheduler_suggests_the_close_name():
    with pytest.raises(UserError, match=r"'cosine_with_restart' is not known \(did you mean 'cosine_with_restarts'"):
        lr_curve(options(lr_scheduler="cosine_with_restart"), 5)


@pytest.mark.parametrize("opts, message", [
    ({"lr_scheduler": "constant", "lr_warmup_steps": 5}, "constant has no warmup"),
    ({"lr_scheduler": "cosine_with_min_lr"}, "needs --lr_scheduler_min_lr_ratio"),
    ({"lr_scheduler": "warmup_stable_decay", "lr_warmup_steps": 6, "lr_decay_steps": 6}, "exceed the 10"),
    ({"lr_scheduler": "cosine_with_restarts", "lr_scheduler_args": ["num_cycles=3"]},
     "comes from --lr_scheduler_num_cycles"),
    ({"lr_scheduler": "piecewise_constant"}, "step_rules"),
    ({"lr_scheduler": "linear", "lr_scheduler_args": ["bogus=1"]}, "--lr_scheduler linear: .*bogus"),
])
def test_scheduler_settings_that_cannot_work_are_user_errors(opts, message):
    with pytest.raises(UserError, match=message):
        lr_curve(options(**opts), 10)


@pytest.mark.parametrize("path", ["torch.optim.lr_scheduler.StepLR", "StepLR"])
def test_a_scheduler_class_gets_lr_scheduler_args(path):
    lrs = lr_curve(options(lr_scheduler_type=path, lr_scheduler_args=["step_size=3", "gamma=0.5"]), 7)
    assert lrs == pytest.approx([LR * 0.5 ** (s // 3) for s in range(7)])


@pytest.mark.parametrize("opts, message", [
    ({"lr_scheduler_type": "torch.optim.lr_scheduler.StepLr"}, r"no class StepLr \(did you mean 'StepLR'"),
    ({"lr_scheduler_type": "StepLR"}, "give its arguments with --lr_scheduler_args"),
    ({"lr_scheduler_type": "StepLR", "lr_scheduler_args": ["step_size=3"], "lr_warmup_steps": 2}, "gets no warmup"),
    ({"lr_scheduler_type": "nowhere.Sched"}, "cannot import nowhere"),
])
def test_scheduler_class_mistakes_are_user_errors(opts, message):
    with pytest.raises(UserError, match=message):
        lr_curve(options(**opts), 5)
