"""DeepSpeed ZeRO for the models train_db.py / sdxl_train.py train whole: sd-scripts' `--deepspeed` (with
`--zero_stage`, `--offload_optimizer_device`, ...) or `accelerate launch --use_deepspeed` (its `--zero_stage`,
offload devices and `--deepspeed_config_file`).

The engine is built here from our optimizer (never through accelerate's `prepare`, which refuses DeepSpeed on CPUs
and would count one process there): stage 1 partitions the optimizer state over the processes, stage 2 the
gradients too, stage 3 the weights as well (gathered per module as the forward reaches it, and in full around every
save). Mixed precision stays ours (autocast over fp32 weights), so the files are the same as without DeepSpeed.
The loop uses a `ZeroEngine` where it would use a GradientSync: `loss`, `micro_batch`, then `backward` and `step`,
which DeepSpeed owns (reduction, clipping at --max_grad_norm, the optimizer step, zeroing the gradients).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator

import torch

from library.errors import UserError
from library.training.distributed import _TrainedModels

STAGES = (0, 1, 2, 3)
FROM_COMMAND_LINE = ("optimizer", "scheduler", "fp16", "bf16")  # config-file sections the trainer's options decide


def _flag(value: str | None) -> bool:
    return str(value).lower() in ("true", "1", "yes")


def _device(value) -> str | None:
    return None if value in (None, "", "none") else str(value).lower()


def deepspeed_requested(config, environ=None) -> dict | None:
    """The ZeRO settings, or None when neither `--deepspeed` nor `accelerate launch --use_deepspeed` asks for them.
    The trainer's own flags win (as in sd-scripts, whose DeepSpeedPlugin gets them); without `--deepspeed`, the
    launcher's settings apply."""
    environ = os.environ if environ is None else environ
    launched = _flag(environ.get("ACCELERATE_USE_DEEPSPEED"))
    if not config.get("deepspeed") and not launched:
        return None
    if config.get("deepspeed"):
        settings = {"stage": config.get("zero_stage", 2),
                    "offload_optimizer": _device(config.get("offload_optimizer_device")),
                    "offload_optimizer_nvme_path": config.get("offload_optimizer_nvme_path"),
                    "offload_param": _device(config.get("offload_param_device")),
                    "offload_param_nvme_path": config.get("offload_param_nvme_path"),
                    "zero3_init": bool(config.get("zero3_init_flag")), "file": None}
    else:
        stage = environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
        if not stage.isdigit() or int(stage) not in STAGES:
            raise UserError(f"accelerate launch --use_deepspeed --zero_stage {stage}: use 0, 1, 2 or 3")
        settings = {"stage": int(stage),
                    "offload_optimizer": _device(environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE")),
                    "offload_optimizer_nvme_path": None,
                    "offload_param": _device(environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE")),
                    "offload_param_nvme_path": None,
                    "zero3_init": _flag(environ.get("ACCELERATE_DEEPSPEED_ZERO3_INIT")),
                    "file": environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or None}
    return settings


def refuse_unsupported(method, config, settings: dict) -> None:
    """What this DeepSpeed support does not cover (yet), each as one line, before anything is built."""
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise UserError("--deepspeed: DeepSpeed is not installed; install it with `pip install deepspeed` (see "
                        "README, \"DeepSpeed\"), or train without --deepspeed (DDP)") from None
    name = "--deepspeed" if config.get("deepspeed") else "accelerate launch --use_deepspeed"
    stage3 = settings["stage"] == 3
    if not hasattr(method, "data_parallel_modules"):
        raise UserError(f"{name}: only full fine-tuning (train_db.py, sdxl_train.py) runs on DeepSpeed here; an "
                        "adapter is small enough for DDP: drop it (several processes then train with DDP)")
    refused = [
        (config.get("mixed_precision") == "fp16", "--mixed_precision fp16",
         "DeepSpeed's fp16 loss scaling is not wired in yet; use --mixed_precision bf16 (or no)"),
        (settings["zero3_init"], "zero3_init_flag",
         "models load whole on each process and are partitioned when training starts; drop it"),
        (config.get("fused_backward_pass") or config.get("fused_optimizer_groups"),
         "--fused_backward_pass / --fused_optimizer_groups", "DeepSpeed steps the optimizer itself; drop them"),
        (config.get("stop_text_encoder_training") is not None, "--stop_text_encoder_training",
         "the engine keeps every parameter it started with in its optimizer; train the text encoder throughout or "
         "not at all"),
        (config.get("save_state") or config.get("save_state_on_train_end") or config.get("resume"),
         "--save_state / --resume", "partitioned optimizer states are not saved yet; drop them"),
        (stage3 and config.get("use_ema"), "--use_ema at ZeRO stage 3", "use stage 2, or drop --use_ema"),
        (stage3 and config.get("sample_prompts"), "--sample_prompts at ZeRO stage 3",
         "sampling during training is not supported on partitioned weights; use stage 2, or sample from the saved "
         "model"),
    ]
    for bad, option, fix in refused:
        if bad:
            raise UserError(f"{name} with {option}: not supported; {fix}")
    if settings["offload_param"] and not stage3:
        raise UserError(f"{name}: parameters are offloaded at ZeRO stage 3 only; use --zero_stage 3, or drop "
                        "--offload_param_device")
    for part in ("optimizer", "param"):
        if settings[f"offload_{part}"] == "nvme" and not settings[f"offload_{part}_nvme_path"] and not settings["file"]:
            raise UserError(f"{name}: --offload_{part}_device nvme needs --offload_{part}_nvme_path (a folder on the "
                            "NVMe drive)")


def _config_file(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            loaded = json.load(handle)
    except OSError as err:
        raise UserError(f"--deepspeed_config_file {path}: cannot read it ({err.strerror}); check the path") from None
    except json.JSONDecodeError as err:
        raise UserError(f"--deepspeed_config_file {path}: not JSON ({err.msg}, line {err.lineno}); fix the "
                        "file") from None
    if not isinstance(loaded, dict):
        raise UserError(f"--deepspeed_config_file {path}: expected a JSON object at the top; fix the file")
    decided = [key for key in FROM_COMMAND_LINE if key in loaded and (
        key in ("optimizer", "scheduler") or not isinstance(loaded[key], dict) or _flag(loaded[key].get("enabled")))]
    if decided:
        raise UserError(f"--deepspeed_config_file {path}: remove {', '.join(repr(k) for k in decided)}: the optimizer, "
                        "learning-rate schedule and precision come from the trainer's options")
    return loaded


def engine_config(config, settings: dict, *, processes: int) -> dict:
    """DeepSpeed's JSON config: the batch sizes and clipping from the trainer's options (a config file's "auto" or
    missing values are filled with them, as accelerate does), ZeRO from `settings`."""
    micro = config.train_batch_size
    accumulation = config.gradient_accumulation_steps or 1
    ours = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accumulation,
            "train_batch_size": micro * accumulation * processes, "gradient_clipping": config.max_grad_norm or 0.0}
    result = _config_file(settings["file"]) if settings.get("file") else {}
    for key, value in ours.items():
        if result.get(key, "auto") == "auto":
            result[key] = value
        elif result[key] != value:
            raise UserError(f"--deepspeed_config_file {settings['file']}: {key} is {result[key]!r} but the trainer's "
                            f"options make it {value!r}; set it to \"auto\"")
    zero = result.setdefault("zero_optimization", {})
    if not settings.get("file") or "stage" not in zero:
        zero["stage"] = settings["stage"]
    for part in ("optimizer", "param"):
        device = settings[f"offload_{part}"]
        if device is not None:
            zero[f"offload_{part}"] = {"device": device, "nvme_path": settings[f"offload_{part}_nvme_path"],
                                       "pin_memory": torch.cuda.is_available()}
    result.setdefault("zero_allow_untested_optimizer", True)  # any torch optimizer the trainer builds
    result.setdefault("zero_force_ds_cpu_optimizer", False)  # ... also with the optimizer state offloaded
    result.setdefault("steps_per_print", 2**31 - 1)  # the progress bar and TensorBoard report, not DeepSpeed
    result.setdefault("wall_clock_breakdown", False)
    return result


class ZeroEngine:
    """The trained models and the optimizer in a DeepSpeed engine, in the loop's GradientSync shape plus `backward`
    and `step`. Built after the optimizer (whose param groups and learning rates the loop's scheduler keeps
    driving) and before the first step."""

    def __init__(self, modules: list[torch.nn.Module], optimizer, ds_config: dict):
        import warnings

        import deepspeed

        # DeepSpeed's collectives use names torch now calls deprecated: a warning per step says nothing to a user.
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
        self.stage = ds_config["zero_optimization"]["stage"]
        self.wrapper = _TrainedModels(modules)
        raw = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
        _one_process_group()
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=self.wrapper, optimizer=raw, config=ds_config)

    def loss(self, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        return self.engine(compute)  # stage 3 gathers each module's weights as the forward reaches it

    @contextlib.contextmanager
    def micro_batch(self, boundary: bool) -> Iterator[None]:
        self.engine.set_gradient_accumulation_boundary(boundary)  # the loop knows where an epoch ends early
        yield

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the loop already divided by the accumulation steps

    def step(self) -> None:
        self.engine.step()  # reduce, clip at gradient_clipping, optimizer step, zero the gradients

    def finish(self) -> None:
        pass

    def close(self) -> None:
        pass

    @contextlib.contextmanager
    def full_weights(self, method) -> Iterator[None]:
        """On every process, around a save (a collective at stage 3): the models hold their full weights."""
        if self.stage != 3:
            yield  # every process keeps the full, identical weights
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.wrapper.parameters()), modifier_rank=None):
            yield


def _one_process_group() -> None:
    """DeepSpeed needs a process group even for one process (ZeRO-Offload on one GPU): launched without one (plain
    `python train_db.py`), this process is rank 0 of 1 on a free local port."""
    import socket

    import torch.distributed as dist

    if dist.is_initialized() or "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1"),
                        ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port))):
        os.environ.setdefault(name, value)


def zero_engine(method, config, settings: dict, optimizer, *, processes: int, say=print) -> ZeroEngine | None:
    """The engine over the models the method trains whole, or None when nothing does."""
    modules, _ = method.data_parallel_modules()
    if not modules:
        return None
    ds_config = engine_config(config, settings, processes=processes)
    engine = ZeroEngine(modules, optimizer, ds_config)
    offload = {k: settings[k] for k in ("offload_optimizer", "offload_param") if settings[k]}
    say(f"DeepSpeed ZeRO stage {engine.stage}: {len(modules)} trained model(s) over {processes} process(es)"
        + "".join(f", {k.replace('_', ' ')} to {v}" for k, v in offload.items()))
    return engine
