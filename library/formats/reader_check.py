"""Export self-test for embeddings and hypernetworks (#21 item 1): the file just written, read back the way each
reader reads it (rules re-derived from AUTOMATIC1111's modules/textual_inversion and hypernetworks, ComfyUI's
sd1_clip.load_embed and load_hypernetwork_patch, diffusers' load_textual_inversion), checked against the model's
text-encoder and cross-attention widths. One line, like the network self-test's.
"""

from __future__ import annotations

from pathlib import Path

import torch


def _read(path: Path):
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)


def _widths(parts) -> list[int]:
    return [int(te.config.hidden_size) for te in parts.text_encoders]


def embedding_readers(path: Path, parts) -> tuple[str, list[str], list[str]]:
    """(what the file holds, readers that take it on this model, why the others do not)."""
    path = Path(path)
    if path.is_dir():
        return "a diffusers embedding folder", ["diffusers"], [
            "ComfyUI and A1111 read embedding files, not folders (give them learned_embeds.safetensors)"]
    data = _read(path)
    widths = _widths(parts)
    sdxl = len(widths) == 2
    if isinstance(data, dict) and "string_to_param" in data:  # A1111's own layout
        params = list(data["string_to_param"].values())
        vectors = {"*": params[0]} if len(params) == 1 else None
    elif isinstance(data, dict) and {"clip_l", "clip_g"} <= set(data):
        vectors = {"clip_l": data["clip_l"], "clip_g": data["clip_g"]}
    elif isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):
        vectors = {"*": next(iter(data.values()))}
    else:
        return "no embedding a reader recognises", [], ["its keys match none of the layouts the readers know"]
    if vectors is None:
        return "several terms", [], ["A1111 and ComfyUI take one term per embedding file"]
    if sdxl:
        if set(vectors) != {"clip_l", "clip_g"}:
            return "a one-encoder embedding", [], [f"an SDXL model needs clip_l and clip_g vectors, widths {widths}"]
        shapes = [tuple(vectors[k].shape) for k in ("clip_l", "clip_g")]
        fits = [vectors["clip_l"].shape[-1], vectors["clip_g"].shape[-1]] == widths
        count = shapes[0][0] if len(shapes[0]) > 1 else 1
        what = f"an SDXL embedding ({count} vector{'s' if count != 1 else ''}, widths {shapes[0][-1]} + {shapes[1][-1]})"
        # diffusers takes one key per load_textual_inversion call (clip_l for text_encoder, clip_g for the second)
        return (what, ["diffusers", "ComfyUI", "A1111"], []) if fits else \
            (what, [], [f"the model's encoders are {widths[0]} + {widths[1]} wide"])
    tensor = vectors["*"]
    count = 1 if tensor.dim() == 1 else tensor.shape[0]
    what = f"an embedding of {count} vector{'s' if count != 1 else ''}, width {tensor.shape[-1]}"
    if tensor.shape[-1] != widths[0]:
        return what, [], [f"the model's text encoder is {widths[0]} wide"]
    return what, ["diffusers", "ComfyUI", "A1111"], []


def hypernetwork_readers(path: Path, parts) -> tuple[str, list[str], list[str]]:
    """A1111's .pt: per context width (an int key), the k/v layer pairs; the model's cross-attention context width
    must be among them for ComfyUI and A1111 to apply anything. diffusers has no hypernetworks."""
    data = _read(Path(path))
    sizes = sorted(k for k in data if isinstance(k, int)) if isinstance(data, dict) else []
    context = int(parts.unet.config.cross_attention_dim)
    what = f"a hypernetwork for widths {', '.join(map(str, sizes)) or 'none'}"
    if context in sizes:
        return what, ["ComfyUI", "A1111"], ["diffusers has no hypernetworks"]
    return what, [], [f"the model's cross-attention context is {context} wide; nothing would apply"]


def report(label: str, what: str, readers: list[str], why_not: list[str]) -> list[str]:
    if readers:
        return [f"{label}: {what} loads in {', '.join(readers)}"] + [f"note: {w}" for w in why_not]
    return [f"{label}: {what}"] + [f"warning: no reader would load it: {w}" for w in why_not]
