"""train_db.py's run: load the base model, fill regularisation folders with class images, fine-tune, save models."""

from __future__ import annotations

from pathlib import Path

from library.config.run_config import RunConfig
from library.data.plan import RunPlan
from library.errors import UserError

SINGLE_FILE = {".safetensors": "safetensors", ".ckpt": "ckpt"}
DIFFUSERS_FORMATS = ("diffusers", "diffusers_safetensors")
MODEL_FORMATS = ("safetensors", "ckpt", *DIFFUSERS_FORMATS)


def save_format(config: RunConfig) -> str:
    """sd-scripts: --save_model_as, else the base model's own format (--use_safetensors picks safetensors)."""
    if config.save_model_as:
        if config.save_model_as not in MODEL_FORMATS:
            raise UserError(f"--save_model_as {config.save_model_as}: train_db.py saves a full model as "
                            f"{', '.join(MODEL_FORMATS)}")
        return config.save_model_as
    source = Path(str(config.pretrained_model_name_or_path))
    single = SINGLE_FILE.get(source.suffix.lower())
    if single:
        return "safetensors" if config.use_safetensors else single
    return "diffusers_safetensors" if config.use_safetensors else "diffusers"


def run(config: RunConfig, plan: RunPlan):
    import torch
    from accelerate import PartialState

    from library.data.plan import plan_run, print_plan
    from library.methods.db_method import DreamBoothMethod
    from library.methods.entry import load_base_model
    from library.training.class_images import class_image_jobs, generate_class_images
    from library.training.loop import train

    if not config.output_dir:
        raise UserError("--output_dir is required: the folder where the trained model goes")
    config = config.replace(save_model_as=save_format(config))
    parts = load_base_model(config)
    jobs = class_image_jobs(config, plan)
    if jobs:
        # Prior preservation needs its class images before the dataset is final: the main process makes the missing
        # ones with the base model, the others wait; then the data is planned again with them in.
        state = PartialState(cpu=not torch.cuda.is_available())
        if state.is_main_process:
            generate_class_images(parts, jobs, config=config, device=state.device)
        state.wait_for_everyone()
        plan = plan_run(config)
        print_plan(plan, verbose=False)
    return train(config, plan, parts, DreamBoothMethod)
