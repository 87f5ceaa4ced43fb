"""The path every entry script takes: resolve options, refuse what is not supported, check the data, then run."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Callable, Sequence

from library.config.checks import check_value
from library.config.declarations import OPTIONS
from library.config.resolve import check_supported, options_for, resolve, write_resolved_config
from library.config.run_config import RunConfig
from library.console import console_log, quiet_libraries, whole_lines
from library.errors import Interrupted, UserError


def declared_option(name: str):
    return next(o for o in OPTIONS if o.name == name)


def has_dataset(config: RunConfig) -> bool:
    return bool(config.get("train_data_dir") or config.get("dataset_config") or config.get("in_json"))


def dry_run(config: RunConfig) -> None:
    """Print the full plan, every image fully checked; options only later issues implement are tolerated."""
    check_supported(config, OPTIONS, include_later=False)
    if not has_dataset(config):
        raise UserError("--dry_run checks a dataset: give --train_data_dir, --in_json or --dataset_config")
    from library.data.plan import plan_run, print_plan

    plan = plan_run(config, verify=True)
    plan.problems.extend(family_option_problems(config, plan))  # e.g. SDXL's bucket steps: the run would refuse
    print_plan(plan, verbose=True)
    _print_text_cache(config, plan)
    _print_bf16_tip(config)


def _print_text_cache(config: RunConfig, plan) -> None:
    """With a text-encoder cache: how many captions it holds and its size for the family's full-size model (the
    variants of captions that vary, drawn as the run will draw them)."""
    if not (config.get("cache_text_encoder_outputs") or config.get("cache_text_encoder_outputs_to_disk")):
        return
    from library.data.caption_variants import plan_text_cache
    from library.models.family import family_from_flags

    half = config.mixed_precision in ("fp16", "bf16")
    cache = plan_text_cache((e for d in [*plan.datasets, *plan.validation] for e in d.entries),
                            family=family_from_flags(config), max_token_length=config.max_token_length,
                            element_bytes=2 if half else 4, option=config.get("caption_variants"),
                            seed=config.seed or 0, max_train_steps=config.max_train_steps)
    print(cache.describe())


def _print_bf16_tip(config: RunConfig) -> None:
    import torch

    from library.training.precision import bf16_tip

    tip = bf16_tip(config.mixed_precision, "cuda" if torch.cuda.is_available() else "cpu")
    if tip:
        print(tip)


def start(argv: Sequence[str] | None, script: str, description: str, run: Callable[[RunConfig, object], object],
          *, families: Sequence[str] = ("sd1", "sd2")):
    """Resolve `argv` for `script`; a dry run prints the plan, a real run checks the base model's header, then the
    data before any weights load, then calls `run(config, plan)` (whose load_base_model saves the resolved options
    once the models are loaded) and returns its result. `families`: the model families the script trains (as in
    sd-scripts: SD 1.x/2.x, or SDXL for sdxl_train_network.py); other models are refused, and a single family's
    rules are checked on the options before the data is scanned."""
    whole_lines()  # before the options are resolved: every rank may warn about them
    try:
        return _start(argv, script, description, run, tuple(families))
    except KeyboardInterrupt:
        # The training loop saves on Ctrl+C itself; one reaching here came before it (options, data, models, cache).
        raise Interrupted("interrupted during start-up, before training began: no model or state was saved") from None


def _start(argv, script, description, run, families):
    config = resolve(argv, script, OPTIONS, description, families=families)
    # Ranks other than 0 (DDP) filter their console lines too but leave the file to rank 0.
    with console_log(config.get("console_log_level"), config.get("console_log_file"),
                     main_process=os.environ.get("RANK", "0") == "0"):
        return _start_resolved(config, run)


def _start_resolved(config: RunConfig, run):
    if config.get("token_string") and not config.output_name:
        config = config.replace(output_name=config.token_string)  # sd-scripts names an embedding after its token
        check_value(declared_option("output_name"), config.output_name,
                    f"--token_string {config.token_string} (used as --output_name)")
    if config.dry_run:
        dry_run(config)
        return None
    check_supported(config, OPTIONS)
    quiet_libraries()
    # The base model's header first: a LoRA or a truncated download is refused in seconds, not after the scan.
    check_base_model(config)
    from library.data.plan import plan_run, print_plan
    from library.training.memory import freeze_long_lived_objects

    freeze_long_lived_objects()  # the libraries are imported now (the header check needed them), no model is built

    plan = plan_run(config)
    check_family_options(config, plan)
    print_plan(plan, verbose=False)
    processes = _processes()
    config = with_seed(config, processes)
    if config.output_dir and processes.is_main_process:
        remove_leftovers(config)
    try:
        return run(config, plan)
    except MemoryError:
        raise UserError(out_of_memory_advice("out of CPU memory (RAM)")) from None
    except RuntimeError as err:
        import torch  # already loaded by the run

        if not isinstance(err, torch.cuda.OutOfMemoryError):
            raise
        raise UserError(out_of_memory_advice("out of GPU memory")) from None


def _processes():
    """accelerate's view of the processes of this run (one, or one per device under `accelerate launch`)."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # The same choice the training loop's Accelerator makes: this state is the one it then uses.
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())


