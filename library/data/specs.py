"""Resolved dataset and subset settings: what --dataset_config or --train_data_dir resolve to, fallbacks applied."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SubsetSpec:
    """One subset: a DreamBooth image folder (`image_dir`) or a fine-tuning metadata file (`metadata_file`).

    Field names and defaults are sd-scripts' (the `[[datasets.subsets]]` keys of its dataset TOML).
    """

    image_dir: str | None = None
    metadata_file: str | None = None
    is_reg: bool = False
    is_val: bool = False  # every image of the subset validates (never trains)
    class_tokens: str | None = None
    num_repeats: int = 1
    caption_extension: str = ".caption"
    # captions
    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0
    # images
    color_aug: bool = False
    flip_aug: bool = False
    face_crop_aug_range: tuple[float, float] | None = None
    random_crop: bool = False
    alpha_mask: bool = False
    conditioning_data_dir: str | None = None  # --masked_loss: a mask per image, same file name (red channel = weight)
    cache_info: bool = False
    resize_interpolation: str | None = None
    custom_attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def is_fine_tuning(self) -> bool:
        return self.metadata_file is not None


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: subsets sharing a resolution, batch size and bucketing settings."""

    subsets: tuple[SubsetSpec, ...]
    resolution: tuple[int, int] = (512, 512)  # (width, height)
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    network_multiplier: float = 1.0
    validation_seed: int | None = None
    validation_split: float = 0.0
    resize_interpolation: str | None = None

    @property
    def is_fine_tuning(self) -> bool:
        return bool(self.subsets) and all(s.is_fine_tuning for s in self.subsets)
