"""The one training loop: accelerate-driven, resumable, shared by every method (network, dreambooth, ...).

Reads top to bottom: set up → cache latents → batches → for each batch: loss, backward, (every accumulation
boundary) average gradients over processes, clip, step → log · save · sample. The method decides what trains and
what a loss is; library/training/distributed.py how gradients are averaged (DDP, or bucketed hooks for adapters),
or sharded (FSDP2), and library/training/zero.py the DeepSpeed engine that takes backward and the step over.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, set_seed

from library.config.run_config import RunConfig
from library.data.dataset import TrainingDataset
from library.data.plan import RunPlan
from library.errors import Interrupted, UserError
from library.training import checkpoints as ck
from library.training.compiling import compile_unet
from library.training.conv_matmul import use_matmul_convs
from library.training.data_loading import EpochBatchSampler, make_loader
from library.training.distributed import (FullySharded, GradientSync, check_ddp_options, fully_shard_trained,
                                          gradient_sync, hidden_from_accelerate, sharding_requested, trainable_key)
from library.training.fused_backward import FusedBackward, check_fused_backward, fused_flag
from library.training.latents import build_latent_cache, loader_workers
from library.training.live_control import LiveControl
from library.training.optimizers import make_optimizer
from library.training.precision import bf16_tip
from library.training.posthoc_ema import make_tracker
from library.training.reporting import Reporter, tracker_settings
from library.training.schedulers import make_scheduler
from library.training.validation import make_validator
from library.training.zero import ZeroEngine, deepspeed_requested, refuse_unsupported, zero_engine

PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class TrainingResult:
    final_file: Path | None
    global_step: int
    losses: list[float] = field(default_factory=list)  # per optimizer step, this process
    validation_losses: list[tuple] = field(default_factory=list)  # (step, epoch or None, loss) per validation
    method: object = None  # what was trained (e.g. NetworkMethod: .network), for callers and tests


def weight_dtype(config: RunConfig, device: torch.device) -> torch.dtype:
    """The frozen models' dtype under mixed precision; float32 for fp16 on a CPU, where autocast does not cast."""
    if device.type == "cpu" and config.mixed_precision == "fp16":
        return torch.float32
    return PRECISIONS.get(config.mixed_precision, torch.float32)


def batch_seed(seed: int, epoch: int, index: int) -> int:
    """Noise and timesteps of a batch depend only on (seed, epoch, batch): resumes and DDP shards reproduce them."""
    return random.Random(f"{seed}/{epoch}/{index}/noise").getrandbits(63)


