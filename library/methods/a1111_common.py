"""What textual inversion and hypernetwork training share: AUTOMATIC1111 caption templates and checkpoint identity."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from library.config.run_config import RunConfig
from library.errors import UserError


def template_transform(config: RunConfig, *, name: str, require_name: bool):
    """The caption transform for --ti_template_file / --use_object_template / --use_style_template, or None."""
    from library.data.caption_templates import CaptionTemplates, read_template_file

    chosen = [flag for flag in ("ti_template_file", "use_object_template", "use_style_template") if config.get(flag)]
    if len(chosen) > 1:
        raise UserError(f"--{chosen[0]} and --{chosen[1]} both replace the captions: keep one of them")
    if not chosen:
        return None
    if chosen[0] == "ti_template_file":
        templates = CaptionTemplates(read_template_file(config.ti_template_file), name=name,
                                     word_regex=config.get("ti_filename_word_regex"),
                                     join_string=_join_string(config))
        if require_name and not templates.uses_name():
            raise UserError(f"--ti_template_file {config.ti_template_file}: no line has [name], so the embedding "
                            "would never appear in a caption; use a template with [name] (e.g. A1111's "
                            "subject_filewords.txt)")
        return templates
    return CaptionTemplates.builtin("object" if chosen[0] == "use_object_template" else "style", name=name)


def _join_string(config: RunConfig) -> str:
    value = config.get("ti_filename_join_string")
    return " " if value is None else value  # "" is a legal choice (A1111 allows it)


class CheckpointIdentity:
    """AUTOMATIC1111's `sd_checkpoint` (first 10 hex digits of the model file's sha256) and `sd_checkpoint_name`,
    computed at the first save so hashing a multi-GB file stays out of the time to the first step."""

    def __init__(self, source: str | None):
        self.source = source

    @cached_property
    def shorthash(self) -> str | None:
        from library.formats.embedding_files import a1111_shorthash

        return a1111_shorthash(self.source) if self.source else None

    def shorthash_from(self, metadata: dict[str, str] | None) -> str | None:
        """The shorthash, taken from the run's ss_new_sd_model_hash (the same sha256) when the metadata has it."""
        known = (metadata or {}).get("ss_new_sd_model_hash")
        if known and known != "IsADirectory":
            return known[:10]
        return self.shorthash

    @property
    def name(self) -> str | None:
        return Path(self.source).stem if self.source else None
