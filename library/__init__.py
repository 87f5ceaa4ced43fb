"""sd-trainer: fine-tuning for Stable Diffusion 1.x/2.x, compatible with sd-scripts' files and configs."""

__version__ = "0.1.0"

from library import offline_imports as _offline_imports

_offline_imports.install()  # before anything imports diffusers, which imports bitsandbytes
