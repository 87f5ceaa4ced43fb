"""Textual-inversion embedding files in the AUTOMATIC1111, sd-scripts (kohya) and diffusers layouts; SDXL ones (one
vector set per text encoder) as sd-scripts' {"clip_l", "clip_g"} file or diffusers' pair of files."""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import safetensors
import safetensors.torch
import torch

from library.errors import UserError
from library.formats.a1111_pickle import save_pickle
from library.safe_write import atomic_dir, write_atomically

A1111, KOHYA, DIFFUSERS = "a1111", "kohya", "diffusers"
KOHYA_KEY = "emb_params"
DIFFUSERS_SAFETENSORS, DIFFUSERS_BIN = "learned_embeds.safetensors", "learned_embeds.bin"
# diffusers' textual_inversion_sdxl.py writes text encoder 2's vectors beside text encoder 1's, under this name.
DIFFUSERS_SAFETENSORS_2, DIFFUSERS_BIN_2 = "learned_embeds_2.safetensors", "learned_embeds_2.bin"
DIFFUSERS_FILES = (DIFFUSERS_SAFETENSORS, DIFFUSERS_BIN, DIFFUSERS_SAFETENSORS_2, DIFFUSERS_BIN_2)
# sd-scripts' sdxl_train_textual_inversion.py keys, in text-encoder order (A1111 needs both; ComfyUI reads each).
SDXL_KEYS = ("clip_l", "clip_g")
# A1111 writes the CLIP id of "*" as its placeholder token; its loader ignores it, but the key must be there.
A1111_PLACEHOLDER, A1111_PLACEHOLDER_ID = "*", 265
SHORTHASH_LENGTH = 10
PICKLE_SUFFIXES = (".pt", ".bin")


@dataclass(frozen=True, eq=False)  # eq=False: a generated __eq__ would compare tensors, which has no truth value
class Embedding:
    vectors: torch.Tensor  # (n, dim) float32, CPU
    step: int  # A1111 "step", or safetensors metadata "ss_steps" when present, else 0
    name: str | None  # the name/token the file records; None for sd-scripts' emb_params
    layout: str  # "a1111" | "kohya" | "diffusers"


@dataclass(frozen=True, eq=False)
class SdxlEmbedding:
    vectors: dict[str, torch.Tensor]  # "clip_l" / "clip_g" -> (n, width) float32, CPU; the same n in both
    step: int  # safetensors metadata "ss_steps" when present, else 0
    layout: str  # "kohya" (sd-scripts' {"clip_l", "clip_g"} file) | "diffusers" (learned_embeds + learned_embeds_2)


# ---- saving -----------------------------------------------------------------------------------------------------

def a1111_shorthash(path) -> str | None:
    """A1111's checkpoint shorthash (sha256 of the whole file, first 10 hex digits); None unless `path` is a file."""
    path = Path(path)
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:SHORTHASH_LENGTH]


def save_a1111(path, vectors, *, name: str, step: int, sd_checkpoint: str | None = None,
               sd_checkpoint_name: str | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write the dict A1111's textual-inversion tab saves (a torch pickle A1111's safe unpickler accepts; A1111 names
    it after the file stem)."""
    path = Path(path)
    if path.suffix.lower() not in PICKLE_SUFFIXES:
        raise UserError(f"A1111 embedding {path} must end in .pt: the layout is a torch pickle of nested dicts, "
                        f"which safetensors cannot hold; rename it or save in the kohya layout")
    data = {
        "string_to_token": {A1111_PLACEHOLDER: A1111_PLACEHOLDER_ID},
        "string_to_param": {A1111_PLACEHOLDER: _stored(vectors, dtype)},
        "name": name,
        "step": int(step),
        "sd_checkpoint": sd_checkpoint,
        "sd_checkpoint_name": sd_checkpoint_name,
    }
    return save_pickle(data, path)


def save_kohya(path, vectors, *, metadata: Mapping[str, str] | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write sd-scripts' {"emb_params": (n, dim)}: .safetensors keeps `metadata`, .pt/.bin (a torch pickle) drops it."""
    path = Path(path)
    tensors = {KOHYA_KEY: _stored(vectors, dtype)}
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        meta = dict(metadata) if metadata else None
        return write_atomically(path, lambda tmp: safetensors.torch.save_file(tensors, str(tmp), metadata=meta))
    if suffix in PICKLE_SUFFIXES:
        return save_pickle(tensors, path)
    raise UserError(f"embedding file {path} has an unknown extension; name it .safetensors, .pt or .bin")


