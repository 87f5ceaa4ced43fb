"""sd-trainer: fine-tuning for Stable Diffusion 1.x/2.x, compatible with sd-scripts' files and configs."""

__version__ = "0.1.0"
