"""train_textual_inversion.py's, sdxl_train_textual_inversion.py's and train_hypernetwork.py's run: load the base
model, train, save A1111-ready files."""

from __future__ import annotations

from library.config.run_config import RunConfig
from library.data.plan import RunPlan
from library.errors import UserError

# What each script can write: an embedding in three layouts (SDXL: sd-scripts' {"clip_l", "clip_g"} safetensors, or
# diffusers' learned_embeds + learned_embeds_2 folder; A1111 has no SDXL .pt layout); a hypernetwork only as A1111's .pt.
FORMATS = {"textual inversion": ("pt", "safetensors", "diffusers"), "SDXL textual inversion": ("safetensors", "diffusers"),
           "hypernetwork": ("pt",)}
WHY = {"SDXL textual inversion": " (sd-scripts' clip_l / clip_g file, which AUTOMATIC1111 and ComfyUI read; there is "
                                 "no SDXL .pt layout)",
       "hypernetwork": " (AUTOMATIC1111 reads hypernetworks only as .pt)"}


def run_textual_inversion(config: RunConfig, plan: RunPlan):
    from library.methods.ti_method import TextualInversionMethod

    return _run(config, plan, "textual inversion", TextualInversionMethod)


def run_sdxl_textual_inversion(config: RunConfig, plan: RunPlan):
    from library.methods.ti_method import TextualInversionMethod

    if not config.is_set("save_model_as"):
        # The TI scripts' default is A1111's .pt, which has no SDXL layout: sd-scripts' safetensors file instead.
        config = config.replace(origin="SDXL embeddings are saved as safetensors", save_model_as="safetensors")
    return _run(config, plan, "SDXL textual inversion", TextualInversionMethod)


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
        article = "an" if what.startswith("SDXL") else "a"
        raise UserError(f"--save_model_as {config.save_model_as}: {article} {what} is saved as {' or '.join(formats)}"
                        + WHY.get(what, ""))
    parts = load_base_model(config)
    return train(config, plan, parts, method, save_ext=".pt")