def save_diffusers(folder, vectors, *, token: str, metadata: Mapping[str, str] | None = None,
                   dtype: torch.dtype | None = None) -> Path:
    """Write folder/learned_embeds.safetensors = {token: (n, dim)}: what diffusers' load_textual_inversion reads."""
    folder = Path(folder)
    refuse_foreign_folder(folder)
    tensors = {token: _stored(vectors, dtype)}
    meta = {"format": "pt", **(metadata or {})}
    with atomic_dir(folder) as tmp:
        safetensors.torch.save_file(tensors, str(tmp / DIFFUSERS_SAFETENSORS), metadata=meta)
    return folder


def save_sdxl(path, vectors: Mapping[str, torch.Tensor], *, metadata: Mapping[str, str] | None = None,
              dtype: torch.dtype | None = None) -> Path:
    """Write sd-scripts' SDXL embedding {"clip_l": (n, 768), "clip_g": (n, 1280)} as .safetensors with `metadata`:
    what AUTOMATIC1111 (both keys), ComfyUI (each key for its encoder) and diffusers (one key per call) read."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"SDXL embedding {path} must end in .safetensors: the {'/'.join(SDXL_KEYS)} layout is "
                        "saved as safetensors only")
    tensors = {key: _stored(vectors[key], dtype) for key in SDXL_KEYS}
    _check_counts(path, tensors, error=ValueError)  # our own vectors: a bug, not a user's file
    meta = dict(metadata) if metadata else None
    return write_atomically(path, lambda tmp: safetensors.torch.save_file(tensors, str(tmp), metadata=meta))


def save_sdxl_diffusers(folder, vectors: Mapping[str, torch.Tensor], *, token: str,
                        metadata: Mapping[str, str] | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write what diffusers' textual_inversion_sdxl.py writes: folder/learned_embeds.safetensors = {token: clip_l}
    and folder/learned_embeds_2.safetensors = {token: clip_g}, each read by one load_textual_inversion call."""
    folder = Path(folder)
    refuse_foreign_folder(folder)
    tensors = {key: _stored(vectors[key], dtype) for key in SDXL_KEYS}
    _check_counts(folder, tensors, error=ValueError)
    meta = {"format": "pt", **(metadata or {})}
    with atomic_dir(folder) as tmp:
        for key, name in zip(SDXL_KEYS, (DIFFUSERS_SAFETENSORS, DIFFUSERS_SAFETENSORS_2)):
            safetensors.torch.save_file({token: tensors[key]}, str(tmp / name), metadata=meta)
    return folder


def refuse_foreign_folder(folder: Path) -> None:
    # The folder is replaced as a whole, so anything else in it would be deleted with the old embedding.
    if folder.exists() and not folder.is_dir():
        raise UserError(f"diffusers embedding folder {folder} is a file; name a folder (new or an old embedding's)")
    if folder.is_dir():
        others = sorted(p.name for p in folder.iterdir() if p.name not in DIFFUSERS_FILES)
        if others:
            raise UserError(f"diffusers embedding folder {folder} holds other files ({others[0]}, ...) that saving "
                            f"would delete; name a new folder")


