"""Preview images during training as sd-scripts makes them: prompt files, when to sample, samplers, PNG files."""

from __future__ import annotations

import contextlib
import dataclasses
import random
import re
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
)
from torch import nn

from library.config.config_text import parse_json, parse_toml
from library.config.suggest import did_you_mean
from library.errors import UserError
from library.models.components import Components
from library.models.family import TextConditioning
from library.safe_write import atomic_file
from library.training.prompt_weights import has_weights

# sd-scripts' sample_image_inference defaults and line_to_prompt_dict's clamp of --s.
DEFAULT_WIDTH, DEFAULT_HEIGHT, DEFAULT_STEPS, DEFAULT_SCALE = 512, 512, 30, 7.5
MIN_STEPS, MAX_STEPS = 1, 1000
MIN_SIZE, SIZE_MULTIPLE = 64, 8
# diffusers' PNDM (PRK warm-up of order 4) fails with fewer inference steps; sd-scripts would crash mid-training.
PNDM_MIN_STEPS = 4
# sd-scripts' get_my_scheduler: SD's training noise schedule, shared by every sampler.
BETA_START, BETA_END, BETA_SCHEDULE, TRAIN_TIMESTEPS = 0.00085, 0.012, "scaled_linear", 1000

# sd-scripts' --sample_sampler names (and the k_ aliases) -> diffusers schedulers.
SAMPLERS: dict[str, type] = {
    "ddim": DDIMScheduler, "pndm": PNDMScheduler,
    "lms": LMSDiscreteScheduler, "k_lms": LMSDiscreteScheduler,
    "euler": EulerDiscreteScheduler, "k_euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler, "k_euler_a": EulerAncestralDiscreteScheduler,
    "heun": HeunDiscreteScheduler,
    "dpm_2": KDPM2DiscreteScheduler, "k_dpm_2": KDPM2DiscreteScheduler,
    "dpm_2_a": KDPM2AncestralDiscreteScheduler, "k_dpm_2_a": KDPM2AncestralDiscreteScheduler,
    "dpmsolver": DPMSolverMultistepScheduler, "dpmsolver++": DPMSolverMultistepScheduler,
    "dpmsingle": DPMSolverSinglestepScheduler,
}

# Prompt-file line options (`--w 512`): flag -> SamplePrompt field.
LINE_OPTIONS = {"n": "negative_prompt", "w": "width", "h": "height", "d": "seed", "s": "steps", "l": "scale",
                "ss": "sample_sampler"}
# Keys of .toml/.json prompt tables -> SamplePrompt field (sd-scripts' prompt_dict keys, plus clip_skip).
DICT_KEYS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "width": "width", "height": "height",
             "seed": "seed", "sample_steps": "steps", "scale": "scale", "sample_sampler": "sample_sampler",
             "clip_skip": "clip_skip"}
# sd-scripts options for ControlNet and other model families (FLUX, Lumina): accepted so shared files load, unused.
FOREIGN_LINE_OPTIONS = frozenset({"cn", "g", "ctr", "rcfg"})
FOREIGN_KEYS = frozenset({"controlnet_image", "guidance_scale", "cfg_trunc_ratio", "renorm_cfg", "enum"})
PROMPT_SUFFIXES = (".txt", ".toml", ".json")


@dataclass(frozen=True)
class SamplePrompt:
    """One preview image request; `enum` is its position in the prompt file (used in the file name)."""

    prompt: str
    negative_prompt: str | None = None
    width: int = DEFAULT_WIDTH
    height: int = DEFAULT_HEIGHT
    steps: int = DEFAULT_STEPS
    scale: float = DEFAULT_SCALE  # classifier-free guidance; <= 1 turns it off
    seed: int | None = None  # None: a fresh random seed each time, and no seed in the file name
    sample_sampler: str | None = None  # None: the run's --sample_sampler
    clip_skip: int | None = None  # sd-scripts' meaning (2 = penultimate layer); only used without `encode`
    enum: int = 0


