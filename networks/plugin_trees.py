"""The text-encoder and UNet trees a third-party --network_module sees: shaped as sd-scripts hands them over.

Modules written for sd-scripts (LyCORIS' `lycoris.kohya`, …) pick layers by class name and build each adapter's
name from the module path, so they need sd-scripts' paths and class names. These views hold the real layers (no
weights are copied); only the containers above them are stand-ins.
"""

from __future__ import annotations

from torch import nn

# diffusers' class names that differ from sd-scripts' own UNet (library/original_unet.py); presets match on them
# (LyCORIS' attn-only preset targets "CrossAttention").
SD_SCRIPTS_CLASS_NAMES = {"Attention": "CrossAttention"}
# LyCORIS' presets target `time_embedding.linear_1/_2` by name; lycoris-lora 4.1 also lists the class
# TimestepEmbedding (for Anima), so on an SD UNet (diffusers' or sd-scripts') the same two layers are built twice
# and it stops with "duplicated lora name". Shown as a plain container, they are built once, by name, as before.
PLAIN_CONTAINERS = {"TimestepEmbedding": "SDTimeEmbedding"}


class TextModelView(nn.Module):
    """transformers 4's CLIPTextModel shape: the encoder under `text_model.` (transformers 5 dropped that wrapper),
    so adapters are named `lora_te_text_model_encoder_layers_N_…` as in sd-scripts' files."""

    def __init__(self, text_model: nn.Module):
        super().__init__()
        self.text_model = text_model

    def forward(self, *args, **kwargs):
        return self.text_model(*args, **kwargs)


def text_encoder_view(text_encoder):
    """The text encoder(s) under sd-scripts' `text_model.` paths; one that already has them is returned as it is."""
    if text_encoder is None:
        return None
    if isinstance(text_encoder, (list, tuple)):
        return [text_encoder_view(te) for te in text_encoder]
    if any(name == "text_model" for name, _ in text_encoder.named_children()):
        return text_encoder
    return TextModelView(text_encoder)


def unet_view(unet: nn.Module | None) -> nn.Module | None:
    """The UNet with sd-scripts' class names on its containers; its layers are the UNet's own objects."""
    if unet is None:
        return None
    classes: dict[str, type] = {}
    views: dict[int, nn.Module] = {}

    def view_of(module: nn.Module) -> nn.Module:
        # A layer (no children, or weights of its own) is what a plug-in wraps: hand over the object itself.
        if next(module.children(), None) is None or next(module.parameters(recurse=False), None) is not None:
            return module
        if id(module) in views:  # a container registered under two names stays one object, as in named_modules()
            return views[id(module)]
        name = type(module).__name__
        name = PLAIN_CONTAINERS.get(name, SD_SCRIPTS_CLASS_NAMES.get(name, name))
        cls = classes.setdefault(name, type(name, (nn.Module,), {"__doc__": f"a view of a {type(module).__name__}"}))
        view = views[id(module)] = cls()
        for child_name, child in module.named_children():
            view.add_module(child_name, view_of(child))
        return view

    return view_of(unet)
