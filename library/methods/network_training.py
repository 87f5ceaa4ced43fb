"""train_network.py's run: load the base model, train the adapter network with the shared loop, save it."""

from __future__ import annotations

from library.config.run_config import RunConfig
from library.data.plan import RunPlan
from library.errors import UserError

NETWORK_FORMATS = {"safetensors": ".safetensors", "pt": ".pt", "ckpt": ".ckpt"}


def run(config: RunConfig, plan: RunPlan):
    from library.methods.network_method import NetworkMethod
    from library.methods.entry import load_base_model
    from library.training.loop import train

    if not config.output_dir:
        raise UserError("--output_dir is required: the folder where the trained network goes")
    if (config.save_model_as or "safetensors") not in NETWORK_FORMATS:
        raise UserError(f"--save_model_as {config.save_model_as}: a network is saved as safetensors, pt or ckpt")
    parts = load_base_model(config)
    return train(config, plan, parts, NetworkMethod)