# ---------------------------------------------------------------------------------------------- prompt files
def load_prompts(path: str | Path) -> list[SamplePrompt]:
    """Read a sd-scripts prompt file (.txt lines, .toml `[prompt]` + `[[prompt.subset]]` or `[[prompt]]`, .json)."""
    path = Path(path)
    if path.suffix.lower() not in PROMPT_SUFFIXES:
        raise UserError(f"{path}: prompt files must end in .txt, .toml or .json; rename it or point "
                        "--sample_prompts at one")
    if not path.is_file():
        raise UserError(f"prompt file {path} does not exist; check --sample_prompts")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a BOM would otherwise start the first prompt
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None
    suffix = path.suffix.lower()
    if suffix == ".txt":
        entries = [(f"{path}:{n}", line.strip()) for n, line in enumerate(text.splitlines(), 1)
                   if line.strip() and not line.strip().startswith("#")]
    elif suffix == ".toml":
        entries = _toml_entries(parse_toml(text, path), path)
    else:
        entries = _json_entries(parse_json(text, path), path)
    return [_to_prompt(entry, where, enum) for enum, (where, entry) in enumerate(entries)]


def _toml_entries(data: dict, path: Path) -> list[tuple[str, Any]]:
    table = data.get("prompt")
    unknown = sorted(set(data) - {"prompt"})
    if table is None or unknown:
        raise UserError(f"{path}: expected a [prompt] table with [[prompt.subset]] tables (or [[prompt]] tables)"
                        + (f", found {', '.join(unknown)}" if unknown else "") + "; see sd-scripts' sample prompt docs")
    if isinstance(table, list):
        return [(f"{path}: [[prompt]] #{n}", entry) for n, entry in enumerate(table, 1)]
    subsets = table.get("subset")
    defaults = {k: v for k, v in table.items() if k != "subset"}
    if subsets is None:  # a lone [prompt] table is one prompt
        return [(f"{path}: [prompt]", defaults)]
    if not isinstance(subsets, list):
        raise UserError(f"{path}: 'subset' in [prompt] must be [[prompt.subset]] tables, not a single value")
    # A subset's keys override the [prompt] defaults (sd-scripts' dict(**a, **b) raises on any repeated key).
    return [(f"{path}: [[prompt.subset]] #{n}", {**defaults, **entry} if isinstance(entry, dict) else entry)
            for n, entry in enumerate(subsets, 1)]


def _json_entries(data: Any, path: Path) -> list[tuple[str, Any]]:
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of prompts (objects or prompt-file lines), "
                        f"got {type(data).__name__}; wrap the prompts in [ ... ]")
    return [(f"{path}: entry #{n}", entry) for n, entry in enumerate(data, 1)]


def _to_prompt(entry: Any, where: str, enum: int) -> SamplePrompt:
    if isinstance(entry, str):
        return parse_prompt_line(entry, where=where, enum=enum)
    if isinstance(entry, dict):
        return _from_dict(entry, where, enum)
    raise UserError(f"{where}: a prompt must be a table/object or a prompt line, got {type(entry).__name__}")


def parse_prompt_line(line: str, *, where: str = "prompt", enum: int = 0) -> SamplePrompt:
    """`a cat --n blurry --w 768 --h 512 --d 1 --s 20 --l 7 --ss euler_a` -> SamplePrompt (sd-scripts syntax)."""
    # Options follow " --", as in sd-scripts; the leading space lets a line start with an option.
    prompt, *options = (" " + line.strip()).split(" --")
    fields: dict[str, Any] = {}
    for option in options:
        match = re.fullmatch(r"(\S+)\s*(.*)", option.strip(), re.DOTALL)
        flag, value = (match[1].lower(), match[2].strip()) if match else ("", "")
        if flag in FOREIGN_LINE_OPTIONS:
            continue
        if flag not in LINE_OPTIONS:
            raise UserError(f"{where}: unknown option '--{flag}'{did_you_mean(flag, LINE_OPTIONS)}; use "
                            + ", ".join(f"--{f}" for f in LINE_OPTIONS) + " (write ' --' only before an option)")
        if not value:
            raise UserError(f"{where}: option '--{flag}' needs a value, e.g. '--{flag} {_EXAMPLES[flag]}'")
        fields[LINE_OPTIONS[flag]] = _line_value(flag, value, where)
    return _build(prompt.strip(), fields, where, enum)


