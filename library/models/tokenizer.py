"""Load the CLIP BPE tokenizer: the bundled copy (offline), a local folder, or a HuggingFace hub id."""

from __future__ import annotations

from pathlib import Path

from transformers import CLIPTokenizer

from library.errors import UserError

BUNDLED_DIR = Path(__file__).parent / "clip_tokenizer"
MODEL_MAX_LENGTH = 77
# SD 2.x (OpenCLIP) pads with "!" (id 0), as stabilityai/stable-diffusion-2's tokenizer does; SD 1.x with <|endoftext|>.
SD2_PAD_TOKEN = "!"
# Every byte-level BPE vocabulary holds at least the 256 bytes and their '</w>' forms; fewer means no real vocab.
MIN_VOCAB = 512
FIX_HINT = ("pass --tokenizer with a folder holding vocab.json and merges.txt (or a diffusers model folder), "
            "or omit --tokenizer to use the bundled CLIP tokenizer")


def load_tokenizer(v2: bool = False, source: str | None = None) -> CLIPTokenizer:
    """The bundled tokenizer when source is None, else the folder or hub id the user named; bad input -> UserError."""
    if source is None:
        return _load_bundled(v2)
    path = Path(source).expanduser()
    if path.exists():
        return _load_folder(path, source)
    if _looks_like_path(source):
        raise UserError(f"tokenizer folder {source!r} does not exist; {FIX_HINT}")
    return _load_hub(source)


def _load_bundled(v2: bool) -> CLIPTokenizer:
    # local_files_only: the bundled files are complete, so loading them must never touch the network.
    tokenizer = CLIPTokenizer.from_pretrained(BUNDLED_DIR, local_files_only=True)
    if v2:
        # Set after loading: passing pad_token="!" to from_pretrained registers "!" as a special token,
        # which would split "8k!!" into pad ids instead of CLIP's BPE pieces.
        tokenizer.pad_token = SD2_PAD_TOKEN
    tokenizer.model_max_length = MODEL_MAX_LENGTH
    return tokenizer


def _load_folder(path: Path, source: str) -> CLIPTokenizer:
    if not path.is_dir():
        raise UserError(f"tokenizer {source!r} is a file, not a folder; {FIX_HINT}")
    if (path / "tokenizer").is_dir():  # a diffusers model folder keeps its tokenizer one level down
        path = path / "tokenizer"
    has_bpe = (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
    if not has_bpe and not (path / "tokenizer.json").is_file():
        # Checked up front: transformers would otherwise return an empty 2-token tokenizer without complaint.
        raise UserError(f"tokenizer folder {str(path)!r} has no vocab.json and merges.txt; {FIX_HINT}")
    tokenizer = _try_load(str(path), local_files_only=True)
    if tokenizer is None:
        raise UserError(f"tokenizer folder {str(path)!r} holds no loadable CLIP tokenizer; {FIX_HINT}")
    return tokenizer


def _load_hub(repo_id: str) -> CLIPTokenizer:
    # The user named a hub id, so downloading is allowed; a model repo (not a tokenizer repo) has it in tokenizer/.
    tokenizer = _try_load(repo_id) or _try_load(repo_id, subfolder="tokenizer")
    if tokenizer is None:
        raise UserError(f"tokenizer {repo_id!r} is not a local folder and no CLIP tokenizer could be downloaded "
                        f"from the HuggingFace hub under that id (check the id, your network and HF_HUB_OFFLINE); "
                        f"{FIX_HINT}")
    return tokenizer


def _try_load(source: str, **kwargs) -> CLIPTokenizer | None:
    """from_pretrained, or None when it fails or yields no real vocabulary."""
    try:
        tokenizer = CLIPTokenizer.from_pretrained(source, **kwargs)
    except Exception:  # noqa: BLE001 - hub, JSON and Rust tokenizers errors have no common base; all mean bad input
        return None
    # transformers 5 answers a missing/unreachable vocabulary with a bare 2-token tokenizer instead of an error.
    if len(tokenizer.get_vocab()) < MIN_VOCAB or tokenizer.eos_token_id is None:
        return None
    tokenizer.model_max_length = MODEL_MAX_LENGTH
    return tokenizer


def _looks_like_path(source: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else the user typed can only have been meant as a folder.
    return source.startswith((".", "~", "/")) or "\\" in source or source.count("/") > 1
