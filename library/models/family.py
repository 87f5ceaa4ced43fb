"""The model-family seam: everything that differs between SD 1.x, SD 2.x, SDXL... is asked of one `ModelFamily`.

A family module (e.g. `library/models/sd1.py`) defines a `ModelFamily` subclass and its instances; registering it is
one line in `FAMILY_MODULES` below. The rest of the code never branches on a version flag or hard-codes a constant:
it asks `parts.family` (a loaded model's family) for

- detection (`recognises` a single file's tensor names and shapes, `claims_folder` a diffusers model_index.json),
  loading and saving (`load_single_file`, `load_diffusers`, `single_file_state_dict`, `save_diffusers`) and the
  built-in tiny models (`tiny_models`, `build_tiny`);
- text: the encoders and tokenizers (tuples on `Components`), `prompt_encoder` (captions -> `TextConditioning`:
  hidden states, and a pooled output where the family has one), and the UNet call with the family's extra
  conditioning (`predict`, fed by the per-image `Batch.conditioning`);
- `latent_scale`, the adapter targets and `lora_te...` prefix of each text encoder (`adapter_targets`),
  the sampling pipeline (`pipeline`), the `ss_*` / modelspec strings (`ss_keys`, `modelspec_architecture`,
  `default_resolution`) and the textual-inversion layout (`embedding_keys`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Sequence

import torch

if TYPE_CHECKING:
    from library.models.checkpoint_io import TensorFile
    from library.models.components import Components

# One line per family module; each registers its families on import. Order is detection order.
FAMILY_MODULES = (
    "library.models.sd1",
    "library.models.sdxl",
)

_FAMILIES: dict[str, "ModelFamily"] = {}
_LOADED = False


@dataclass(frozen=True)
class TextConditioning:
    """What a family's text side gives the UNet: hidden states (B, T, W) and, where the family has one, a pooled
    embedding (B, W'). Rows can be cached per caption and stacked back into a batch."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    def rows(self) -> list["TextConditioning"]:
        pooled = [None] * len(self.hidden) if self.pooled is None else list(self.pooled)
        return [TextConditioning(h, p) for h, p in zip(self.hidden, pooled)]

    @staticmethod
    def stack(rows: Sequence["TextConditioning"]) -> "TextConditioning":
        pooled = None if rows[0].pooled is None else torch.stack([r.pooled for r in rows])
        return TextConditioning(torch.stack([r.hidden for r in rows]), pooled)


@dataclass(frozen=True)
class ImageConditioning:
    """Per-image facts a family's UNet may be conditioned on (SDXL's size/crop "time ids"); every family's batches
    carry them, SD 1.x/2.x ignore them. Sizes are (height, width) in pixels, `crop_top_left` (top, left)."""

    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]


@dataclass(frozen=True)
class AdapterTargets:
    """Where adapters go in one model part, and the prefix their names get (sd-scripts' `lora_unet`, `lora_te`...)."""

    prefix: str
    classes: tuple[str, ...]  # module class names whose Linear / 1x1 Conv children get adapters
    conv_classes: tuple[str, ...] = ()  # with conv_dim (LoCon): also these modules' 3x3 convolutions
    # model -> (module path -> the path adapter names use), when files name modules otherwise than the loaded model
    # does (SDXL: sd-scripts' SGM names `input_blocks.4.1...` for diffusers' `down_blocks.1.attentions.0...`).
    path_map: Callable[[torch.nn.Module], Callable[[str], str]] | None = None
    # sd-scripts' block layout of the adapter names, for block-wise network_args (networks/injection.BLOCK_LAYOUTS):
    # "sd" (25 blocks: 12 in, 1 mid, 12 out) or "sdxl" (23: embeddings, 9 in, 3 mid, 9 out, out).
    blocks: str = "sd"

    def paths(self, model: torch.nn.Module) -> Callable[[str], str]:
        return self.path_map(model) if self.path_map is not None else (lambda path: path)


