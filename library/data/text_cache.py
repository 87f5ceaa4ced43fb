"""Text-encoder output cache: encode each fixed caption once while the text encoder is frozen; memory or disk.

The encoding is a callable passed in (`encode(captions) -> Tensor [B, T, C]`), so this module knows nothing of
CLIP, clip_skip or max_token_length: the caller folds those into `encoder_identity`, which is part of every key.

sd-scripts has no text-encoder cache for SD 1.x/2.x (strategy_sd.py defines none); its SDXL cache is
`<stem>_te_outputs.npz` with keys hidden_state1/hidden_state2/pool2. To never collide with that file we write
    <stem>_sd_te_outputs.npz:  hidden_state     float32 (T, C)
                               sd_trainer_key   str: digest of encoder_identity + caption
In memory, entries are keyed by that digest, so images sharing a caption share one entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from library.errors import UserError
from library.safe_write import atomic_file

NPZ_SUFFIX = "_sd_te_outputs.npz"
STATE_KEY = "hidden_state"
OUR_KEY = "sd_trainer_key"
# Bump when the digest covers something new, so caches written before are re-encoded rather than trusted.
KEY_VERSION = 1
_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile)


@dataclass(frozen=True)
class TextRequest:
    """One image's final caption (prefix, suffix, class tokens already applied: the exact text to encode)."""

    image_path: Path
    caption: str


def npz_path(image_path: str | os.PathLike) -> Path:
    image_path = Path(image_path)
    return image_path.with_name(image_path.stem + NPZ_SUFFIX)


def caption_key(caption: str, encoder_identity: str) -> str:
    payload = {"version": KEY_VERSION, "encoder": encoder_identity, "caption": caption}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class TextEncoderCache:
    """Options `cache_text_encoder_outputs` (memory), `cache_text_encoder_outputs_to_disk` (to_disk) and
    `skip_cache_check` (skip_check: trust any disk file that holds a hidden state, as sd-scripts does).

    `encoder_identity` names everything the outputs depend on besides the caption: model, clip_skip,
    max_token_length, dtype.
    """

    def __init__(self, *, to_disk: bool, encoder_identity: str, skip_check: bool = False) -> None:
        self.to_disk = to_disk
        self.encoder_identity = encoder_identity
        self.skip_check = skip_check
        self._memory: dict[str, np.ndarray] = {}

    def missing(self, requests: Iterable[TextRequest]) -> list[TextRequest]:
        """The requests whose entry is absent or was made from another caption or encoder, in order."""
        return [request for request in requests if not self._is_cached(request)]

    def encode_missing(self, requests: Iterable[TextRequest], encode: Callable[[list[str]], torch.Tensor], *,
                       batch_size: int, progress: Callable[[int], None] | None = None) -> int:
        """Encode each distinct missing caption once, in batches of `batch_size`; returns how many captions that was."""
        if batch_size < 1:
            raise UserError(f"text encoder batch size is {batch_size}; set it to 1 or more")
        todo = self.missing(requests)
        captions = list(dict.fromkeys(request.caption for request in todo))
        states: dict[str, np.ndarray] = {}
        for start in range(0, len(captions), batch_size):
            batch = captions[start : start + batch_size]
            with torch.no_grad():
                out = encode(batch).float().cpu()
            if out.ndim != 3 or out.shape[0] != len(batch):
                raise ValueError(f"encode returned {tuple(out.shape)} for {len(batch)} captions, expected [B, T, C]")
            states.update(zip(batch, out.numpy()))
            if progress is not None:
                progress(len(batch))
        for request in todo:
            self._store(request, states[request.caption])
        return len(captions)

    def get(self, request: TextRequest) -> torch.Tensor:
        """The cached float32 (T, C) hidden state of `request`'s caption (call encode_missing first)."""
        if not self.to_disk:
            state = self._memory.get(caption_key(request.caption, self.encoder_identity))
        else:
            state = _read_state(npz_path(request.image_path))
        if state is None:
            raise KeyError(f"no cached text-encoder output for {request.image_path}; call encode_missing first")
        return torch.tensor(state)

    def _is_cached(self, request: TextRequest) -> bool:
        key = caption_key(request.caption, self.encoder_identity)
        if not self.to_disk:
            return key in self._memory
        try:
            with np.load(npz_path(request.image_path), allow_pickle=False) as npz:
                if STATE_KEY not in npz.files:
                    return False
                return self.skip_check or (OUR_KEY in npz.files and npz[OUR_KEY].item() == key)
        except _READ_ERRORS:  # absent, or cut short by a crash
            return False

    def _store(self, request: TextRequest, state: np.ndarray) -> None:
        key = caption_key(request.caption, self.encoder_identity)
        if not self.to_disk:
            self._memory[key] = state
            return
        with atomic_file(npz_path(request.image_path)) as tmp:
            # A file object, not a name: np.savez would append ".npz" to the temporary name.
            with open(tmp, "wb") as f:
                np.savez(f, **{STATE_KEY: state, OUR_KEY: np.array(key)})


def _read_state(path: Path) -> np.ndarray | None:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return npz[STATE_KEY] if STATE_KEY in npz.files else None
    except _READ_ERRORS:
        return None