def train(config: RunConfig, plan: RunPlan, parts, make_method, *, save_ext: str = ".safetensors") -> TrainingResult:
    log_with, logging_dir = tracker_settings(config)
    # accelerate keeps one state per process; a second run in the same process (tools, tests) starts afresh.
    AcceleratorState._reset_state(reset_partial_state=False)
    sharding = sharding_requested()  # accelerate launch --use_fsdp: sharded here, with FSDP2, not by accelerate
    deepspeed = deepspeed_requested(config)  # --deepspeed: the engine is built here too (library/training/zero.py)
    if sharding and deepspeed:
        raise UserError("--use_fsdp and DeepSpeed (--deepspeed or --use_deepspeed) both shard the model: choose one")
    with hidden_from_accelerate("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available(),
                                  log_with=log_with, project_dir=logging_dir,
                                  kwargs_handlers=process_group_kwargs(config))
    refuse_sharding(accelerator.distributed_type)
    seed = config.seed if config.seed is not None else random.randint(0, 2**32 - 1)
    config = config.replace(seed=seed)
    set_seed(seed)
    started = time.time()
    if accelerator.device.type == "cpu" and config.mixed_precision == "fp16":
        accelerator.print("mixed_precision fp16 on a CPU: computing in float32 (CPUs have no fp16 autocast)")
    tip = bf16_tip(config.mixed_precision, accelerator.device.type)
    if tip:
        accelerator.print(tip)
    method = make_method(config, parts, accelerator.device, weight_dtype(config, accelerator.device), plan)
    if deepspeed:
        refuse_unsupported(method, config, deepspeed)
    if accelerator.device.type == "cpu":  # oneDNN re-lays weights out per call: slow for the UNet's deep, small convs
        use_matmul_convs(parts.unet)
    # FSDP replaces the trained parameters with shards: before anything (param groups, optimizer) holds them.
    sharded = fully_shard_trained(method, config, sharding, processes=accelerator.num_processes) if sharding else None

    method.texts_ready(plan)
    latent_cache = build_latent_cache(config, plan, parts, accelerator)
    # Latents still waiting are encoded as training first needs them; _Loop calls latents_ready again when all are.
    method.latents_ready(all_cached=latent_cache is not None and not latent_cache.waiting)
    dataset = TrainingDataset(plan, seed=seed, max_train_steps=config.max_train_steps, latent_cache=latent_cache,
                              caption_transform=method.caption_transform, caption_variants=method.caption_variants)
    procs, accumulation = accelerator.num_processes, config.gradient_accumulation_steps or 1
    per_epoch = len(dataset)
    steps_per_epoch = math.ceil(per_epoch / procs / accumulation)
    max_steps = config.max_train_epochs * steps_per_epoch if config.max_train_epochs else config.max_train_steps
    epochs = math.ceil(max_steps / steps_per_epoch)
    if config.get("save_n_epoch_ratio"):  # sd-scripts: about N saves over the run, overriding save_every_n_epochs
        config = config.replace(save_every_n_epochs=math.floor(epochs / config.save_n_epoch_ratio) or 1)

    check_fused_backward(config, processes=procs, device=accelerator.device)
    check_ddp_options(config)
    groups, descriptions = method.param_groups()
    optimizer, optimizer_name, optimizer_kwargs = make_optimizer(config, groups)
    lr_scheduler = make_scheduler(config, optimizer, num_training_steps=max_steps, num_processes=procs,
                                  step_offset=method.step_offset)
    optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
    # DeepSpeed takes the optimizer over (partitioning its state); the scheduler keeps setting its learning rates.
    engine = zero_engine(method, config, deepspeed, optimizer, processes=procs,
                         say=accelerator.print) if deepspeed else None
    sharded = sharded or engine
    fused = FusedBackward(optimizer, method.trainable_params(), config.max_grad_norm,
                          groups=config.get("fused_optimizer_groups")) if fused_flag(config) else None
    for stateful in method.checkpoint_objects():
        accelerator.register_for_checkpointing(stateful)
    posthoc = make_tracker(config, method, max_steps)  # --posthoc_ema: its EMAs are part of a saved state
    if posthoc is not None:
        accelerator.register_for_checkpointing(posthoc)

    state = ck.TrainState(0, 1, 0)
    if config.resume:
        folder = ck.resume_folder(Path(config.resume), ck.required_state_files(accelerator), say=accelerator.print)
        state = ck.TrainState.read(folder)
        _load_state(accelerator, folder)
        accelerator.print(f"resumed from {folder} at step {state.global_step} (epoch {state.epoch})")
    start = initial_position(config, steps_per_epoch=steps_per_epoch, batches_per_step=procs * accumulation,
                             per_epoch=per_epoch, max_steps=max_steps)
    if start is not None:
        if config.resume:
            accelerator.print(f"--initial_step/--initial_epoch: starting at step {start.global_step}, not at the "
                              f"state's step {state.global_step} (as sd-scripts)")
        state = start
        skipped = f", skipping its first {start.batch_in_epoch} batches" if start.batch_in_epoch else ""
        accelerator.print(f"starting at step {start.global_step} (epoch {start.epoch}{skipped}); the learning-rate "
                          "schedule starts from its beginning" + ("" if config.resume else " (no --resume)"))
    sampler = EpochBatchSampler(per_epoch, start_epoch=state.epoch, epochs=epochs, skip=state.batch_in_epoch)
    loader = accelerator.prepare_data_loader(
        make_loader(dataset, sampler, workers=loader_workers(config, latent_cache, accelerator.print),
                    persistent=bool(config.persistent_data_loader_workers), batches_per_step=procs * accumulation),
        device_placement=False)

    if config.get("torch_compile"):  # after resuming: the adapters' alpha is final now
        compile_unet(config, parts, method, say=accelerator.print)
    reporter = (Reporter if sharded is None else partial(_ShardedReporter, sharded))(
        config, plan, parts, method, accelerator, optimizer_name=optimizer_name, optimizer_kwargs=optimizer_kwargs,
        descriptions=descriptions, started=started, max_steps=max_steps, epochs=epochs, save_ext=save_ext)
    reporter.posthoc = posthoc
    reporter.validator = make_validator(config, plan, method, accelerator, latent_cache, sharded=sharded)
    reporter.begin(state.global_step)
    loop = _Loop(config, accelerator, method, optimizer, lr_scheduler, reporter, per_epoch, accumulation, max_steps,
                 fused=fused, latent_cache=latent_cache, sharded=sharded)
    reporter.control = LiveControl(config.output_dir, accelerator, say=accelerator.print)
    with reporter.control.listening():
        _run_until_done_or_stopped(loop, loader, state, reporter, fused)
    try:
        final = reporter.finish(loop.state)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted while saving the final files at step {loop.state.global_step}: files saved "
                          "before are intact (continue with --resume from the last -state folder)") from None
    return TrainingResult(final, loop.state.global_step, loop.losses, reporter.validation_losses, method)