_EXAMPLES = {"n": "blurry", "w": "512", "h": "512", "d": "42", "s": "30", "l": "7.5", "ss": "euler_a"}


def _line_value(flag: str, value: str, where: str) -> Any:
    if flag in ("n", "ss"):
        return value
    pattern, kind = (r"\d+(\.\d*)?|\.\d+", "a number") if flag == "l" else (r"\d+", "a whole number >= 0")
    if not re.fullmatch(pattern, value):
        raise UserError(f"{where}: '--{flag} {value}' needs {kind}, e.g. '--{flag} {_EXAMPLES[flag]}'")
    return float(value) if flag == "l" else int(value)


def _from_dict(entry: dict, where: str, enum: int) -> SamplePrompt:
    fields: dict[str, Any] = {}
    for key, value in entry.items():
        if key in FOREIGN_KEYS or key == "subset":
            continue
        if key not in DICT_KEYS:
            raise UserError(f"{where}: unknown key '{key}'{did_you_mean(key, DICT_KEYS)}; "
                            f"valid keys: {', '.join(DICT_KEYS)}")
        if value is not None:
            fields[DICT_KEYS[key]] = _check_type(key, value, where)
    prompt = fields.pop("prompt", "")
    return _build(prompt, fields, where, enum)


def _check_type(key: str, value: Any, where: str) -> Any:
    if key in ("prompt", "negative_prompt", "sample_sampler"):
        ok = isinstance(value, str)
        wanted = "text"
    elif key == "scale":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
        wanted = "a number >= 0"
    else:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        wanted = "a whole number >= 0"
    if not ok:
        raise UserError(f"{where}: '{key}' must be {wanted}, got {value!r}")
    return float(value) if key == "scale" else value


def _build(prompt: str, fields: dict[str, Any], where: str, enum: int) -> SamplePrompt:
    if "sample_sampler" in fields:
        fields["sample_sampler"] = _sampler_key(fields["sample_sampler"], where)
    if "steps" in fields:  # sd-scripts clamps --s to 1..1000 rather than refusing
        fields["steps"] = max(MIN_STEPS, min(MAX_STEPS, fields["steps"]))
    if fields.get("seed") is not None and fields["seed"] >= 2**64:  # torch.Generator's limit
        raise UserError(f"{where}: seed {fields['seed']} is too large; use a seed below 2**64")
    sample_prompt = SamplePrompt(prompt=prompt, enum=enum, **fields)
    if sample_prompt.sample_sampler:
        check_prompts([sample_prompt], sample_prompt.sample_sampler, where=where)
    return sample_prompt


def check_prompts(prompts: Iterable[SamplePrompt], default_sampler: str, *, where: str | None = None) -> None:
    """Refuse, before any image is made, what would fail mid-training: unknown samplers, PNDM under 4 steps."""
    _sampler_key(default_sampler, "--sample_sampler")
    for prompt in prompts:
        name = _sampler_key(prompt.sample_sampler or default_sampler, where or f"sample prompt #{prompt.enum + 1}")
        if SAMPLERS[name] is PNDMScheduler and prompt.steps < PNDM_MIN_STEPS:
            raise UserError(f"{where or f'sample prompt #{prompt.enum + 1}'}: the pndm sampler needs at least "
                            f"{PNDM_MIN_STEPS} steps, got {prompt.steps}; raise --s or choose another sampler")


