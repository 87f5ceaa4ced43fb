"""The path every entry script takes: resolve options, refuse what is not supported, check the data, then run."""

from __future__ import annotations

from typing import Callable, Sequence

from library.config.declarations import OPTIONS
from library.config.resolve import check_supported, options_for, resolve, write_resolved_config
from library.config.run_config import RunConfig
from library.console import quiet_libraries
from library.errors import UserError


def has_dataset(config: RunConfig) -> bool:
    return bool(config.get("train_data_dir") or config.get("dataset_config") or config.get("in_json"))


def dry_run(config: RunConfig) -> None:
    """Print the full plan, every image fully checked; options only later issues implement are tolerated."""
    check_supported(config, OPTIONS, include_later=False)
    if not has_dataset(config):
        raise UserError("--dry_run checks a dataset: give --train_data_dir, --in_json or --dataset_config")
    from library.data.plan import plan_run, print_plan

    print_plan(plan_run(config, verify=True), verbose=True)


def start(argv: Sequence[str] | None, script: str, description: str, run: Callable[[RunConfig, object], object]):
    """Resolve `argv` for `script`; a dry run prints the plan, a real run checks the data before any weights load,
    saves the resolved options next to its outputs, then calls `run(config, plan)` and returns its result."""
    config = resolve(argv, script, OPTIONS, description)
    if config.get("token_string") and not config.output_name:
        config = config.replace(output_name=config.token_string)  # sd-scripts names an embedding after its token
    if config.dry_run:
        dry_run(config)
        return None
    check_supported(config, OPTIONS)
    from library.data.plan import plan_run, print_plan

    plan = plan_run(config)
    print_plan(plan, verbose=False)
    quiet_libraries()
    if config.output_dir:
        name = config.output_name or "last"
        path = write_resolved_config(config, options_for(script, OPTIONS).values(), config.output_dir, name)
        print(f"options: {path}")
    try:
        return run(config, plan)
    except MemoryError:
        raise UserError(out_of_memory_advice("out of CPU memory (RAM)")) from None
    except RuntimeError as err:
        import torch  # already loaded by the run

        if not isinstance(err, torch.cuda.OutOfMemoryError):
            raise
        raise UserError(out_of_memory_advice("out of GPU memory")) from None


def out_of_memory_advice(what: str) -> str:
    """One line for running out of memory: what to change, most effective first."""
    return (f"{what}: try --gradient_checkpointing, --cache_latents, a smaller --train_batch_size or --resolution, "
            "--mixed_precision bf16 (or fp16), --optimizer_type AdamW8bit; for train_db.py also --full_bf16 and "
            "--fused_backward_pass; then run again (or --resume from the last --save_state)")


def load_base_model(config: RunConfig):
    """The model every script starts from (--pretrained_model_name_or_path, --vae, --tokenizer), described."""
    from library.models.loading import load_components

    if not config.pretrained_model_name_or_path:
        raise UserError("--pretrained_model_name_or_path is required: a .safetensors/.ckpt file, a diffusers folder, "
                        "or tiny-sd1 for the built-in demo model")
    parts = load_components(config.pretrained_model_name_or_path, v2=config.v2,
                            v_parameterization=config.v_parameterization, vae=config.vae, tokenizer=config.tokenizer)
    print(parts.describe())
    return parts
