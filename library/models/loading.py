"""Load a base model — single file, diffusers folder, hub id or built-in tiny model — into diffusers modules; the
family (`library/models/family.py`) that recognises it does the family-specific part."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable, Iterator

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel

from library.errors import UserError
from library.models import ldm_convert as lc
from library.models.checkpoint_io import TensorFile, open_checkpoint, read_state_dict
from library.models.components import Components
from library.models.detect import check_base_model
from library.models.family import family_of_file, family_of_folder, family_of_tiny, requested_family
from library.models.ldm_configs import infer_vae_config

VAE_TOP_LEVEL = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def load_components(
    source: str,
    *,
    v2: bool = False,
    v_parameterization: bool = False,
    vae: str | None = None,
    tokenizer: str | None = None,
    dtype: torch.dtype = torch.float32,
    options: Any = None,
) -> Components:
    """Load a base model of any registered family; its family is detected from the file or folder.

    `options` (the run's config or parsed flags) may insist on a family (sd-scripts' `--v2`): a model of another
    family is then an error. `v2=True` is the same for callers without options.
    """
    source = str(source)
    path = Path(source).expanduser()
    # The same header check the trainers run before the dataset scan: a wrong kind of file fails here, unread.
    check_base_model(source)
    tiny = family_of_tiny(source)
    if tiny is not None:
        parts = tiny.build_tiny(source, tokenizer=tokenizer)
    elif path.is_dir():
        parts = _load_diffusers(str(path), tokenizer, local=True)
    elif path.exists():
        parts = _load_single_file(path, tokenizer, dtype)
    else:  # a hub id: check_base_model refused every other missing path
        parts = _load_diffusers(source, tokenizer, local=False)
    wanted = requested_family(options if options is not None else SimpleNamespace(v2=v2))
    if wanted is not None:
        wanted.refuse_requested(parts.family, source)
    parts.v_parameterization = parts.v_parameterization or v_parameterization
    parts.family.after_load(parts)
    if vae:
        parts.vae = load_vae(vae, scaling_factor=parts.family.latent_scale)
    for module in parts.modules():
        if module.dtype != dtype:
            module.to(dtype=dtype)
        module.requires_grad_(False).eval()
    return parts


# ---------------------------------------------------------------- single file
#
# The file is read tensor by tensor: names and shapes decide the architecture and configs, the layout conversion runs
# on `meta` tensors to learn which source tensor (or view of one) each module parameter is, then each parameter is
# read, cast to the training dtype and kept, so memory holds the built modules plus one source tensor — never the
# whole file next to its upcast copy.

def _load_single_file(path: Path, tokenizer: str | None, dtype: torch.dtype) -> Components:
    with open_checkpoint(path) as file:
        family = family_of_file(file.meta)
        if family is None:  # check_base_model let it through, yet no family claims it
            raise UserError(f"{path}: no supported model family recognises this file's tensors")
        return family.load_single_file(file, str(path), tokenizer, dtype)


class Prefixed:
    """Tensors with their file prefix stripped (what the converters take), remembering the prefix to read them."""

    def __init__(self, stripped: dict[str, torch.Tensor], prefix: str):
        self.stripped, self.prefix = stripped, prefix


def stream(file: TensorFile, source: Prefixed, convert, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(module key, tensor) pairs, read one source tensor at a time.

    The converter runs on the meta tensors first: an output that is a source tensor, or a view of one (a slice,
    a transpose), is cut from that source when it is read; a source is read once for all its views, and a view
    smaller than its source is copied out so the source is freed at once. If any output is a computed copy (no
    lineage to follow), the module's sources are read whole and converted for real.
    """
    converted = convert(source.stripped)
    by_id = {id(t): k for k, t in source.stripped.items()}
    plan: dict[str, list[tuple[str, tuple | None]]] = {}  # source name -> [(module key, view or None)]
    for key, out in converted.items():
        if id(out) in by_id:
            plan.setdefault(by_id[id(out)], []).append((key, None))
        elif out._base is not None and id(out._base) in by_id:
            view = (tuple(out.shape), out.stride(), out.storage_offset())
            plan.setdefault(by_id[id(out._base)], []).append((key, view))
        else:
            yield from convert({k: file.load(source.prefix + k, dtype) for k in source.stripped}).items()
            return
    for name, outputs in plan.items():
        tensor = file.load(source.prefix + name, dtype)
        for key, view in outputs:
            if view is None:
                yield key, tensor
                continue
            part = tensor.as_strided(*view)
            yield key, part if part.numel() == tensor.numel() else part.clone()
        del tensor


def main_dtype(sd: dict[str, torch.Tensor]) -> torch.dtype:
    counts = Counter(v.dtype for v in sd.values() if v.is_floating_point())
    return counts.most_common(1)[0][0] if counts else torch.float32


def build_module(cls, config, tensors: Iterable[tuple[str, torch.Tensor]], source: str, what: str, dtype: torch.dtype):
    """Instantiate without random init (meta parameters), then take the tensors, cast one by one, as parameters."""
    with init_empty_weights():
        model = cls(config) if not isinstance(config, dict) else cls(**config)
    expected = model.state_dict()
    state_dict = {}
    for key, tensor in tensors:
        target = expected[key].dtype if key in expected and not expected[key].is_floating_point() else dtype
        state_dict[key] = tensor.to(dtype=target).contiguous()
    missing, unexpected = sorted(expected.keys() - state_dict.keys()), sorted(state_dict.keys() - expected.keys())
    if missing or unexpected:
        raise UserError(f"{source}: the {what} tensors do not match an SD 1.x/2.x {what} "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]}); this architecture is not supported")
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model


