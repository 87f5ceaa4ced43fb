"""SAI ModelSpec metadata (`modelspec.*`) for the files we write, as sd-scripts fills it; the architecture string
and default resolution come from the model's family."""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING

from library import __version__

if TYPE_CHECKING:
    from library.models.family import ModelFamily

IMPL_STABILITY_AI = "https://github.com/Stability-AI/generative-models"
IMPL_DIFFUSERS = "diffusers"
TRAINER_VERSION = f"sd-trainer/{__version__}"  # in sd-scripts' "sd-scripts/<commit>" form
# sai_model_spec.BASE_METADATA of sd-scripts 48d368fa (the release that also writes implementation_version).
MODELSPEC_VERSION = "1.0.1"


def checkpoint_metadata(family: "ModelFamily", *, v_parameterization: bool, title: str, resolution: int | None = None,
                        now: datetime.datetime | None = None) -> dict[str, str]:
    """Metadata for a full single-file checkpoint (all values are strings, as safetensors requires)."""
    resolution = resolution or family.default_resolution(v_parameterization)
    now = now or datetime.datetime.now()
    return {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": family.modelspec_architecture(v_parameterization),
        "modelspec.implementation": IMPL_STABILITY_AI,
        "modelspec.implementation_version": TRAINER_VERSION,
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": "v" if v_parameterization else "epsilon",
        "modelspec.date": now.replace(microsecond=0).isoformat(),
    }