def with_seed(config: RunConfig, processes) -> RunConfig:
    """The seed the run uses, drawn now when --seed is not given so the saved options hold it (a rerun with them
    repeats the run), and the same on every process (the main process's, broadcast)."""
    if config.seed is not None:
        return config
    seed = [random.SystemRandom().randint(0, 2**32 - 1)]
    if processes.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(seed, from_process=0)
    return config.replace(origin="drawn at random (no --seed)", seed=seed[0])


def remove_leftovers(config: RunConfig) -> None:
    """Hidden temporary files and folders of this run's earlier saves that were killed (kill -9, power loss)."""
    from library.safe_write import format_bytes, remove_leftovers as remove
    from library.training.checkpoints import owns_name

    out = Path(config.output_dir)
    count = freed = 0
    for folder in (out, out / "sample"):
        n, size = remove(folder, lambda name: owns_name(name, config.output_name))
        count, freed = count + n, freed + size
    if count:
        print(f"removed {count} leftover(s) of interrupted saves in {out} ({format_bytes(freed)} reclaimed)")


def out_of_memory_advice(what: str) -> str:
    """One line for running out of memory: what to change, most effective first."""
    return (f"{what}: try --gradient_checkpointing, --cache_latents, a smaller --train_batch_size or --resolution, "
            "--mixed_precision bf16 (or fp16), --optimizer_type AdamW8bit; for train_db.py also --full_bf16 and "
            "--fused_backward_pass; then run again (or --resume from the last --save_state)")


def check_base_model(config: RunConfig) -> None:
    """Refuse a wrong --pretrained_model_name_or_path from its header alone, before anything is scanned (a missing
    one is reported by load_base_model, which every run calls)."""
    from library.models.detect import check_base_model as check

    if config.pretrained_model_name_or_path:
        found = check(config.pretrained_model_name_or_path)
        if found is not None and not config.get("v2"):  # --v2 insists on SD 2.x: the loader's message says more
            check_model_family(config, found)


def check_family_options(config: RunConfig, plan) -> None:
    """The script's family's rules on the options (sdxl_train_network.py: bucket steps of 32, no --v2), all at once."""
    from library.config.problems import raise_problems

    raise_problems(family_option_problems(config, plan))


def family_option_problems(config: RunConfig, plan) -> list[str]:
    from library.models.family import family_named

    families = config.get("model_families") or ()
    if not families:
        return []
    steps = [dataset.spec.bucket_reso_steps for dataset in plan.datasets]
    # With several families (SD 1.x and 2.x), what every one of them refuses: the model decides the rest.
    each = [family_named(name).option_problems(config, steps) for name in families]
    return [problem for problem in each[0] if all(problem in others for others in each[1:])]


def check_model_family(config: RunConfig, found) -> None:
    """Refuse a model of a family the script does not train, naming the script that does (if there is one)."""
    from library.models.family import family_named

    wanted = [family_named(name) for name in config.get("model_families") or ()]
    if not wanted or found in wanted:
        return
    labels = " / ".join(f.label for f in wanted)
    script = wanted[0].scripts.get(config.script, "this script")
    other = found.scripts.get(config.script)
    hint = f"use {other} for it" if other else f"{found.label} is not supported by this script yet"
    raise UserError(f"{config.pretrained_model_name_or_path}: this is an {found.label} model, and {script} trains "
                    f"{labels} models; {hint}")


def load_base_model(config: RunConfig):
    """The model every script starts from (--pretrained_model_name_or_path, --vae, --tokenizer), described; with it
    loaded the run really starts, so the resolved options (seed included) are saved next to the outputs now."""
    from library.models.loading import load_components

    if not config.pretrained_model_name_or_path:
        raise UserError("--pretrained_model_name_or_path is required: a .safetensors/.ckpt file, a diffusers folder, "
                        "or tiny-sd1 for the built-in demo model")
    parts = load_components(config.pretrained_model_name_or_path, options=config,
                            v_parameterization=config.v_parameterization, vae=config.vae, tokenizer=config.tokenizer)
    check_model_family(config, parts.family)
    print(parts.describe())
    save_resolved_options(config)
    return parts


def save_resolved_options(config: RunConfig) -> None:
    """`<output_name>.config.toml` in --output_dir: every resolved option, a --config_file that repeats the run.
    Written by the main process only, once the models have loaded: a run refused before that leaves none."""
    if config.output_dir and _processes().is_main_process:
        name = config.output_name or "last"
        path = write_resolved_config(config, options_for(config.script, OPTIONS).values(), config.output_dir, name)
        print(f"options: {path}")
