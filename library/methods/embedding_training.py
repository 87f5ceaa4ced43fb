"""train_textual_inversion.py's and train_hypernetwork.py's run: load the base model, train, save A1111-ready files."""

from __future__ import annotations

from library.config.run_config import RunConfig
from library.data.plan import RunPlan
from library.errors import UserError

# What each script can write: an embedding in three layouts; a hypernetwork only as A1111's .pt.
FORMATS = {"textual inversion": ("pt", "safetensors", "diffusers"), "hypernetwork": ("pt",)}


def run_textual_inversion(config: RunConfig, plan: RunPlan):
    from library.methods.ti_method import TextualInversionMethod

    return _run(config, plan, "textual inversion", TextualInversionMethod)


def run_hypernetwork(config: RunConfig, plan: RunPlan):
    from library.methods.hn_method import HypernetworkMethod

    return _run(config, plan, "hypernetwork", HypernetworkMethod)


def _run(config: RunConfig, plan: RunPlan, what: str, method):
    from library.methods.entry import load_base_model
    from library.training.loop import train

    if not config.output_dir:
        raise UserError(f"--output_dir is required: the folder where the trained {what} goes")
    formats = FORMATS[what]
    if (config.save_model_as or "pt") not in formats:
        raise UserError(f"--save_model_as {config.save_model_as}: a {what} is saved as {' or '.join(formats)}"
                        + (" (AUTOMATIC1111 reads hypernetworks only as .pt)" if what == "hypernetwork" else ""))
    parts = load_base_model(config)
    return train(config, plan, parts, method, save_ext=".pt")