def build_vae_and_unet(file: TensorFile, vae_ldm: dict, vae_cfg: dict, unet_ldm: dict, unet_cfg: dict, source: str,
                       dtype: torch.dtype) -> tuple[AutoencoderKL, UNet2DConditionModel]:
    """A single file's VAE and UNet (ldm / SGM layout, prefixes `first_stage_model.` / `model.diffusion_model.`),
    streamed: both are renamings of the file's tensors, the same for every family. The UNet, the largest, goes last."""
    vae = build_module(AutoencoderKL, vae_cfg, stream(file, Prefixed(vae_ldm, lc.VAE_PREFIX),
                                                      lambda sd: lc.vae_to_diffusers(sd, vae_cfg), dtype),
                       source, "VAE", dtype)
    unet = build_module(UNet2DConditionModel, unet_cfg, stream(file, Prefixed(unet_ldm, lc.UNET_PREFIX),
                                                               lambda sd: lc.unet_to_diffusers(sd, unet_cfg), dtype),
                        source, "UNet", dtype)
    return vae, unet


def _vae_from_ldm(ldm_vae: dict[str, torch.Tensor], source: str, scaling_factor: float,
                  dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    cfg = infer_vae_config(ldm_vae, source=source, scaling_factor=scaling_factor)
    return build_module(AutoencoderKL, cfg, lc.vae_to_diffusers(ldm_vae, cfg).items(), source, "VAE", dtype)


# ---------------------------------------------------------------- diffusers folders and hub ids

def _load_diffusers(source: str, tokenizer: str | None, *, local: bool) -> Components:
    index = Path(source) / "model_index.json"
    try:
        model_index = json.loads(index.read_text()) if local else {}  # a hub id: the families that take any folder
    except (OSError, ValueError):
        model_index = {}
    family = family_of_folder(model_index if isinstance(model_index, dict) else {})
    if family is None:
        raise UserError(f"{source}: no supported model family loads this diffusers folder "
                        f"({model_index.get('_class_name', 'no _class_name')})")
    return family.load_diffusers(source, tokenizer, local=local)


def load_diffusers_parts(source: str, classes: dict[str, type], *, local: bool, hint: str) -> dict[str, Any]:
    """Each `subfolder -> class` of a diffusers folder or hub id, loaded; a failure is one line ending in `hint`."""
    try:
        return {sub: cls.from_pretrained(source, subfolder=sub, local_files_only=local) for sub, cls in classes.items()}
    except (OSError, ValueError, EnvironmentError) as err:
        where = "folder" if local else "hub id"
        raise UserError(f"{source}: cannot load this diffusers {where} ({first_line(err)}); {hint}") from None


def stored_unet_dtype(source: str, loaded: torch.dtype) -> torch.dtype:
    """The precision a local diffusers folder's UNet is stored in (diffusers loads it as float32, so the loaded
    model no longer tells): its first .safetensors file's main dtype; `loaded` for anything else (.bin, hub ids)."""
    folder = Path(source) / "unet"
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return loaded
    with open_checkpoint(files[0]) as file:
        dtype = main_dtype(file.meta)
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else loaded


def prediction_type(source: str, *, local: bool) -> str | None:
    """The scheduler's prediction_type in a local diffusers folder (v_prediction for v-models), else None."""
    config = Path(source) / "scheduler" / "scheduler_config.json"
    if not local or not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("prediction_type")
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{config}: unreadable scheduler config ({first_line(err)})") from None


def first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ---------------------------------------------------------------- --vae

def load_vae(source: str, *, scaling_factor: float) -> AutoencoderKL:
    """A VAE from a file (ldm or diffusers layout, or a full checkpoint's VAE) or a diffusers folder;
    `scaling_factor` is the model family's latent scale (a file does not record it)."""
    path = Path(source).expanduser()
    if path.is_dir():
        sub = "vae" if (path / "vae" / "config.json").is_file() else None
        if not sub and not (path / "config.json").is_file():
            raise UserError(f"{source}: folder holds no diffusers VAE (no config.json or vae/config.json)")
        try:
            return AutoencoderKL.from_pretrained(str(path), subfolder=sub, local_files_only=True)
        except (OSError, ValueError) as err:
            raise UserError(f"{source}: cannot load this VAE folder ({first_line(err)})") from None
    sd, _ = read_state_dict(path)
    sd = {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if any(k.startswith(lc.VAE_PREFIX) for k in sd):
        sd = lc.strip_prefix(sd, lc.VAE_PREFIX)
    sd = {k: v for k, v in sd.items() if k.startswith(VAE_TOP_LEVEL)}
    if not sd:
        raise UserError(f"{source}: not a VAE (no encoder/decoder tensors); pass a VAE .safetensors/.ckpt or folder")
    if any(".down_blocks." in k for k in sd):
        sd = lc.vae_to_ldm(sd, _diffusers_vae_layout(sd))
    return _vae_from_ldm(sd, str(path), scaling_factor)


def _diffusers_vae_layout(sd: dict[str, torch.Tensor]) -> dict:
    blocks = {int(k.split(".")[2]) for k in sd if k.startswith("encoder.down_blocks.")}
    resnets = {int(k.split(".")[4]) for k in sd if k.startswith("encoder.down_blocks.0.resnets.")}
    return {"block_out_channels": [0] * len(blocks), "layers_per_block": len(resnets)}
