"""What happens around the steps: progress, TensorBoard scalars, saves (cadence, rotation, metadata, state), samples."""

from __future__ import annotations

import contextlib
import random
import shutil
import time
from pathlib import Path

import psutil
from tqdm.auto import tqdm

from library.config.run_config import RunConfig
from library.errors import UserError
from library.models.saving import save_dtype
from library.safe_write import atomic_dir, shared_temp_dir, size_on_disk, space_warning, write_failure
from library.training import checkpoints as ck

EXTENSIONS = {"safetensors": ".safetensors", "pt": ".pt", "ckpt": ".ckpt", "diffusers": "", "diffusers_safetensors": ""}


def tracker_settings(config: RunConfig) -> tuple[str | None, str | None]:
    """(log_with, run folder): TensorBoard under <logging_dir>/<log_prefix><timestamp>, as sd-scripts names it."""
    log_with = config.log_with or ("tensorboard" if config.logging_dir else None)
    if not log_with:
        return None, None
    folder = Path(config.logging_dir or "logs") / f"{config.log_prefix or ''}{time.strftime('%Y%m%d%H%M%S')}"
    return log_with, str(folder)


# Left out of --log_config's record, as sd-scripts' get_sanitized_config_or_none leaves them out: secrets, and paths
# that say where a user keeps their files.
NOT_LOGGED = ("wandb_api_key", "huggingface_token", "pretrained_model_name_or_path", "vae", "tokenizer_cache_dir",
              "train_data_dir", "conditioning_data_dir", "reg_data_dir", "output_dir", "logging_dir")


def logged_config(config: RunConfig) -> dict | None:
    """--log_config: the run's options for the trackers (TensorBoard's hparams), secrets and paths left out; a list
    becomes one comma-separated string. None without it, as in sd-scripts."""
    if not config.get("log_config"):
        return None
    logged = {}
    for name, value in config.items():
        if name in NOT_LOGGED:
            continue
        if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float, str, bool)) for v in value):
            value = ", ".join(map(str, value))
        if isinstance(value, (int, float, str, bool)):
            logged[name] = value
    return logged


def tracker_init_kwargs(config: RunConfig) -> dict:
    """Each tracker's own init arguments: --log_tracker_config's TOML tables ([wandb], [tensorboard], ...), else
    --wandb_run_name as wandb's run name (sd-scripts: the file, when given, replaces the name)."""
    if config.get("log_tracker_config"):
        from library.config.config_text import parse_toml

        path = Path(config.log_tracker_config)
        return parse_toml(path.read_text(encoding="utf-8"), path)
    return {"wandb": {"name": config.wandb_run_name}} if config.get("wandb_run_name") else {}