def _sampler_key(name: str, where: str) -> str:
    key = name.strip().lower()
    if key not in SAMPLERS:
        raise UserError(f"{where}: unknown sampler '{name}'{did_you_mean(key, SAMPLERS)}; "
                        f"choose one of {', '.join(SAMPLERS)}")
    return key


# ---------------------------------------------------------------------------------------------- when and how
def should_sample(options: Any, *, step: int | None, epoch: int | None, at_first: bool) -> bool:
    """sd-scripts' rule: before training only with sample_at_first; per epoch when sample_every_n_epochs is set
    (sample_every_n_steps is then ignored); else mid-epoch every sample_every_n_steps steps.

    Call with epoch=None inside an epoch and with the 1-based epoch number at its end, as sd-scripts does.
    """
    if at_first or step == 0:
        return bool(_option(options, "sample_at_first"))
    every_epochs = _option(options, "sample_every_n_epochs")
    if every_epochs:
        return epoch is not None and epoch % every_epochs == 0
    every_steps = _option(options, "sample_every_n_steps")
    if every_steps:
        return epoch is None and step is not None and step % every_steps == 0
    return False


def _option(options: Any, name: str) -> Any:
    return options.get(name) if isinstance(options, Mapping) else getattr(options, name, None)


def make_sampler(name: str, *, v_parameterization: bool):
    """A fresh diffusers scheduler for a sd-scripts sampler name, on SD's noise schedule (as get_my_scheduler)."""
    key = _sampler_key(name, "--sample_sampler")
    kwargs: dict[str, Any] = {}
    if SAMPLERS[key] is DPMSolverMultistepScheduler:
        kwargs["algorithm_type"] = key
        if key == "dpmsolver":
            # diffusers >= 0.26 refuses the default final sigma 0 for the old dpmsolver algorithm.
            kwargs["final_sigmas_type"] = "sigma_min"
    if v_parameterization:
        kwargs["prediction_type"] = "v_prediction"
    with _quiet_diffusers():
        return SAMPLERS[key](num_train_timesteps=TRAIN_TIMESTEPS, beta_start=BETA_START, beta_end=BETA_END,
                             beta_schedule=BETA_SCHEDULE, **kwargs)


def sample_file_name(output_name: str | None, *, step: int, epoch: int | None, enum: int, seed: int | None,
                     when: time.struct_time | None = None) -> str:
    """sd-scripts' name: `[name_]{e000003|000120}_{enum:02d}_{YYYYmmddHHMMSS}[_seed].png`.

    sd-scripts passes epoch=0 for the sample_at_first round (`e000000`), the 1-based epoch at an epoch's end,
    and epoch=None within an epoch (then the global step names the file).
    """
    stamp = time.strftime("%Y%m%d%H%M%S", when or time.localtime())
    number = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    prefix = f"{output_name}_" if output_name else ""
    suffix = "" if seed is None else f"_{seed}"
    return f"{prefix}{number}_{enum:02d}_{stamp}{suffix}.png"


def render_size(prompt: SamplePrompt) -> tuple[int, int]:
    """(width, height) rounded down to a multiple of 8, at least 64, as sd-scripts does before generating."""
    return tuple(max(MIN_SIZE, v - v % SIZE_MULTIPLE) for v in (prompt.width, prompt.height))  # type: ignore