def _stored(vectors: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if not isinstance(vectors, torch.Tensor) or vectors.dim() not in (1, 2):
        raise ValueError(f"embedding vectors must be a (n, dim) or (dim,) tensor, got {_describe(vectors)}")
    stored = vectors.detach().reshape(-1, vectors.shape[-1]).to("cpu", dtype or vectors.dtype)
    # clone: a view (e.g. the last rows of a text encoder's embedding matrix) shares its storage, which safetensors
    # refuses and a torch pickle would write whole.
    return stored.contiguous().clone()


# ---- loading ----------------------------------------------------------------------------------------------------

def is_embedding_file(path) -> bool:
    """True when load_embedding(path) succeeds (an SD 1.x/2.x embedding)."""
    return _loads(load_embedding, path)


def is_any_embedding_file(path) -> bool:
    """True for an embedding of any family: load_embedding(path) or load_sdxl_embedding(path) succeeds."""
    return _loads(load_embedding, path) or _loads(load_sdxl_embedding, path)


def _loads(load, path) -> bool:
    try:
        load(path)
    except UserError:
        return False
    return True


def load_embedding(path) -> Embedding:
    """Read an embedding in any of the three layouts (a file, or a diffusers folder); bad input -> UserError."""
    path = _embedding_file(Path(path))
    if path.suffix.lower() == ".safetensors":
        data, metadata = _read_safetensors(path)
    else:
        data, metadata = _read_pickle(path), {}
    return _parse(path, data, _metadata_step(metadata))


def load_sdxl_embedding(path) -> SdxlEmbedding:
    """Read an SDXL embedding: sd-scripts' {"clip_l", "clip_g"} file (.safetensors or a torch pickle), or a folder
    of diffusers' learned_embeds + learned_embeds_2 files; anything else -> UserError."""
    path = Path(path)
    if path.is_dir() and any((path / name).is_file() for name in (DIFFUSERS_SAFETENSORS_2, DIFFUSERS_BIN_2)):
        return _load_sdxl_diffusers(path)
    file = _embedding_file(path)
    if file.suffix.lower() == ".safetensors":
        data, metadata = _read_safetensors(file, wanted=SDXL_KEYS)
    else:
        data, metadata = _read_pickle(file), {}
    if not isinstance(data, dict) or not all(key in data for key in SDXL_KEYS):
        what = _sd_embedding_kind(file, data)
        raise UserError(f"{path} is not an SDXL embedding: it holds {what}; an SDXL embedding has both "
                        f"{' and '.join(SDXL_KEYS)} tensors (sd-scripts' sdxl_train_textual_inversion.py files)")
    vectors = {key: _vectors(file, key, data[key]) for key in SDXL_KEYS}
    _check_counts(path, vectors)
    return SdxlEmbedding(vectors, _metadata_step(metadata), KOHYA)


def _load_sdxl_diffusers(folder: Path) -> SdxlEmbedding:
    vectors, step = {}, 0
    for key, names in zip(SDXL_KEYS, ((DIFFUSERS_SAFETENSORS, DIFFUSERS_BIN), (DIFFUSERS_SAFETENSORS_2, DIFFUSERS_BIN_2))):
        file = next((folder / name for name in names if (folder / name).is_file()), None)
        if file is None:
            raise UserError(f"diffusers SDXL embedding folder {folder} has no {names[0]} (text encoder "
                            f"{SDXL_KEYS.index(key) + 1}'s vectors); re-save it")
        embedding = load_embedding(file)
        vectors[key], step = embedding.vectors, max(step, embedding.step)
    _check_counts(folder, vectors)
    return SdxlEmbedding(vectors, step, DIFFUSERS)


def _check_counts(path: Path, vectors: Mapping[str, torch.Tensor], error: type[Exception] = UserError) -> None:
    counts = {key: v.shape[0] for key, v in vectors.items()}
    if len(set(counts.values())) != 1:
        described = ", ".join(f"{key} {n}" for key, n in counts.items())
        raise error(f"SDXL embedding {path} has different vector counts per text encoder ({described}); "
                        "each encoder needs one vector per token: re-save it")


def _sd_embedding_kind(path: Path, data: Any) -> str:
    try:
        embedding = _parse(path, data, 0)
    except UserError:
        return _entries(data) if isinstance(data, dict) else f"a {type(data).__name__}"
    return (f"one {embedding.vectors.shape[1]}-wide vector set ({embedding.layout} layout, an SD 1.x/2.x embedding: "
            f"train_textual_inversion.py's)")


def _embedding_file(path: Path) -> Path:
    if not path.exists():
        raise UserError(f"embedding {path} does not exist; check the path")
    if not path.is_dir():
        return path
    for name in (DIFFUSERS_SAFETENSORS, DIFFUSERS_BIN):
        if (path / name).is_file():
            return path / name
    raise UserError(f"folder {path} holds neither {DIFFUSERS_SAFETENSORS} nor {DIFFUSERS_BIN}; "
                    f"name the embedding file itself or a diffusers textual-inversion folder")


def _read_safetensors(path: Path, wanted: tuple[str, ...] = ()) -> tuple[dict[str, Any], dict[str, str]]:
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            # Only an embedding's own tensors are read (its single tensor, or the `wanted` keys when all are there):
            # a LoRA or a checkpoint is refused from its key list alone.
            read = keys if len(keys) == 1 else list(wanted) if wanted and set(wanted) <= set(keys) else []
            data = {key: f.get_tensor(key) if key in read else None for key in keys}
            return data, f.metadata() or {}
    except (safetensors.SafetensorError, OSError, ValueError) as err:
        raise _unreadable(path, err) from None


def _read_pickle(path: Path) -> Any:
    try:
        # mmap: a multi-GB checkpoint given by mistake is refused without reading it into memory.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # noqa: BLE001 - a corrupt pickle can fail with almost any exception type
        raise _unreadable(path, err) from None


def _unreadable(path: Path, err: Exception) -> UserError:
    reason = _reason(err)
    if reason.startswith("Unsupported global"):
        return UserError(f"embedding {path} pickles Python objects that safe loading refuses ({reason}); "
                         f"re-save it as plain tensors, e.g. as .safetensors")
    return UserError(f"embedding {path} could not be read ({reason}); it is corrupt or not a torch/safetensors "
                     f"file: re-download or re-save it")


def _reason(err: Exception) -> str:
    # torch's weights_only failure is a page of advice; the cause is what follows "WeightsUnpickler error:".
    text = str(err).split("WeightsUnpickler error:", 1)[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()] or [type(err).__name__]
    return lines[0].split(". ")[0].rstrip(".")[:160]


def _metadata_step(metadata: Mapping[str, str]) -> int:
    try:
        return int(metadata.get("ss_steps", 0))
    except ValueError:
        return 0


def _parse(path: Path, data: Any, step: int) -> Embedding:
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a textual-inversion embedding: it holds a {type(data).__name__}, "
                        f"not a dict of tensors")
    if "string_to_param" in data:
        return _parse_a1111(path, data)
    if "clip_l" in data and "clip_g" in data:
        raise UserError(f"{path} is an SDXL embedding (clip_l, clip_g); only SD 1.x/2.x embeddings are supported "
                        "here (sdxl_train_textual_inversion.py --weights continues SDXL ones)")
    if len(data) != 1:
        raise UserError(f"{path} is not a textual-inversion embedding: it holds {_entries(data)} "
                        f"(a LoRA or a checkpoint?); an embedding holds one tensor")
    key, value = next(iter(data.items()))
    vectors = _vectors(path, key, value)
    if key == KOHYA_KEY:
        return Embedding(vectors, step, None, KOHYA)
    return Embedding(vectors, step, str(key), DIFFUSERS)


