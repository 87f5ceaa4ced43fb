"""Console set-up for entry points: our messages stay readable, library chatter and progress bars stay quiet."""

from __future__ import annotations

import logging
import os
import warnings


def quiet_libraries() -> None:
    """Called by entry points only (never at import): silence diffusers/transformers info logs and bars."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*torchvision.*")