# ---------------------------------------------------------------------------------------------- generating
def sample_images(parts: Components, prompts: Sequence[SamplePrompt], *, output_dir: str | Path,
                  output_name: str | None, step: int, epoch: int | None, default_sampler: str,
                  device: str | torch.device, dtype: torch.dtype | None = None,
                  encode: Callable[[list[str]], torch.Tensor] | None = None, tracker: Any = None,
                  extra_modules: Iterable[nn.Module] = ()) -> list[Path]:
    """Generate one PNG per prompt into `<output_dir>/sample/`; return their paths in prompt order.

    The models are used as they are (adapters applied in place show in the images), put in eval mode and on
    `device` for the duration, then restored; `extra_modules` (e.g. the adapter network, whose dropout must
    be off) get the same treatment. The caller's torch / python / numpy random states are left untouched.
    `dtype` other than float32 runs under autocast; the weights are never cast.
    """
    check_prompts(prompts, default_sampler)
    device = torch.device(device)
    modules = [*parts.modules(), *extra_modules]
    save_dir = Path(output_dir) / "sample"
    paths = []
    with _preserved_rng(), _eval_on_device(modules, device), torch.no_grad():
        pipe = _pipeline(parts)
        for prompt in prompts:
            image = _generate(pipe, parts, prompt, default_sampler, device, dtype, encode)
            name = sample_file_name(output_name, step=step, epoch=epoch, enum=prompt.enum, seed=prompt.seed)
            with atomic_file(save_dir / name) as tmp:
                image.save(tmp, format="PNG")
            paths.append(save_dir / name)
            if tracker is not None:
                log_sample_image(tracker, image, enum=prompt.enum, prompt=prompt.prompt, step=step)
        del pipe
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return paths


def _pipeline(parts: Components) -> Any:
    # The family's pipeline with scheduler=None: each prompt sets its own, and the constructor would otherwise
    # rewrite the scheduler's config (steps_offset, clip_sample) with deprecation warnings. No safety checker.
    return parts.family.pipeline(parts)


def _generate(pipe: Any, parts: Components, prompt: SamplePrompt, default_sampler: str,
              device: torch.device, dtype: torch.dtype | None, encode) -> Any:
    pipe.scheduler = make_sampler(prompt.sample_sampler or default_sampler,
                                  v_parameterization=parts.v_parameterization)
    width, height = render_size(prompt)
    seed = prompt.seed if prompt.seed is not None else random.SystemRandom().getrandbits(63)
    # A private generator: the same seed gives the same image whatever the training RNG has done.
    generator = torch.Generator(device).manual_seed(seed)
    layer_chosen = bool(prompt.clip_skip and prompt.clip_skip > 1 and len(parts.text_encoders) == 1)
    if encode is None and (layer_chosen or _weighted(prompt)):
        encode = prompt_encoder(parts, prompt.clip_skip)
    if encode is not None:
        kwargs = _embeddings(encode, prompt)
    else:
        kwargs = {"prompt": prompt.prompt, "negative_prompt": prompt.negative_prompt}
    with _autocast(device, dtype), _quiet_diffusers():
        result = pipe(height=height, width=width, num_inference_steps=prompt.steps, guidance_scale=prompt.scale,
                      generator=generator, output_type="pil", **kwargs)
    return result.images[0]


def prompt_encoder(parts: Components, clip_skip: int | None):
    """The family's prompt encoding for one prompt's `--c` (sd-scripts' count: 2 = penultimate; families with two
    text encoders have fixed layers), long prompts cut at 75 tokens as the pipeline cuts them.

    Not the pipeline's `clip_skip` argument: that counts skipped layers (1 = penultimate) and reaches through
    `text_encoder.text_model`, which transformers 5 removed.
    """
    clip_skip = clip_skip if clip_skip and clip_skip > 1 and len(parts.text_encoders) == 1 else None
    return parts.family.prompt_encoder(parts, clip_skip=clip_skip, max_token_length=None)


def _weighted(prompt: SamplePrompt) -> bool:
    """Whether the prompt or its negative uses the "(word:1.2)" syntax: then it is read as weights, always (sd-scripts'
    sample images go through its long-prompt-weighting pipeline, which always reads them)."""
    return has_weights(prompt.prompt) or has_weights(prompt.negative_prompt or "")