def _parse_a1111(path: Path, data: dict) -> Embedding:
    params = data["string_to_param"]
    if not isinstance(params, dict) or not params:
        raise UserError(f"A1111 embedding {path} has no tensor in string_to_param; re-download or re-save it")
    if len(params) > 1:
        raise UserError(f"A1111 embedding {path} has several embeddings ({', '.join(map(str, params))}); "
                        f"split it into one file per term")
    key, value = next(iter(params.items()))
    name = data.get("name")
    step = data.get("step")
    return Embedding(_vectors(path, f"string_to_param.{key}", value), step if isinstance(step, int) else 0,
                     name if isinstance(name, str) else None, A1111)


def _vectors(path: Path, key: str, value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise UserError(f"embedding {path} holds a {type(value).__name__} under {key!r}, not a tensor; "
                        f"it is not a textual-inversion embedding")
    if value.dim() not in (1, 2) or value.shape[-1] == 0 or not value.is_floating_point():
        raise UserError(f"embedding {path} holds a {_describe(value)} under {key!r}; a textual-inversion embedding "
                        f"is a float (n_vectors, dim) or (dim,) tensor")
    if value.dim() == 2 and value.shape[0] == 0:
        raise UserError(f"embedding {path} holds no vectors under {key!r}; re-train or re-save it")
    # A copy, so the result does not keep the file memory-mapped (Windows could not overwrite it then).
    return value.detach().reshape(-1, value.shape[-1]).to("cpu", torch.float32, copy=True).contiguous()


def _entries(data: dict) -> str:
    first = next(iter(data), None)
    noun = "tensors" if all(v is None or isinstance(v, torch.Tensor) for v in data.values()) else "entries"
    return f"{len(data)} {noun} ({first}, ...)" if first is not None else "nothing"


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
