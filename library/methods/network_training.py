"""train_network.py's run: load the base model, train the adapter network with the shared loop, save it."""

from __future__ import annotations

from library.config.run_config import RunConfig
from library.data.plan import RunPlan
from library.errors import UserError

NETWORK_FORMATS = {"safetensors": ".safetensors", "pt": ".pt", "ckpt": ".ckpt"}


def run(config: RunConfig, plan: RunPlan):
    from library.methods.network_method import NetworkMethod
    from library.models.loading import load_components
    from library.training.loop import train

    if not config.output_dir:
        raise UserError("--output_dir is required: the folder where the trained network goes")
    if (config.save_model_as or "safetensors") not in NETWORK_FORMATS:
        raise UserError(f"--save_model_as {config.save_model_as}: a network is saved as safetensors, pt or ckpt")
    if not config.pretrained_model_name_or_path:
        raise UserError("--pretrained_model_name_or_path is required: a .safetensors/.ckpt file, a diffusers folder, "
                        "or tiny-sd1 for the built-in demo model")
    parts = load_components(config.pretrained_model_name_or_path, v2=config.v2,
                            v_parameterization=config.v_parameterization, vae=config.vae, tokenizer=config.tokenizer)
    print(parts.describe())
    return train(config, plan, parts, NetworkMethod)
