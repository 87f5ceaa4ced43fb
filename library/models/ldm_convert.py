"""State-dict conversions between the single-file (ldm) layout and diffusers/transformers modules.

ldm -> diffusers uses diffusers' own single-file converters; diffusers ships no converter back to the ldm layout
(only an unpackaged script), so that direction is written here, generic in block counts so tiny models work too.
"""

from __future__ import annotations

from typing import Mapping, TypeVar

import torch
from diffusers.loaders import single_file_utils as sfu

Tensors = Mapping[str, torch.Tensor]
V = TypeVar("V")

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."


def has_openclip(keys) -> bool:
    """Whether single-file tensor names include SD 2.x's OpenCLIP text encoder."""
    return any(isinstance(k, str) and k.startswith(OPENCLIP_PREFIX) for k in keys)


def strip_prefix(sd: Tensors, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def add_prefix(sd: Tensors, prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in sd.items()}


# ---------------------------------------------------------------- ldm -> diffusers / transformers

def unet_to_diffusers(ldm_unet: Tensors, config: dict) -> dict[str, torch.Tensor]:
    """`ldm_unet` without prefix -> UNet2DConditionModel state dict."""
    return sfu.convert_ldm_unet_checkpoint(add_prefix(ldm_unet, UNET_PREFIX), config)


def vae_to_diffusers(ldm_vae: Tensors, config: dict) -> dict[str, torch.Tensor]:
    """`ldm_vae` without prefix -> AutoencoderKL state dict (attention 1x1 convs become linears)."""
    return sfu.convert_ldm_vae_checkpoint(add_prefix(ldm_vae, VAE_PREFIX), config)


def clip_to_transformers(ldm_clip: Tensors) -> dict[str, torch.Tensor]:
    """SD 1.x `cond_stage_model.transformer.*` (prefix stripped, with or without `text_model.`) -> CLIPTextModel keys.

    transformers >= 5 dropped the `text_model.` wrapper, so module keys start at `embeddings.` / `encoder.`.
    """
    out = {}
    for key, value in ldm_clip.items():
        key = key.removeprefix("text_model.")
        if key != "embeddings.position_ids":  # a buffer, rebuilt by the model
            out[key] = value
    return out


def split_openclip(ldm_openclip: Tensors) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split SD 2.x OpenCLIP tensors into those the text model uses and the rest.

    SD 2.x conditions on the penultimate layer, so the last resblock, `text_projection` and `logit_scale` are
    never used; they are kept aside so that re-saving reproduces the source file exactly.
    """
    blocks = sorted({int(k.split(".")[2]) for k in ldm_openclip if k.startswith("transformer.resblocks.")})
    last = f"transformer.resblocks.{blocks[-1]}." if blocks else None
    used, extras = {}, {}
    for key, value in ldm_openclip.items():
        unused = (last and key.startswith(last)) or not key.startswith(("transformer.", "token_embedding", "positional_embedding", "ln_final"))
        (extras if unused else used)[key] = value
    return used, extras


def openclip_to_transformers(openclip: Mapping[str, V]) -> dict[str, V]:
    """OpenCLIP text tensors (prefix stripped; SD 2.x's used part, or SDXL's bigG) -> CLIPTextModel keys.

    The names diffusers' `convert_open_clip_checkpoint` gives, but every output is a view of a source tensor (the
    fused `in_proj_*` split by rows, `text_projection` transposed into a Linear weight) rather than a copy, so a
    streaming loader reads one source tensor at a time (`loading.stream`). Tensors CLIP has no place for
    (`logit_scale`, `attn_mask`) are left out.
    """
    out = {}
    for key, value in openclip.items():
        if key == "text_projection":
            out["text_projection.weight"] = value.T
            continue
        if not key.startswith(("transformer.resblocks.", "token_embedding.", "positional_embedding", "ln_final.")):
            continue
        for clip_name, openclip_name in reversed(_OPENCLIP_NAMES):
            key = key.replace(openclip_name, clip_name)
        stem, fused, kind = key.rpartition(".attn.in_proj_")
        if fused:  # rows [q; k; v] of one packed projection
            width = value.shape[0] // 3
            for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                out[f"{stem}.self_attn.{proj}.{kind}"] = value[i * width:(i + 1) * width]
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------- diffusers / transformers -> ldm

_UNET_RESNET = (("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("norm2.", "out_layers.0."),
                ("conv2.", "out_layers.3."), ("time_emb_proj.", "emb_layers.1."), ("conv_shortcut.", "skip_connection."))
_VAE_RESNET = (("conv_shortcut.", "nin_shortcut."),)
_VAE_ATTENTION = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out."))


def _unet_prefixes(config: dict) -> list[tuple[str, str, tuple]]:
    """(diffusers prefix, ldm prefix, inner renames) for every UNet sub-module, from the block layout."""
    lpb, n = config["layers_per_block"], len(config["block_out_channels"])
    rows = [("time_embedding.linear_1.", "time_embed.0.", ()), ("time_embedding.linear_2.", "time_embed.2.", ()),
            # SDXL's size/pooled-text embedding ("text_time"); absent from SD 1.x/2.x.
            ("add_embedding.linear_1.", "label_emb.0.0.", ()), ("add_embedding.linear_2.", "label_emb.0.2.", ()),
            ("conv_in.", "input_blocks.0.0.", ()), ("conv_norm_out.", "out.0.", ()), ("conv_out.", "out.2.", ()),
            ("mid_block.resnets.0.", "middle_block.0.", _UNET_RESNET), ("mid_block.attentions.0.", "middle_block.1.", ()),
            ("mid_block.resnets.1.", "middle_block.2.", _UNET_RESNET)]
    for i in range(n):
        for j in range(lpb):
            idx = 1 + i * (lpb + 1) + j
            rows += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{idx}.0.", _UNET_RESNET),
                     (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{idx}.1.", ())]
        if i < n - 1:
            rows.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (lpb + 1)}.0.op.", ()))
    for i in range(n):
        for j in range(lpb + 1):
            idx = i * (lpb + 1) + j
            rows += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{idx}.0.", _UNET_RESNET),
                     (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{idx}.1.", ())]
        if i < n - 1:
            # ldm appends the upsampler to the block's last layer: after the attention if there is one.
            slot = 2 if config["up_block_types"][i].startswith("CrossAttn") else 1
            rows.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{i * (lpb + 1) + lpb}.{slot}.", ()))
    return rows


def _vae_prefixes(config: dict) -> list[tuple[str, str, tuple]]:
    n, lpb = len(config["block_out_channels"]), config["layers_per_block"]
    rows = [("encoder.conv_norm_out.", "encoder.norm_out.", ()), ("decoder.conv_norm_out.", "decoder.norm_out.", ())]
    for part in ("encoder", "decoder"):
        rows += [(f"{part}.mid_block.resnets.{k}.", f"{part}.mid.block_{k + 1}.", _VAE_RESNET) for k in range(2)]
        rows.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", _VAE_ATTENTION))
    for i in range(n):
        rows += [(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.", ()),
                 (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample.", ())]
        # The decoder has one resnet more per block than the encoder.
        rows += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", _VAE_RESNET) for j in range(lpb)]
        rows += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{n - 1 - i}.block.{j}.", _VAE_RESNET)
                 for j in range(lpb + 1)]
    return rows


def _rename(sd: Tensors, rows: list[tuple[str, str, tuple]]) -> dict[str, torch.Tensor]:
    # Longest prefix first, so "mid_block.resnets.1." never matches a shorter, wrong row.
    rows = sorted(rows, key=lambda r: len(r[0]), reverse=True)
    out = {}
    for key, value in sd.items():
        for src, dst, inner in rows:
            if key.startswith(src):
                rest = key[len(src):]
                for a, b in inner:
                    if rest.startswith(a):
                        rest = b + rest[len(a):]
                        break
                key = dst + rest
                break
        out[key] = value
    return out


def unet_to_ldm(unet_sd: Tensors, config: dict) -> dict[str, torch.Tensor]:
    """UNet2DConditionModel state dict -> ldm UNet keys (without prefix)."""
    return _rename(unet_sd, _unet_prefixes(config))


def unet_path_to_ldm(path: str, config: dict) -> str:
    """A UNet2DConditionModel module path -> its ldm (SGM) path: `down_blocks.1.attentions.0.proj_in` ->
    `input_blocks.4.1.proj_in` (SDXL adapter names use these)."""
    return next(iter(_rename({path + ".": None}, _unet_prefixes(config)))).removesuffix(".")


def vae_to_ldm(vae_sd: Tensors, config: dict) -> dict[str, torch.Tensor]:
    """AutoencoderKL state dict -> ldm VAE keys (without prefix); mid-attention linears become 1x1 convs."""
    out = _rename(vae_sd, _vae_prefixes(config))
    for key, value in out.items():
        if ".mid.attn_1." in key and key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")) and value.ndim == 2:
            out[key] = value.reshape(*value.shape, 1, 1)
    return out


def clip_to_ldm(te_sd: Tensors) -> dict[str, torch.Tensor]:
    """CLIPTextModel state dict -> `cond_stage_model.transformer.text_model.*` keys (prefix stripped), as sd-scripts writes."""
    return {"text_model." + k: v for k, v in te_sd.items() if not k.endswith("position_ids")}


def clip_to_transformers4(te_sd: Mapping[str, V]) -> dict[str, V]:
    """CLIPTextModel state dict of transformers >= 5 (`encoder.…`) -> the `text_model.encoder.…` spelling of
    transformers 4, which diffusers folders on the hub and ComfyUI's diffusers loader use (transformers 5 reads both)."""
    return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in te_sd.items()}