def initial_position(config: RunConfig, *, steps_per_epoch: int, batches_per_step: int, per_epoch: int,
                     max_steps: int) -> ck.TrainState | None:
    """--initial_step N (or --initial_epoch E: N = (E - 1) × steps per epoch): the run counts on from step N (step
    names, logs, the save cadence, --max_train_steps), in the epoch step N falls in. With --skip_until_initial_step
    the data goes on where an uninterrupted run would be (the batches before are skipped unread, and each batch keeps
    its noise seed); without it that epoch's data starts from its beginning. The learning-rate schedule is not
    advanced (sd-scripts: "initial_epoch/step doesn't affect to lr scheduler"). sd-scripts' own arithmetic restarts
    the step count within the epoch and miscounts with gradient accumulation or several GPUs; this does not."""
    step = config.get("initial_step")
    if step is None and config.get("initial_epoch") is not None:
        step = (config.initial_epoch - 1) * steps_per_epoch
    if not step:
        return None
    if step >= max_steps:
        raise UserError(f"--initial_step {step} is not below the run's {max_steps} steps (--max_train_steps or "
                        "--max_train_epochs count the whole run, the steps before it included): raise them")
    epoch, done = divmod(step, steps_per_epoch)
    skip = min(per_epoch, done * batches_per_step) if config.get("skip_until_initial_step") else 0
    return ck.TrainState(step, epoch + 1, skip)


def process_group_kwargs(config: RunConfig) -> list:
    """--ddp_timeout N: the process group's timeout for a collective, in minutes (accelerate's default otherwise)."""
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs

    minutes = config.get("ddp_timeout")
    return [InitProcessGroupKwargs(timeout=timedelta(minutes=minutes))] if minutes else []


def refuse_sharding(distributed_type) -> None:
    """`accelerate launch --use_deepspeed` (or Megatron): the loop prepares no model with accelerate, so it would
    train unsharded replicas behind the user's back; one line instead. (--use_fsdp is handled here, with FSDP2, and
    hidden from accelerate: see library/training/distributed.py.)"""
    sharded = {DistributedType.FSDP: "--use_fsdp", DistributedType.DEEPSPEED: "--use_deepspeed",
               DistributedType.MEGATRON_LM: "--use_megatron_lm"}
    if distributed_type in sharded:
        raise UserError(f"accelerate launch {sharded[distributed_type]}: model sharding is not supported yet; launch "
                        "without it (several processes then train with DDP, each holding the whole model)")


