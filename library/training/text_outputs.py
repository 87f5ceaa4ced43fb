"""--cache_text_encoder_outputs_to_disk: each image's caption encoding in a file beside it, in its family's layout.

SDXL writes sd-scripts' `<stem>_te_outputs.npz` (hidden_state1, hidden_state2, pool2), so sd-scripts reuses our files
and we reuse its; SD 1.x/2.x (for which sd-scripts has no such cache) write `<stem>_sd_te_outputs.npz`. Each file
also holds `sd_trainer_key`, a digest of the caption and everything the encoding depends on: a file whose key differs
(an edited caption, another model or max_token_length) is encoded again. A file without it (written by sd-scripts)
is trusted only with --skip_cache_check, as sd-scripts trusts every file. Every image's file is read or written
before the first step (DiffusionMethod.texts_ready), as sd-scripts does.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np

from library.models.family import TextConditioning
from library.safe_write import atomic_file

OUR_KEY = "sd_trainer_key"
_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile)


class TextOutputFiles:
    def __init__(self, parts, encoder_identity: str, *, skip_check: bool):
        self.parts, self.family = parts, parts.family
        self.identity, self.skip_check = encoder_identity, skip_check

    def path(self, image_path: str | Path) -> Path:
        image_path = Path(image_path)
        return image_path.with_name(image_path.stem + self.family.text_cache_suffix)

    def key(self, caption: str) -> str:
        payload = json.dumps({"encoder": self.identity, "caption": caption}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def read(self, image_path, caption: str) -> TextConditioning | None:
        """The file's conditioning when it is there, complete and made from this caption and encoder."""
        try:
            with np.load(self.path(image_path), allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in npz.files}
        except _READ_ERRORS:  # absent, or cut short by a crash
            return None
        ours = arrays.pop(OUR_KEY, None)
        if ours is None and not self.skip_check:
            return None
        if ours is not None and ours.item() != self.key(caption):
            return None
        return self.family.text_cache_row(self.parts, arrays)

    def write(self, image_path, caption: str, row: TextConditioning) -> None:
        arrays = self.family.text_cache_arrays(self.parts, row) | {OUR_KEY: np.array(self.key(caption))}
        with atomic_file(self.path(image_path)) as tmp:
            with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to the temporary name
                np.savez(f, **arrays)
