"""SAI ModelSpec metadata (`modelspec.*`) for the files we write, as sd-scripts fills it for SD 1.x/2.x."""

from __future__ import annotations

import datetime

from library import __version__

IMPL_STABILITY_AI = "https://github.com/Stability-AI/generative-models"
IMPL_DIFFUSERS = "diffusers"
TRAINER_VERSION = f"sd-trainer/{__version__}"  # in sd-scripts' "sd-scripts/<commit>" form
# sai_model_spec.BASE_METADATA of sd-scripts 48d368fa (the release that also writes implementation_version).
MODELSPEC_VERSION = "1.0.1"


def architecture(v2: bool, v_parameterization: bool, suffix: str | None = None) -> str:
    """`stable-diffusion-v1`, `stable-diffusion-v2-512` or `stable-diffusion-v2-768-v`, plus `/lora` etc."""
    arch = ("stable-diffusion-v2-768-v" if v_parameterization else "stable-diffusion-v2-512") if v2 else "stable-diffusion-v1"
    return f"{arch}/{suffix}" if suffix else arch


def checkpoint_metadata(*, v2: bool, v_parameterization: bool, title: str, resolution: int | None = None,
                        now: datetime.datetime | None = None) -> dict[str, str]:
    """Metadata for a full single-file checkpoint (all values are strings, as safetensors requires)."""
    resolution = resolution or (768 if v2 and v_parameterization else 512)
    now = now or datetime.datetime.now()
    return {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": architecture(v2, v_parameterization),
        "modelspec.implementation": IMPL_STABILITY_AI,
        "modelspec.implementation_version": TRAINER_VERSION,
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": "v" if v_parameterization else "epsilon",
        "modelspec.date": now.replace(microsecond=0).isoformat(),
    }