_OPENCLIP_NAMES = (("embeddings.token_embedding.weight", "token_embedding.weight"),
                   ("embeddings.position_embedding.weight", "positional_embedding"),
                   ("final_layer_norm.", "ln_final."), ("encoder.layers.", "transformer.resblocks."),
                   (".self_attn.out_proj.", ".attn.out_proj."), (".layer_norm1.", ".ln_1."), (".layer_norm2.", ".ln_2."),
                   (".mlp.fc1.", ".mlp.c_fc."), (".mlp.fc2.", ".mlp.c_proj."))


def openclip_to_ldm(te_sd: Tensors, extras: Tensors | None) -> dict[str, torch.Tensor]:
    """CLIPTextModel state dict -> SD 2.x OpenCLIP keys (prefix stripped).

    `extras` are the unused tensors kept at load time (last resblock, text_projection, logit_scale). Without them,
    like sd-scripts, the last resblock is a copy of the one before and the projection a dummy: SD 2.x never uses them.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in te_sd.items():
        if key.endswith("position_ids"):
            continue
        for a, b in _OPENCLIP_NAMES:
            key = key.replace(a, b)
        if ".self_attn." in key:  # q/k/v projections are one packed in_proj in OpenCLIP
            stem, proj, kind = key.rsplit(".", 2)
            qkv.setdefault(f"{stem.replace('.self_attn', '.attn')}.in_proj_{kind}", {})[proj] = value
        else:
            out[key] = value
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)
    if extras:
        out.update(extras)
    else:
        out.update(_dummy_openclip_extras(out))
    return out


def _dummy_openclip_extras(openclip: Tensors) -> dict[str, torch.Tensor]:
    blocks = sorted({int(k.split(".")[2]) for k in openclip if k.startswith("transformer.resblocks.")})
    last, new = f"transformer.resblocks.{blocks[-1]}.", f"transformer.resblocks.{blocks[-1] + 1}."
    extras = {k.replace(last, new): v.clone() for k, v in openclip.items() if k.startswith(last)}
    width = openclip["token_embedding.weight"].shape[1]
    dtype = openclip["token_embedding.weight"].dtype
    extras["text_projection"] = torch.ones((width, width), dtype=dtype)
    extras["logit_scale"] = torch.tensor(1.0, dtype=dtype)
    return extras