def _embeddings(encode, prompt: SamplePrompt) -> dict[str, torch.Tensor]:
    """The pipeline's embedding arguments from a training prompt encoder (captions -> hidden states; with a
    `conditioning` method, also the pooled embeddings of families that have them, e.g. SDXL)."""
    captions = [prompt.prompt] if prompt.scale <= 1.0 else [prompt.prompt, prompt.negative_prompt or ""]
    # One batch, so long-prompt encoders return both at the same length, as the pipeline requires.
    weighted = {"weighted": True} if _weighted(prompt) else {}  # else the encoder's own setting (--weighted_captions)
    text = (encode.conditioning(captions, **weighted) if hasattr(encode, "conditioning")
            else TextConditioning(encode(captions, **weighted)))
    kwargs = {"prompt_embeds": text.hidden[:1]}
    if text.pooled is not None:
        kwargs["pooled_prompt_embeds"] = text.pooled[:1]
    if len(captions) > 1:  # no classifier-free guidance at scale <= 1: the pipeline never reads the negative
        kwargs["negative_prompt_embeds"] = text.hidden[1:]
        if text.pooled is not None:
            kwargs["negative_pooled_prompt_embeds"] = text.pooled[1:]
    return kwargs


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    with warnings.catch_warnings():
        # "dpmsolver is deprecated" would repeat for every preview image; the name is sd-scripts' choice.
        warnings.simplefilter("ignore", FutureWarning)
        # numpy 2 complains thousands of times per image about diffusers' np.log(tensor) in the k-samplers.
        warnings.filterwarnings("ignore", message=r"__array(_wrap)?__", category=DeprecationWarning)
        yield


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def _eval_on_device(modules: Sequence[nn.Module], device: torch.device) -> Iterator[None]:
    """Every module in eval mode and on `device`; afterwards each sub-module's own flag and each root's device."""
    flags = [(m, m.training) for root in modules for m in root.modules()]
    homes = [(root, _device_of(root)) for root in modules]
    try:
        for root in modules:
            root.eval()
            root.to(device)
        yield
    finally:
        for root, home in homes:
            if home is not None:
                root.to(home)
        for module, training in flags:
            module.training = training


def _device_of(module: nn.Module) -> torch.device | None:
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return None if tensor is None else tensor.device


@contextlib.contextmanager
def _preserved_rng() -> Iterator[None]:
    """sd-scripts saves and restores torch's RNG around sampling; we also keep python's and numpy's."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


# ---------------------------------------------------------------------------------------------- trackers
def log_sample_image(tracker: Any, image, *, enum: int, prompt: str, step: int) -> None:
    """Log under sd-scripts' tag `sample_{enum}`: a SummaryWriter, or an accelerate tracker (wandb as sd-scripts)."""
    tag = f"sample_{enum}"
    pixels = np.asarray(image.convert("RGB"))
    if hasattr(tracker, "add_image"):  # torch.utils.tensorboard.SummaryWriter
        tracker.add_image(tag, pixels, global_step=step, dataformats="HWC")
    elif getattr(tracker, "name", None) == "wandb":
        import wandb

        # sd-scripts: caption = prompt, commit=False so the image joins the training step's next log call.
        tracker.log({tag: wandb.Image(image, caption=prompt)}, commit=False)
    elif getattr(tracker, "name", None) == "tensorboard":
        tracker.log_images({tag: pixels[None]}, step=step, dataformats="NHWC")
    else:
        tracker.log_images({tag: [pixels]}, step=step)


def with_defaults(prompts: Iterable[SamplePrompt], **changes: Any) -> list[SamplePrompt]:
    """Fill fields the prompts left unset (None), e.g. with_defaults(prompts, clip_skip=options.clip_skip)."""
    out = []
    for prompt in prompts:
        unset = {k: v for k, v in changes.items() if getattr(prompt, k) is None}
        out.append(dataclasses.replace(prompt, **unset))
    return out
