"""The text-encoder and UNet trees a third-party --network_module sees: shaped as sd-scripts hands them over.

Modules written for sd-scripts (LyCORIS' `lycoris.kohya`, …) pick layers by class name and build each adapter's
name from the module path, so they need sd-scripts' paths and class names. These views hold the real layers (no
weights are copied); only the containers above them are stand-ins. SD 1.x/2.x: sd-scripts' UNet has diffusers'
paths, so the view keeps them (`unet_view`). SDXL: sd-scripts' own SDXL UNet has SGM paths
(`input_blocks.4.1.transformer_blocks.0.attn1.to_q`), so the view rebuilds the tree under them (`sgm_unet_view`).
"""

from __future__ import annotations

from typing import Callable

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


# The classes of sd-scripts' SDXL UNet (library/sdxl_original_unet.py) that LyCORIS' presets target, by the diffusers
# class that holds the same layers. Every other container there is an nn.ModuleList or nn.Sequential.
SGM_CLASS_NAMES = {"ResnetBlock2D": "ResnetBlock2D", "Downsample2D": "Downsample2D", "Upsample2D": "Upsample2D",
                   "Transformer2DModel": "Transformer2DModel", "BasicTransformerBlock": "BasicTransformerBlock",
                   "Attention": "CrossAttention", "FeedForward": "FeedForward", "GEGLU": "GEGLU"}
SGM_TOP_LEVEL = ("time_embed", "label_emb", "input_blocks", "middle_block", "output_blocks", "out")


def _is_layer(module: nn.Module) -> bool:
    return next(module.children(), None) is None or next(module.parameters(recurse=False), None) is not None


def sgm_unet_view(unet: nn.Module, path_of: Callable[[str], str]) -> nn.Module:
    """The UNet as sd-scripts' SGM-named SDXL UNet: every layer with weights under `path_of(its diffusers path)`,
    the containers that hold sd-scripts' ResNet / transformer / attention blocks named after its classes.

    A container's SGM path is the common prefix of its layers' SGM paths (the parent of the only one, for the
    samplers: diffusers' `downsamplers.0.conv` is `input_blocks.3.0.op`). Layers without weights (activations,
    dropout) are left out: nothing adapts them.
    """
    layers: dict[str, nn.Module] = {}
    handed: set[str] = set()  # layers handed over whole: their own children are not visited
    for path, module in unet.named_modules():
        parts = path.split(".")
        if not path or any(".".join(parts[:i]) in handed for i in range(1, len(parts))) or not _is_layer(module):
            continue
        handed.add(path)
        if next(module.parameters(), None) is not None:
            layers[path] = module
    sgm = {path: path_of(path) for path in layers}

    inside: dict[str, list[list[str]]] = {}  # diffusers container path -> its layers' SGM paths, split
    for path in layers:
        segments = path.split(".")
        for i in range(1, len(segments)):
            inside.setdefault(".".join(segments[:i]), []).append(sgm[path].split("."))
    classes: dict[str, str] = {}  # SGM container path -> sd-scripts class name
    for path, module in unet.named_modules():
        name = SGM_CLASS_NAMES.get(type(module).__name__)
        if name is not None and path in inside:
            classes[".".join(_common(inside[path]))] = name

    made: dict[str, type] = {}

    def container(path: str) -> nn.Module:
        name = classes.get(path, "SdxlUNet2DConditionModel" if not path else "ModuleList")
        cls = made.setdefault(name, type(name, (nn.Module,), {"__doc__": f"a stand-in for sd-scripts' {name}"}))
        return cls()

    root = container("")
    nodes: dict[str, nn.Module] = {"": root}

    first_seen: dict[str, int] = {}  # named SGM paths in diffusers' order (in_layers, emb_layers, out_layers...)
    for target in sgm.values():
        segments = target.split(".")
        for i in range(len(segments)):
            first_seen.setdefault(".".join(segments[:i + 1]), len(first_seen))

    def order(path: str) -> tuple:
        segments = path.split(".")
        top = SGM_TOP_LEVEL.index(segments[0]) if segments[0] in SGM_TOP_LEVEL else len(SGM_TOP_LEVEL)
        return (top, *(int(s) if s.isdigit() else first_seen[".".join(segments[:i + 1])]
                       for i, s in enumerate(segments) if i))

    for path in sorted(layers, key=lambda p: order(sgm[p])):
        *parents, leaf = sgm[path].split(".")
        node = root
        for i, segment in enumerate(parents):
            at = ".".join(parents[:i + 1])
            if at not in nodes:
                nodes[at] = container(at)
                node.add_module(segment, nodes[at])
            node = nodes[at]
        node.add_module(leaf, layers[path])
    return root


def _common(parts: list[list[str]]) -> list[str]:
    """The longest common leading segments of several paths (the parent of the path, if there is only one)."""
    if len(parts) == 1:
        return parts[0][:-1]
    common = []
    for segments in zip(*parts):
        if any(s != segments[0] for s in segments):
            break
        common.append(segments[0])
    return common