class _ShardedReporter(Reporter):
    """Under FSDP (and DeepSpeed ZeRO 3) no process holds the full weights: every save gathers them on every process
    (a collective) so the main process's export writes the same model as without sharding. The optimizer state stays
    unsaved (its shards are refused up front with --save_state; an interrupted run keeps its model file only)."""

    def __init__(self, sharded: FullySharded | ZeroEngine, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sharded = sharded

    def _save(self, file_name, state, **kwargs):
        with self.sharded.full_weights(self.method):
            return super()._save(file_name, state, **kwargs)

    def _sample(self, *, step: int, epoch: int | None) -> None:
        """Every process gathers (a collective); the main process samples from the full models, as without sharding."""
        if not self.prompts:
            return
        method = self.method
        with self.sharded.full_weights(method):
            parts, encode = self.parts, method.encode_prompts
            if method.parts is not parts:  # FSDP: the main process holds full copies; prompts are encoded with them
                self.parts = method.parts
                method.encode_prompts = method.prompt_encoder_for(method.parts)
            try:
                super()._sample(step=step, epoch=epoch)
            finally:
                self.parts, method.encode_prompts = parts, encode

    def _save_state(self, model_path, state) -> None:
        self.accelerator.print(f"no -state folder beside {model_path} (sharded training states, FSDP's or DeepSpeed's, "
                               "are not saved)")


def _run_until_done_or_stopped(loop, loader, state, reporter, fused) -> None:
    """Train; on Ctrl+C or SIGTERM save the adapter and a state first, then exit with 128 + the signal number."""
    with _sigterm_interrupts() as received:
        try:
            loop.run(loader, state)
        except KeyboardInterrupt:
            step = loop.state.global_step
            try:
                reporter.interrupted(loop.state, "terminated (SIGTERM)" if received else "interrupted")
            except KeyboardInterrupt:
                raise Interrupted(f"interrupted again while saving at step {step}: that save was dropped, files "
                                  "saved before are intact (continue with --resume from the last -state folder)"
                                  ) from None
            raise SystemExit(128 + (received[0] if received else signal.SIGINT)) from None
        finally:
            reporter.bar.close()  # an error message then starts a line of its own, not after the bar
            if fused is not None:
                fused.remove()
            loop.close()


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, `docker stop`, a preempted cloud machine) stops training the way Ctrl+C does."""


@contextlib.contextmanager
def _sigterm_interrupts():
    """While training: SIGTERM raises _Terminated (once; a second one during the save is ignored). Yields the list
    that holds the signal number once one came. The previous handler is put back afterwards."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield received
        return

    def handler(signum, frame):
        if not received:
            received.append(signum)
            raise _Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def _load_state(accelerator, folder: Path) -> None:
    """accelerate's load_state; a state from a run with other options (network_dim, optimizer) is one line."""
    try:
        accelerator.load_state(str(folder))
    except (ValueError, KeyError, RuntimeError, EOFError, OSError) as err:
        if isinstance(err, torch.cuda.OutOfMemoryError):
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"--resume {folder}: its state does not fit this run ({first}); resume with the options of "
                        "the run that saved it (its <output_name>.config.toml)") from None