class Reporter:
    def __init__(self, config: RunConfig, plan, parts, method, accelerator, *, optimizer_name, optimizer_kwargs,
                 descriptions, started, max_steps, epochs, save_ext):
        self.config, self.plan, self.parts, self.method, self.accelerator = config, plan, parts, method, accelerator
        self.optimizer_name, self.optimizer_kwargs = optimizer_name, optimizer_kwargs
        self.descriptions, self.started, self.max_steps, self.epochs = descriptions, started, max_steps, epochs
        self.ext = EXTENSIONS.get(config.save_model_as or "safetensors", save_ext)
        self.output_dir = Path(config.output_dir)
        self.name = config.output_name
        self._metadata = None
        self._sizes: dict[str, int] = {}  # bytes of the last model / state saved, to warn before the next
        self.epoch_losses: list[float] = []
        self.validator = None  # library.training.validation.Validator when the run holds validation images
        self.posthoc = None  # library.training.posthoc_ema.PosthocTracker with --posthoc_ema
        self.control = None  # library.training.live_control.LiveControl while training
        self.stop_requested = False  # a live-control `stop`: the loop ends after the current step
        self.validation_losses: list[tuple[int, int | None, float]] = []  # (step, epoch or None, loss)
        self.first_step_at = None
        self.prompts = []
        if config.sample_prompts:
            from library.training.sampling import load_prompts

            self.prompts = load_prompts(config.sample_prompts)
        if accelerator.log_with:
            accelerator.init_trackers(config.log_tracker_name or "network_train", config=logged_config(config),
                                      init_kwargs=tracker_init_kwargs(config))
        self.bar = tqdm(total=max_steps, desc="steps", disable=not accelerator.is_local_main_process)

    # ------------------------------------------------------------------ hooks
    def begin(self, step: int) -> None:
        self.bar.update(step)
        self.first_step_at = None
        self.last_save_at = time.time()  # --save_every_n_minutes counts from here and from each save
        self.timed_save = None  # the file the last on-time save wrote
        # Everything before the first step (imports, model loading, latent caching) as one figure, timed from the
        # process's own start so the figure is what the user waited.
        self.accelerator.print(f"training starts {time.time() - psutil.Process().create_time():.1f} s after launch")
        if self.config.sample_at_first:
            self._sample(step=step, epoch=None)
        self.loop_started = time.time()  # after the first samples: "first step took" is the step alone
        self.aside = 0.0  # seconds spent saving and sampling since the first step, left out of s/step

    def after_step(self, state: ck.TrainState, loss: float, lr_scheduler) -> None:
        if self.first_step_at is None:
            self.first_step_at = time.time()
            self.accelerator.print(f"first step took {self.first_step_at - self.loop_started:.1f} s")
        self.epoch_losses.append(loss)
        average = sum(self.epoch_losses) / len(self.epoch_losses)
        lrs = lr_scheduler.get_last_lr()
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", avg=f"{average:.4f}", lr=f"{lrs[-1]:.2e}")
        logs = {"loss/current": loss, "loss/average": average}
        logs |= {f"lr/{name}": lr for name, lr in zip(self.descriptions, lrs)}
        logs |= self.method.step_logs()  # e.g. max-norm figures; the step's work is done, so reading them waits not
        self.accelerator.log(logs, step=state.global_step)
        with self._set_aside():
            if self.posthoc is not None:
                self.posthoc.update()
                if self.posthoc.due(state.global_step):
                    self._posthoc_snapshot(state)
            every = self.config.save_every_n_steps
            if every and state.global_step % every == 0 and state.global_step < self.max_steps:
                self._save(ck.step_name(self.name, state.global_step, self.ext), state)
                self._rotate(state, by_step=True)
            elif self._minutes_up(state):
                self._save_on_time(state)
            if self._should_sample(step=state.global_step, epoch=None):
                self._sample(step=state.global_step, epoch=None)
            every = self.config.get("validate_every_n_steps")
            if self.validator is not None and every and state.global_step % every == 0:
                self._validate("step", state.global_step, average, step=state.global_step)
            if self.control is not None:
                self._follow(self.control.requests(), state)

    def _follow(self, commands: tuple[str, ...], state: ck.TrainState) -> None:
        """Live control (library/training/live_control.py): do what was asked, after this step."""
        name = ck.step_name(self.name, state.global_step, self.ext)
        for command in commands:
            if command == "sample":
                if self.prompts:
                    self._sample(step=state.global_step, epoch=None)
                else:
                    self.accelerator.print("control: no sample without --sample_prompts")
            elif command == "save" and "state" not in commands:
                self._save(name, state, with_state=False)
            elif command == "state":
                self._save(name, state, with_state=True)
            elif command == "stop":
                self.stop_requested = True

    def _minutes_up(self, state: ck.TrainState) -> bool:
        """--save_every_n_minutes: whether that long has passed since the last save (or the first step). Several
        processes must agree, so the main process's clock decides (one small collective per step, only with it)."""
        minutes = self.config.get("save_every_n_minutes")
        if not minutes or state.global_step >= self.max_steps:
            return False
        due = time.time() - self.last_save_at >= minutes * 60
        if self.accelerator.num_processes == 1:
            return due
        import torch

        flag = torch.tensor([int(due and self.accelerator.is_main_process)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item())

    def _save_on_time(self, state: ck.TrainState) -> None:
        """A step file (and its state with --save_state); the previous one saved on time goes once this one is
        written, so they do not pile up (saves made on the step or epoch cadence stay theirs to rotate)."""
        name = ck.step_name(self.name, state.global_step, self.ext)
        self._save(name, state)
        self.accelerator.print(f"saved on time (--save_every_n_minutes {self.config.save_every_n_minutes:g})")
        previous, self.timed_save = self.timed_save, name
        if previous is not None and previous != name and self.accelerator.is_main_process:
            target = self.output_dir / previous
            ck.remove_saved(target, self.ext)
            ck.remove_quietly(target.with_name(_stem(previous, self.ext) + "-state"))

    def after_epoch(self, state: ck.TrainState, epoch: int) -> None:
        average = sum(self.epoch_losses) / len(self.epoch_losses) if self.epoch_losses else None
        if average is not None:
            self.accelerator.log({"loss/epoch": average}, step=epoch)
        self.epoch_losses = []
        with self._set_aside():
            self.validate_epoch(state, epoch, average)
            every = self.config.save_every_n_epochs
            if every and epoch % every == 0 and epoch < self.epochs:
                self._save(ck.epoch_name(self.name, epoch, self.ext), state, epoch=epoch)
                self._rotate(state, by_step=False, epoch=epoch)
            if self._should_sample(step=state.global_step, epoch=epoch):
                self._sample(step=state.global_step, epoch=epoch)

    def validate_epoch(self, state: ck.TrainState, epoch: int, average: float | None = None) -> None:
        """The epoch's validation, when due (every epoch, or every --validate_every_n_epochs); also for the last,
        partial epoch of a run that --max_train_steps ends mid-epoch, as sd-scripts."""
        every = self.config.get("validate_every_n_epochs")
        if self.validator is not None and (not every or epoch % every == 0):
            if average is None and self.epoch_losses:
                average = sum(self.epoch_losses) / len(self.epoch_losses)
            self._validate("epoch", state.global_step, average, step=epoch, epoch=epoch)

    def _validate(self, kind: str, global_step: int, training: float | None, *, step: int,
                  epoch: int | None = None) -> None:
        """One validation, logged as sd-scripts names it: loss/validation/{step,epoch}_average, and _divergence (minus
        the training loss's average of the epoch so far)."""
        last = self.validation_losses[-1] if self.validation_losses else None
        # An epoch ending on a step that was just validated: the same weights, so the same figure (not scored again).
        loss = last[2] if last is not None and last[0] == global_step else self.validator.loss()
        self.validation_losses.append((global_step, epoch, loss))
        logs = {f"loss/validation/{kind}_average": loss}
        if training is not None:
            logs[f"loss/validation/{kind}_divergence"] = loss - training
        self.accelerator.log(logs, step=step)
        where = f"epoch {epoch}" if epoch is not None else f"step {global_step}"
        self.accelerator.print(f"validation loss {loss:.4f} at {where} ({self.validator.images} images, "
                               f"{self.validator.batches} batches x {len(self.validator.timesteps)} timesteps)")

    @contextlib.contextmanager
    def _set_aside(self):
        """Time saves and samples take: the s/step figure is the training steps' own pace."""
        started = time.time()
        try:
            yield
        finally:
            self.aside += time.time() - started

    def finish(self, state: ck.TrainState) -> Path | None:
        self.bar.close()
        if self.first_step_at is not None and state.global_step > 1:
            pace = (time.time() - self.first_step_at - self.aside) / (state.global_step - 1)
            self.accelerator.print(f"trained {state.global_step} steps: {pace:.3f} s/step after the first step "
                                   f"(saving and sampling, {self.aside:.1f} s, left out)")
        concepts = getattr(self.method, "concept_losses", None)
        for line in concepts.summary_lines() if concepts is not None else ():
            self.accelerator.print(line)
        if self.posthoc is not None and state.global_step and self.posthoc.last_snapshot != state.global_step:
            self._posthoc_snapshot(state)
        path = self._save(ck.last_name(self.name, self.ext), state, last=True,
                          with_state=self.config.save_state or self.config.save_state_on_train_end)
        self.accelerator.end_training()
        return path

    def interrupted(self, state: ck.TrainState, why: str = "interrupted") -> None:
        """Ctrl+C or SIGTERM: keep what was learnt — the adapter and a state to resume from — then stop."""
        self.bar.close()
        self.accelerator.print(f"\n{why} at step {state.global_step}: saving before stopping")
        path = self._save(ck.step_name(self.name, state.global_step, self.ext), state, force_state=True)
        self.accelerator.print(f"{why} at step {state.global_step}: saved {path} and its -state folder "
                               "(continue with --resume)")

    # ------------------------------------------------------------------ saving
    def metadata(self, state: ck.TrainState, epoch: int) -> dict[str, str]:
        from library.formats.kohya_metadata import file_hashes, modelspec_from_config, saved_metadata, training_metadata

        if self._metadata is None:  # built at the first save: hashing the base model stays out of time-to-first-step
            config = self.config.replace(v_parameterization=self.parts.v_parameterization)
            self._metadata = training_metadata(
                config, self.plan, session_id=random.randint(0, 2**32), training_started_at=self.started,
                optimizer=self.optimizer_name, optimizer_kwargs=self.optimizer_kwargs,
                sd_model_hashes=file_hashes(self.config.pretrained_model_name_or_path),
                num_validation_images=self.plan.validation_images,
                vae_hashes=file_hashes(self.config.vae) if self.config.vae else None, family=self.parts.family)
            self._modelspec = modelspec_from_config(config, timestamp=self.started, family=self.parts.family)
        return saved_metadata(self._metadata, steps=state.global_step, epoch=epoch, finished_at=time.time(),
                              modelspec=self._modelspec, no_metadata=bool(self.config.get("no_metadata")))

    def _save(self, file_name: str, state: ck.TrainState, *, epoch: int | None = None, last: bool = False,
              with_state: bool | None = None, force_state: bool = False) -> Path:
        self.last_save_at = time.time()
        path = self.output_dir / file_name
        self.accelerator.wait_for_everyone()
        _check_finite(self.method, state)
        self._together(lambda: self._export(path, state, epoch, last), path, main_only=True)
        if force_state or (self.config.save_state if with_state is None else with_state):
            self._save_state(path, state)
        return path

    def _export(self, path: Path, state: ck.TrainState, epoch: int | None, last: bool) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._warn_if_short(path, "model")
        metadata = self.metadata(state, epoch if epoch is not None else (self.epochs if last else state.epoch))
        self.method.export(path, dtype=save_dtype(self.config.save_precision, None), metadata=metadata,
                           epoch=epoch if epoch is not None else state.epoch, global_step=state.global_step)
        self._sizes["model"] = size_on_disk(path)
        self.accelerator.print(f"saved {path}")

    def _posthoc_snapshot(self, state: ck.TrainState) -> None:
        """--posthoc_ema: each tracked EMA written in the run's own format (float32, no self-test line)."""
        metadata = self.metadata(state, state.epoch)

        def export(path: Path) -> None:
            self.method.export(path, dtype=None, metadata=metadata, epoch=state.epoch, global_step=state.global_step,
                               check=False)

        folder = self.posthoc.folder
        self._together(lambda: self.posthoc.write(state.global_step, self.name, self.ext, export), folder,
                       main_only=True)
        self.accelerator.print(f"post-hoc EMA: snapshots at step {state.global_step} in {folder}")

    def _save_state(self, model_path: Path, state: ck.TrainState) -> Path:
        """accelerate's files and train_state.json, written into a temporary folder every process agrees on, then
        renamed into place by the main process: a state folder under its real name is always complete."""
        folder = model_path.with_name(_stem(model_path.name, self.ext) + "-state")
        tmp = shared_temp_dir(folder)

        def prepare() -> None:
            self._warn_if_short(folder, "state")
            shutil.rmtree(tmp, ignore_errors=True)  # what a killed save of this same name left
            tmp.mkdir(parents=True)

        def publish() -> None:
            with atomic_dir(folder, temp=tmp) as ready:
                state.write(ready)
            self._sizes["state"] = size_on_disk(folder)
            self.accelerator.print(f"saved {folder}")

        drop = lambda: shutil.rmtree(tmp, ignore_errors=True)  # noqa: E731
        self._together(prepare, folder, main_only=True, cleanup=drop)
        self._together(lambda: self.accelerator.save_state(str(tmp)), folder, main_only=False, cleanup=drop)
        self._together(publish, folder, main_only=True, cleanup=drop)
        return folder

    def _together(self, action, target: Path, *, main_only: bool, cleanup=None) -> None:
        """Run one part of a save (on the main process, or on each) and stop every process when any failed: one
        left waiting at the next collective would hang the run. A full disk is one line naming `target`."""
        error = None
        if self.accelerator.is_main_process or not main_only:
            try:
                action()
            except Exception as err:  # noqa: BLE001 - re-raised below, as one line when the disk refused the write
                error = write_failure(err, target) or err
            except BaseException:  # Ctrl+C / SIGTERM mid-save: drop the partial temporary, then stop as asked
                if cleanup is not None and self.accelerator.is_main_process:
                    cleanup()
                raise
        if not self._failed_anywhere(error is not None):
            return
        if cleanup is not None and self.accelerator.is_main_process:
            cleanup()
        if error is not None:
            raise error
        raise UserError(f"saving {target} failed on another process (its message is above); files saved before "
                        "are intact")

    def _failed_anywhere(self, failed: bool) -> bool:
        if self.accelerator.num_processes == 1:
            return failed
        import torch

        flag = torch.tensor([int(failed)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item())

    def _warn_if_short(self, target: Path, kind: str) -> None:
        """Before a save: warn when the disk has less room than the previous save of this kind took (or, for the
        first, than the trainable weights and, for a state, their two optimizer moments)."""
        needed = self._sizes.get(kind)
        if needed is None:
            weights = sum(p.numel() * p.element_size() for p in self.method.trainable_params())
            needed = weights if kind == "model" else 3 * weights
        warning = space_warning(target, needed)
        if warning:
            self.accelerator.print(warning)

    def _rotate(self, state: ck.TrainState, *, by_step: bool, epoch: int | None = None) -> None:
        if not self.accelerator.is_main_process:
            return
        for with_state in (False, True):
            if by_step:
                old = ck.step_to_remove(self.config, state.global_step, state=with_state)
                name = ck.step_name(self.name, old, self.ext) if old else None
            else:
                old = ck.epoch_to_remove(self.config, epoch, state=with_state)
                name = ck.epoch_name(self.name, old, self.ext) if old else None
            if name:
                target = self.output_dir / name
                if with_state:
                    ck.remove_quietly(target.with_name(_stem(name, self.ext) + "-state"))
                else:
                    ck.remove_saved(target, self.ext)

    # ------------------------------------------------------------------ samples
    def _should_sample(self, *, step: int, epoch: int | None) -> bool:
        if not self.prompts:
            return False
        from library.training.sampling import should_sample

        return should_sample(self.config, step=step, epoch=epoch, at_first=False)

    def _sample(self, *, step: int, epoch: int | None) -> None:
        if not self.prompts or not self.accelerator.is_main_process:
            return
        from library.training.sampling import sample_images

        tracker = self.accelerator.get_tracker("tensorboard", unwrap=True) if self.accelerator.log_with else None
        sample_images(self.parts, self.prompts, output_dir=self.output_dir, output_name=self.name, step=step,
                      epoch=epoch, default_sampler=self.config.sample_sampler, device=self.accelerator.device,
                      dtype=self.parts.unet.dtype, encode=self.method.encode_prompts, tracker=tracker,
                      extra_modules=self.method.sampling_modules())


def _check_finite(method, state: ck.TrainState) -> None:
    """A step can overflow the weights while its own loss (computed before the update) was still finite: never save
    inf/NaN weights over a good file."""
    import torch

    if not all(bool(torch.isfinite(p).all()) for p in method.trainable_params()):
        raise UserError(f"the trained weights became inf/NaN by step {state.global_step} (epoch {state.epoch}), so "
                        "training stopped without saving them (files saved before are intact): lower "
                        "--learning_rate, use --mixed_precision bf16 rather than fp16, add --max_grad_norm 1.0, "
                        "and resume from the last --save_state")


def _stem(name: str, ext: str) -> str:
    """The output name without its extension; a diffusers folder has none ("")."""
    return name[: len(name) - len(ext)]