@dataclass(frozen=True, eq=False)
class ModelFamily:
    """One model family. Subclasses implement the methods; instances are the registered families."""

    name: str  # short id: "sd1", "sd2"
    label: str  # for people: "SD 1.x"
    full_name: str  # in reports: "Stable Diffusion 1.x"
    latent_scale: float  # VAE latents are multiplied by this before noising (sd-scripts' vae_scale_factor)
    unet_targets: AdapterTargets = field(repr=False, default=None)
    text_encoder_targets: tuple[AdapterTargets, ...] = field(repr=False, default=())

    def __str__(self) -> str:
        return self.label

    # ------------------------------------------------------------------ detection and files
    def recognises(self, shapes: Mapping[str, torch.Tensor]) -> bool:
        """Whether a single file whose tensors (meta tensors: names and shapes) are `shapes` is this family's."""
        raise NotImplementedError

    def claims_folder(self, model_index: Mapping[str, Any]) -> bool:
        """Whether a diffusers folder with this model_index.json is loaded by this family's `load_diffusers`."""
        raise NotImplementedError

    def requested_by(self, options: Any) -> bool:
        """Whether the run's flags insist on this family (sd-scripts' --v2): a file of another family is refused."""
        return False

    def option_problems(self, options: Any, bucket_steps: Sequence[int]) -> list[str]:
        """What the run's options get wrong for this family's script (e.g. --v2 with SDXL); `bucket_steps` are the
        datasets' bucket_reso_steps."""
        kind = getattr(options, "script", "network")
        script = self.scripts.get(kind, self.network_script)
        problems = []
        bad = sorted({step for step in bucket_steps if step % self.bucket_step})
        if bad:
            problems.append(f"bucket_reso_steps {', '.join(map(str, bad))} must be a multiple of {self.bucket_step} "
                            f"for {self.label} (sd-scripts' {script} requires it)")
        mine = self.script_options.get(kind, ())
        owners: dict[tuple[str, str], list[str]] = {}  # (option, script) -> the labels of the families it serves
        for other in families():
            for name in other.script_options.get(kind, ()):
                if name not in mine and options.get(name) not in (None, False):
                    owners.setdefault((name, other.scripts[kind]), []).append(other.label)
        for (name, owner), labels in owners.items():
            problems.append(f"--{name} belongs to {owner} ({', '.join(labels)} models); {script} does not take it"
                            + (f": {self.script_options_hint[name]}" if name in self.script_options_hint else ""))
        return list(dict.fromkeys(problems))

    def full_tune_text_encoders(self, options: Any) -> tuple[float | None, ...]:
        """A full fine-tune's learning rate of each text encoder, None for one it leaves frozen. train_db.py trains
        its text encoder unless --stop_text_encoder_training is negative, at --learning_rate_te (or learning_rate)."""
        stop = options.get("stop_text_encoder_training")
        rate = options.get("learning_rate_te")
        return (rate if rate is not None else options.get("learning_rate"),) if stop is None or stop >= 0 else (None,)

    def text_cache_widths(self) -> tuple[int, int]:
        """(context width, pooled width) of the full-size model's text side: what one cached caption holds per token
        and once (0: no pooled output). Estimates the text-encoder cache before a model is loaded (the dry run)."""
        raise NotImplementedError

    def unet_block_of(self, unet: torch.nn.Module) -> Callable[[str], int] | None:
        """Parameter name -> the index of its block in the family's --block_lr list; None: no --block_lr here."""
        return None

    def refuse_requested(self, found: "ModelFamily", source: str) -> None:
        """Raise a UserError if a model of family `found` cannot serve a run that insists on this family."""

    def file_notes(self, shapes: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        """For inspection tools, from a recognised file's tensor names: (its text encoders, described; notes)."""
        return [], []

    def load_single_file(self, file: "TensorFile", source: str, tokenizer: str | None,
                         dtype: torch.dtype) -> "Components":
        raise NotImplementedError

    def load_diffusers(self, source: str, tokenizer: str | None, *, local: bool) -> "Components":
        raise NotImplementedError

    def single_file_state_dict(self, parts: "Components") -> dict[str, torch.Tensor]:
        """The whole model in the single-file layout A1111 / ComfyUI load (not yet cast)."""
        raise NotImplementedError

    def save_diffusers(self, parts: "Components", folder: Path) -> None:
        """Write a diffusers pipeline folder into `folder` (the caller makes it atomic and casts)."""
        raise NotImplementedError

    def after_load(self, parts: "Components") -> None:
        """Adjust a loaded model once flags are applied (e.g. the sample size of v-prediction models)."""

    @property
    def tiny_models(self) -> tuple[str, ...]:
        """Names of the built-in tiny random models of this family (`tiny-sd1`): tests and demos, no download."""
        return ()

    def build_tiny(self, name: str, *, seed: int = 0, tokenizer=None) -> "Components":
        """A seeded random tiny model; `tokenizer` is None (bundled), a folder / hub id, or a tokenizer object."""
        raise NotImplementedError

    # ------------------------------------------------------------------ text
    def prompt_encoder(self, parts: "Components", *, clip_skip: int | None, max_token_length: int | None,
                       weighted: bool = False):
        """captions -> hidden states; `.conditioning(captions)` -> TextConditioning; `.encoder_identity()` for
        caches. `weighted`: the captions' "(word:1.2)" weights apply (both calls also take `weighted=` per call)."""
        raise NotImplementedError

    def predict(self, unet: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                text: TextConditioning, images: Sequence[ImageConditioning]) -> torch.Tensor:
        """The UNet's prediction, with whatever extra conditioning the family's UNet takes."""
        return unet(noisy_latents, timesteps, text.hidden).sample

    lora_modelspec_implementation = "diffusers"  # sd-scripts' modelspec.implementation for this family's LoRAs
    latent_cache_suffix = "_sd.npz"  # sd-scripts' latent cache files: <stem>_<W>x<H><suffix>
    # sd-scripts' entry script of each kind (library.config.options: network, db, ti, hypernetwork) for this family's
    # models, and the bucket step its trainers require.
    scripts = {"network": "train_network.py", "db": "train_db.py", "ti": "train_textual_inversion.py",
               "hypernetwork": "train_hypernetwork.py"}
    bucket_step = 64
    # Options that only this family's script of a kind defines (sd-scripts' parsers differ: train_db.py has
    # --stop_text_encoder_training, sdxl_train.py --learning_rate_te1...); another family's script refuses them, with
    # the hint given here for the option it has instead.
    script_options: ClassVar[Mapping[str, tuple[str, ...]]] = {}
    script_options_hint: ClassVar[Mapping[str, str]] = {}

    @property
    def network_script(self) -> str:
        return self.scripts["network"]

    text_cache_suffix = "_sd_te_outputs.npz"  # --cache_text_encoder_outputs_to_disk files: <stem><suffix>

    def text_cache_arrays(self, parts: "Components", row: TextConditioning) -> dict[str, Any]:
        """One caption's conditioning as the named float32 arrays of its cache file."""
        return {"hidden_state": row.hidden.float().cpu().numpy()}

    def text_cache_row(self, parts: "Components", arrays: Mapping[str, Any]) -> TextConditioning | None:
        """A cache file's arrays back as a conditioning row; None when a key is missing."""
        return TextConditioning(torch.from_numpy(arrays["hidden_state"])) if "hidden_state" in arrays else None

    def embedding_keys(self) -> tuple[str, ...]:
        """Tensor names of an A1111 / sd-scripts embedding file, one per text encoder."""
        raise NotImplementedError

    # ------------------------------------------------------------------ sampling and metadata
    def pipeline(self, parts: "Components", img2img: bool = False):
        """A diffusers pipeline over the loaded modules (no scheduler: each prompt sets its own)."""
        raise NotImplementedError

    def ss_keys(self, v_parameterization: bool) -> dict[str, Any]:
        """sd-scripts' per-model `ss_*` keys (ss_v2, ss_base_model_version)."""
        raise NotImplementedError

    def base_model_version(self, v_parameterization: bool) -> str:
        return str(self.ss_keys(v_parameterization)["ss_base_model_version"])

    def modelspec_architecture(self, v_parameterization: bool, suffix: str | None = None) -> str:
        raise NotImplementedError

    def default_resolution(self, v_parameterization: bool) -> int:
        """The side of the images the family's models are trained at (modelspec, sampling defaults)."""
        raise NotImplementedError


# ---------------------------------------------------------------- the registry

def register(*families: ModelFamily) -> None:
    for family in families:
        _FAMILIES[family.name] = family


def families() -> list[ModelFamily]:
    """Every registered family, in detection order: FAMILY_MODULES' order (then registration order within a module,
    and families of unlisted modules last), whichever module was imported first. Registration order alone made the
    default family SDXL in a process that had imported library.models.sdxl before anything asked for the families."""
    global _LOADED
    if not _LOADED:
        for module in FAMILY_MODULES:
            importlib.import_module(module)
        _LOADED = True
    rank = {module: index for index, module in enumerate(FAMILY_MODULES)}
    return sorted(_FAMILIES.values(), key=lambda family: rank.get(type(family).__module__, len(rank)))


def family_named(name: str) -> ModelFamily:
    by_name = {family.name: family for family in families()}
    if name not in by_name:
        raise KeyError(f"no model family {name!r}; registered: {', '.join(by_name)}")
    return by_name[name]


def family_of_file(shapes: Mapping[str, torch.Tensor]) -> ModelFamily | None:
    return next((f for f in families() if f.recognises(shapes)), None)


def family_of_folder(model_index: Mapping[str, Any]) -> ModelFamily | None:
    return next((f for f in families() if f.claims_folder(model_index)), None)


def tiny_model_names() -> list[str]:
    return [name for family in families() for name in family.tiny_models]


def family_of_tiny(name: str) -> ModelFamily | None:
    return next((f for f in families() if name in f.tiny_models), None)


def requested_family(options: Any) -> ModelFamily | None:
    """The family the run's flags insist on, if any."""
    return next((f for f in families() if f.requested_by(options)), None)


def family_from_flags(options: Any) -> ModelFamily:
    """Before a model is loaded (or without one, in tests and tools): the family the flags insist on, else the
    first registered (SD 1.x), as sd-scripts assumes SD 1.x unless --v2."""
    return requested_family(options) or families()[0]


def all_lora_prefixes() -> list[str]:
    """Every adapter-name prefix any family gives (UNet and each text encoder), for file recognition."""
    prefixes: list[str] = []
    for family in families():
        for targets in (family.unet_targets, *family.text_encoder_targets):
            if targets is not None and targets.prefix not in prefixes:
                prefixes.append(targets.prefix)
    return prefixes