class _Loop:
    def __init__(self, config, accelerator, method, optimizer, lr_scheduler, reporter, per_epoch, accumulation,
                 max_steps, *, fused: FusedBackward | None = None, latent_cache=None,
                 sharded: FullySharded | ZeroEngine | None = None):
        self.sharded = sharded  # FSDP or DeepSpeed: the models reduce(-scatter) their own gradients
        self.engine = sharded if isinstance(sharded, ZeroEngine) else None  # DeepSpeed: owns backward and step
        self.fused = fused  # parameters were already stepped during backward (one by one, or in groups)
        self.latent_cache = latent_cache  # encodes latents as batches first need them, until all are stored
        self.config, self.accelerator, self.method = config, accelerator, method
        self.optimizer, self.lr_scheduler, self.reporter = optimizer, lr_scheduler, reporter
        self.per_epoch, self.accumulation, self.max_steps = per_epoch, accumulation, max_steps
        self.params = method.trainable_params()
        self.losses: list[float] = []
        self.state = ck.TrainState(0, 1, 0)
        # Several processes, or DeepSpeed (one process too); otherwise None and a step runs as on one process.
        self.sync: GradientSync | FullySharded | ZeroEngine | None = None

    def run(self, loader, state: ck.TrainState) -> None:
        try:
            self._run(loader, state)
        except BaseException as err:
            # The traceback holds every frame it passed through, the data loader's iterator among them: clearing
            # their locals lets the iterator shut its worker processes down now, not whenever the error is collected
            # (for a process that goes on, a test session or a notebook; at exit see data_loading's exit hook).
            traceback.clear_frames(err.__traceback__)
            raise

    def _run(self, loader, state: ck.TrainState) -> None:
        self.state = state
        procs = self.accelerator.num_processes
        local_per_epoch = math.ceil(self.per_epoch / procs)
        micro, pending = 0, []
        for epoch, index, batch in loader:
            if micro == 0:
                self.method.before_step(state.global_step)
                self._update_sync()
            if epoch != state.epoch:
                state.epoch, state.batch_in_epoch = epoch, 0
            local_index = index // procs
            end_of_epoch = local_index >= local_per_epoch - 1
            # known before the forward: gradients are averaged over processes in this micro-batch's backward only
            boundary = (micro + 1) % self.accumulation == 0 or end_of_epoch
            generator = torch.Generator(self.accelerator.device).manual_seed(batch_seed(self.config.seed, epoch, index))
            loss = self._forward_backward(batch, generator, boundary)
            pending.append(loss.detach())
            micro += 1
            state.batch_in_epoch = min(self.per_epoch, (local_index + 1) * procs)
            if boundary:
                self._step()
                state.global_step += 1
                self.method.after_step(state.global_step)
                # The last lazily encoded latents are stored: release the VAE as after an upfront cache.
                if self.latent_cache is not None and self.latent_cache.just_completed():
                    self.method.latents_ready(all_cached=True)
                # one host sync per optimizer step, for the log and the progress bar
                step_loss = float(torch.stack(pending).mean())
                if not math.isfinite(step_loss):
                    raise _diverged(step_loss, state.global_step, epoch)
                self.losses.append(step_loss)
                micro, pending = 0, []
                if end_of_epoch:
                    state.epoch, state.batch_in_epoch = epoch + 1, 0
                self.reporter.after_step(state, step_loss, self.lr_scheduler)
                if self.reporter.stop_requested:
                    self.accelerator.print(f"control: stopping after step {state.global_step}, as asked")
                    return
                if state.global_step >= self.max_steps:
                    if end_of_epoch:
                        self.reporter.after_epoch(state, epoch)
                    else:
                        self.reporter.validate_epoch(state, epoch)
                    return
            if end_of_epoch:
                micro, pending = 0, []
                self.reporter.after_epoch(state, epoch)

    def _forward_backward(self, batch, generator: torch.Generator, boundary: bool) -> torch.Tensor:
        if self.sync is None:
            with self.accelerator.autocast():
                loss = self.method.loss(batch, generator)
            self.accelerator.backward(loss / self.accumulation)
            return loss
        with self.sync.micro_batch(boundary):
            with self.accelerator.autocast():
                loss = self.sync.loss(lambda: self.method.loss(batch, generator))
            if self.engine is not None:
                self.engine.backward(loss / self.accumulation)
            else:
                self.accelerator.backward(loss / self.accumulation)
        return loss

    def _update_sync(self) -> None:
        """Under several processes: (re)build the gradient averaging for the parameters that train now; a method may
        freeze some between steps (the text encoder at --stop_text_encoder_training), which DDP must not wait for."""
        if self.sharded is not None:  # FSDP reduces only the gradients there are: frozen parameters need no rebuild
            self.sync = self.sharded  # (DeepSpeed runs on one process too: its engine steps the optimizer)
            return
        if self.accelerator.num_processes == 1 or self.fused is not None:
            return
        if self.sync is not None and self.sync.key == trainable_key(self.params):
            return
        first = self.sync is None
        self.close()
        self.sync = gradient_sync(self.method, self.params, first=first,
                                  static_graph=bool(self.config.get("ddp_static_graph")))

    def close(self) -> None:
        if self.sync is not None:
            self.sync.close()
            self.sync = None

    def _step(self) -> None:
        if self.fused is not None:
            self.fused.flush()
            self.lr_scheduler.step()
            return
        if self.engine is not None:
            self.engine.step()  # DeepSpeed reduces, clips, steps and zeroes the gradients itself
            self.lr_scheduler.step()
            return
        params = [p for p in self.params if p.requires_grad]  # a method may freeze some mid-run (text encoder)
        if self.sync is not None:
            self.sync.finish()
        max_norm = self.config.max_grad_norm
        if max_norm:
            self.accelerator.clip_grad_norm_(params, max_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


def _diverged(loss: float, step: int, epoch: int) -> UserError:
    # Its update has already made the weights non-finite: stop before any save can write them.
    return UserError(f"the loss became {loss} at step {step} (epoch {epoch}), so training stopped without saving "
                     "it (files saved before are intact): lower --learning_rate, use --mixed_precision bf16 rather "
                     "than fp16 (or --no_half_vae), add --max_grad_norm 1.0, and resume from the last --save_state")

