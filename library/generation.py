"""Generate images from a base model (SD 1.x/2.x, SDXL) with LoRA-family networks, textual-inversion embeddings and a
hypernetwork; SDXL images get sd-scripts' size/crop conditioning (gen_img.py's --original_width..., --ow/--oh...)."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from library.errors import UserError
from library.safe_write import atomic_file
from library.training.sampling import (LINE_OPTIONS, SamplePrompt, _embeddings, _pipeline, prompt_encoder,
                                       _quiet_diffusers, check_prompts, make_sampler, parse_prompt_line)

SIZE_MULTIPLE = 8  # diffusers' pipelines refuse other sizes
DEFAULT_STRENGTH = 0.8  # sd-scripts' img2img strength when --strength is not given
A1111_SEED_LIMIT = 4294967294  # A1111 draws random seeds below this, so they fit its seed box
# sd-scripts sampler names -> the names AUTOMATIC1111 writes (its parsers and Civitai know them); others kept as is.
SAMPLER_LABELS = {
    "ddim": "DDIM", "pndm": "PLMS", "lms": "LMS", "k_lms": "LMS", "euler": "Euler", "k_euler": "Euler",
    "euler_a": "Euler a", "k_euler_a": "Euler a", "heun": "Heun", "dpm_2": "DPM2", "k_dpm_2": "DPM2",
    "dpm_2_a": "DPM2 a", "k_dpm_2_a": "DPM2 a", "dpmsolver++": "DPM++ 2M",
}
# A1111's re_param: `key: value` pairs, a value either JSON-quoted or running to the next comma.
_PARAM = re.compile(r'\s*([\w ./-]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


@dataclass
class GenerationSetup:
    """What to load and the defaults every prompt gets unless it says otherwise (sd-scripts gen_img.py's)."""

    ckpt: str
    networks: list[tuple[str, float]] = field(default_factory=list)  # (network file, weight)
    embeddings: list[str] = field(default_factory=list)
    hypernetwork: str | None = None
    hypernetwork_strength: float = 1.0
    sampler: str = "ddim"
    steps: int = 50
    scale: float = 7.5
    width: int | None = 512  # None: the family's (sd-scripts' gen_img.py: 1024 for SDXL, else 512)
    height: int | None = 512
    seed: int | None = None  # None: a fresh random seed per image
    negative_prompt: str | None = None
    clip_skip: int | None = None
    v2: bool = False
    v_parameterization: bool = False
    vae: str | None = None
    dtype: torch.dtype = torch.float32
    device: str | None = None  # None: cuda when there is one
    sdxl: bool = False  # sd-scripts' gen_img.py --sdxl: the model must be an SDXL one
    # SDXL size/crop conditioning (sd-scripts' gen_img.py): None = the image size (original), original (negative), 0.
    original_width: int | None = None
    original_height: int | None = None
    original_width_negative: int | None = None
    original_height_negative: int | None = None
    crop_top: int | None = None
    crop_left: int | None = None


# SDXL prompt-line options of sd-scripts' gen_img.py (`a cat --ow 2048 --oh 1024 --ct 0 --cl 0`) -> field.
SIZE_LINE_OPTIONS = {"ow": "original_width", "oh": "original_height", "nw": "original_width_negative",
                     "nh": "original_height_negative", "ct": "crop_top", "cl": "crop_left"}


@dataclass(frozen=True)
class GenerationPrompt(SamplePrompt):
    """A prompt with the SDXL size/crop conditioning (ignored by families without it)."""

    original_width: int | None = None
    original_height: int | None = None
    original_width_negative: int | None = None
    original_height_negative: int | None = None
    crop_top: int | None = None
    crop_left: int | None = None

    def size_conditioning(self) -> dict[str, tuple[int, int]]:
        """diffusers' SDXL pipeline arguments, defaulted as sd-scripts' gen_img.py does; (height, width) order."""
        original = (self.original_height or self.height, self.original_width or self.width)
        negative = (self.original_height_negative or original[0], self.original_width_negative or original[1])
        crop, target = (self.crop_top or 0, self.crop_left or 0), (self.height, self.width)
        return {"original_size": original, "crops_coords_top_left": crop, "target_size": target,
                "negative_original_size": negative, "negative_crops_coords_top_left": crop,
                "negative_target_size": target}


@dataclass
class LoadedNetwork:
    file: Path
    weight: float
    network: Any
    name: str  # the file stem, as A1111 names a LoRA in prompts and infotexts
    hash: str


@dataclass(frozen=True)
class LoadedEmbedding:
    file: Path
    tokens: tuple[str, ...]  # the name, then name1, name2 ... for the further vectors
    hash: str


class Generator:
    """A base model loaded once, with its add-ons applied; network weights and files can change between images."""

    def __init__(self, setup: GenerationSetup):
        from library.models.loading import load_components

        self.setup = setup
        self.device = torch.device(setup.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.parts = load_components(setup.ckpt, options=setup, v_parameterization=setup.v_parameterization,
                                     vae=setup.vae, dtype=setup.dtype)
        if setup.sdxl and self.parts.family.name != "sdxl":
            raise UserError(f"--sdxl: {setup.ckpt} is an {self.parts.family.label} model, not an SDXL one; drop --sdxl")
        # sd-scripts' gen_img.py: 1024 x 1024 for SDXL, else 512 x 512, unless --W/--H say otherwise.
        side = 1024 if self.parts.family.name == "sdxl" else 512
        self.width, self.height = setup.width or side, setup.height or side
        self.model_name = _model_name(setup.ckpt)
        self.model_hash = _file_shorthash(setup.ckpt, 10)
        # Embeddings bundled into the networks' files (bundle_emb.*, pivotal tuning) install as A1111 installs them.
        self.embeddings = install_embeddings(self.parts, setup.embeddings,
                                             bundled=_bundled(self.parts, [f for f, _ in setup.networks]))
        self.hypernetwork = self._load_hypernetwork(setup.hypernetwork, setup.hypernetwork_strength)
        for module in self.parts.modules():
            module.to(self.device)
        self.networks: list[LoadedNetwork] = [self._load_network(f, w) for f, w in setup.networks]
        self._apply_networks()
        self._txt2img = _pipeline(self.parts)
        self._img2img = None

    # ------------------------------------------------------------------ networks
    def _load_network(self, file, weight: float) -> LoadedNetwork:
        from networks.files import read_network_file
        from networks.network import network_from_weights

        path = _existing(file, "network file", "--network_weights")
        weights, _ = read_network_file(path)
        network = network_from_weights(weight, str(path), self.parts.network_text_encoder, self.parts.unet,
                                       weights_sd=weights, for_inference=True)
        network.load_state_dict_flexible(weights, source=str(path))
        network.set_multiplier(weight)
        network.requires_grad_(False).eval().to(self.device, self.setup.dtype)
        return LoadedNetwork(path, float(weight), network, path.stem, _file_shorthash(path, 12, addnet=True))

    def _apply_networks(self) -> None:
        # Each network wraps the forward of the one applied before it, so they come off in reverse order and go
        # back on in order; only then can one in the middle be replaced.
        for loaded in reversed(self.networks):
            loaded.network.restore()
        for loaded in self.networks:
            loaded.network.apply_to(self.parts.network_text_encoder, self.parts.unet)

    def set_weight(self, index: int, weight: float) -> None:
        """Change network `index`'s weight in place (no reloading)."""
        self.networks[index].weight = float(weight)
        self.networks[index].network.set_multiplier(float(weight))

    def swap_network(self, index: int, file, weight: float | None = None) -> None:
        """Replace network `index` by another file (index == len(networks) adds one); keeps its weight by default."""
        if index < len(self.networks) and Path(file) == self.networks[index].file:
            if weight is not None:
                self.set_weight(index, weight)
            return
        if weight is None:
            weight = self.networks[index].weight if index < len(self.networks) else 1.0
        loaded = self._load_network(file, weight)  # before anything changes: a bad file leaves the setup intact
        for old in reversed(self.networks):
            old.network.restore()
        if index < len(self.networks):
            self.networks[index] = loaded
        else:
            self.networks.append(loaded)
        self._apply_networks()

    def _load_hypernetwork(self, file, strength: float):
        if not file:
            return None
        from networks.hypernetwork import load_hypernetwork

        network, info = load_hypernetwork(file)
        network.multiplier = strength
        network.requires_grad_(False).eval().to(self.device, self.setup.dtype)
        if network.apply_to(self.parts.unet) == 0:
            raise UserError(f"--hypernetwork {file}: its context widths {list(network.sizes)} match none of this "
                            f"model's attentions ({self.parts.unet.config.cross_attention_dim}); it is for another "
                            "model family")
        network.name = str(info["name"])
        return network

    # ------------------------------------------------------------------ prompts
    def request(self, line: str, *, where: str = "prompt", enum: int = 0) -> GenerationPrompt:
        """A prompt line in sd-scripts' syntax (`a cat --n blurry --d 3`, SDXL also `--ow 2048 --ct 0`); what it
        leaves out comes from the setup."""
        line, sizes = split_size_options(line, where)
        parsed = GenerationPrompt(**dataclasses.asdict(parse_prompt_line(line, where=where, enum=enum)), **sizes)
        given = given_fields(line) | set(sizes)
        s = self.setup
        defaults = {"negative_prompt": s.negative_prompt, "width": self.width, "height": self.height,
                    "steps": s.steps, "scale": s.scale, "seed": s.seed, "sample_sampler": s.sampler,
                    "clip_skip": s.clip_skip, **{f: getattr(s, f) for f in SIZE_LINE_OPTIONS.values()}}
        return dataclasses.replace(parsed, **{k: v for k, v in defaults.items() if k not in given})

    def resolve(self, prompt: SamplePrompt | str, **overrides: Any) -> SamplePrompt:
        """Every field settled: overrides applied, a random seed drawn if none is set, size and sampler checked."""
        request = self.request(prompt) if isinstance(prompt, str) else prompt
        if not isinstance(request, GenerationPrompt):
            request = GenerationPrompt(**dataclasses.asdict(request))
        request = dataclasses.replace(request, **overrides)
        if request.seed is None:
            request = dataclasses.replace(request, seed=random.SystemRandom().randrange(A1111_SEED_LIMIT))
        if request.sample_sampler is None:
            request = dataclasses.replace(request, sample_sampler=self.setup.sampler)
        check_prompts([request], request.sample_sampler, where=f"prompt #{request.enum + 1}")
        width, height = (v - v % SIZE_MULTIPLE for v in (request.width, request.height))
        if min(width, height) < SIZE_MULTIPLE:
            raise UserError(f"prompt #{request.enum + 1}: size {request.width}x{request.height} is too small; "
                            f"use at least {SIZE_MULTIPLE}x{SIZE_MULTIPLE} (--W/--H or --w/--h)")
        return dataclasses.replace(request, width=width, height=height)

    # ------------------------------------------------------------------ generating
    def generate(self, prompt: SamplePrompt | str, *, init_image: Image.Image | None = None,
                 strength: float = DEFAULT_STRENGTH, **overrides: Any) -> Image.Image:
        """One image; the same settings and seed give the same pixels (the noise comes from a seeded CPU RNG)."""
        request = self.resolve(prompt, **overrides)
        pipe = self._pipe(img2img=init_image is not None)
        pipe.scheduler = make_sampler(request.sample_sampler, v_parameterization=self.parts.v_parameterization)
        # A CPU generator: the same seed gives the same starting noise whatever the device.
        generator = torch.Generator("cpu").manual_seed(request.seed)
        with torch.no_grad(), _quiet_diffusers():
            kwargs = _embeddings(self._encoder(request.clip_skip), request)
            if init_image is not None:
                check_strength(strength, request.steps)
                size = (request.width, request.height)
                kwargs.update(image=init_image.convert("RGB").resize(size, Image.LANCZOS), strength=strength)
            else:
                kwargs.update(width=request.width, height=request.height)
            if "original_size" in inspect.signature(pipe.__call__).parameters:  # SDXL's size/crop conditioning
                kwargs.update(request.size_conditioning())
            result = pipe(num_inference_steps=request.steps, guidance_scale=request.scale, generator=generator,
                          output_type="pil", **kwargs)
        return result.images[0]

    def _pipe(self, *, img2img: bool):
        if not img2img:
            return self._txt2img
        if self._img2img is None:
            # The same modules: the networks, embeddings and hypernetwork applied to them apply here too.
            self._img2img = self.parts.family.pipeline(self.parts, img2img=True)
        return self._img2img

    def _encoder(self, clip_skip: int | None):
        from library.methods.ti_method import TokenExpandingEncoder

        encode = prompt_encoder(self.parts, clip_skip)  # SDXL: fixed layers, pooled output; clip_skip does not apply
        for embedding in self.embeddings:
            # A multi-vector embedding `name` is written out as `name name1 name2 …`, as it was trained.
            encode = TokenExpandingEncoder(encode, embedding.tokens[0], list(embedding.tokens))
        return encode

    # ------------------------------------------------------------------ PNG files
    def parameters(self, request: SamplePrompt, *, strength: float | None = None) -> str:
        """AUTOMATIC1111's infotext for an image made from `request` (resolved) with the current add-ons."""
        text = f"{request.prompt} {request.negative_prompt or ''}"
        used = [(e.tokens[0], e.hash) for e in self.embeddings if re.search(rf"(?<!\w){re.escape(e.tokens[0])}", text)]
        hyper = self.hypernetwork
        return a1111_parameters(
            request.prompt, request.negative_prompt, request.steps, request.sample_sampler, request.scale,
            request.seed, request.width, request.height, self.model_name,
            [(n.name, n.weight, n.hash) for n in self.networks], model_hash=self.model_hash,
            denoising_strength=strength, clip_skip=request.clip_skip, embeddings=used,
            hypernetwork=(hyper.name, hyper.multiplier) if hyper is not None else None)

    def save(self, image: Image.Image, request: SamplePrompt, path, *, strength: float | None = None) -> Path:
        """Write `image` as a PNG with its "parameters" text chunk, atomically."""
        return save_png(image, path, self.parameters(request, strength=strength))


def split_size_options(line: str, where: str) -> tuple[str, dict[str, int]]:
    """The line without sd-scripts' SDXL size options (--ow, --oh, --nw, --nh, --ct, --cl), and their values."""
    prompt, *options = (" " + line.strip()).split(" --")
    kept, sizes = [prompt], {}
    for option in options:
        flag, _, value = option.strip().partition(" ")
        if flag.lower() not in SIZE_LINE_OPTIONS:
            kept.append(option)
            continue
        if not re.fullmatch(r"\d+", value.strip()):
            raise UserError(f"{where}: '--{flag} {value.strip()}' needs a whole number >= 0, e.g. '--{flag} 1024'")
        sizes[SIZE_LINE_OPTIONS[flag.lower()]] = int(value.strip())
    return " --".join(kept).strip(), sizes


def given_fields(line: str) -> set[str]:
    """SamplePrompt fields a prompt line sets itself, split as parse_prompt_line splits it."""
    options = (" " + line.strip()).split(" --")[1:]
    flags = {(option.strip().split(None, 1) or [""])[0].lower() for option in options}
    return {LINE_OPTIONS[flag] for flag in flags if flag in LINE_OPTIONS}


def check_strength(strength: float, steps: int) -> None:
    if not 0 < strength <= 1:
        raise UserError(f"--strength {strength}: give a value in (0, 1] (how much of the image is re-noised)")
    if int(steps * strength) < 1:
        raise UserError(f"--strength {strength} with {steps} steps runs no step at all; raise --steps or --strength")


def save_png(image: Image.Image, path, parameters: str) -> Path:
    info = PngInfo()
    info.add_text("parameters", parameters)
    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return Path(path)


# ---------------------------------------------------------------------------------------------- embeddings
def install_embeddings(parts, files: Sequence, *, bundled: Sequence = ()) -> list[LoadedEmbedding]:
    """Add each file's token(s) to the tokenizer(s) (name = file stem, as A1111) and its vectors to the text
    encoder(s): one vector set for SD 1.x/2.x, SDXL's {"clip_l", "clip_g"} pair (one set per text encoder).
    `bundled`: (LoadedEmbedding, per-encoder vectors) of embeddings read from network files."""
    from library.methods.ti_method import NewTokenEmbedding, add_new_tokens

    if not files and not bundled:
        return []
    encoders = parts.text_encoders
    widths = [te.get_input_embeddings().weight.shape[1] for te in encoders]
    loaded, vectors = [], []  # vectors: per file, one (n, width) tensor per text encoder
    for file in files:
        path = _existing(file, "embedding", "--textual_inversion_embeddings")
        per_encoder = _embedding_vectors(parts, path, file)
        for tensor, width in zip(per_encoder, widths):
            if tensor.shape[1] != width:
                raise UserError(f"--textual_inversion_embeddings {file}: its vectors are {tensor.shape[1]} wide, "
                                f"this text encoder's are {width} (an embedding for another model family)")
        name = path.stem if path.is_file() else path.name
        tokens = (name, *(f"{name}{i}" for i in range(1, per_encoder[0].shape[0])))
        loaded.append(LoadedEmbedding(path, tokens, _file_shorthash(path, 12) if path.is_file() else "IsADirectory"))
        vectors.append(per_encoder)
    for embedding, per_encoder in bundled:
        if [t.shape[1] for t in per_encoder] != widths:
            raise UserError(f"{embedding.file}: its bundled embedding '{embedding.tokens[0]}' is "
                            f"{'/'.join(str(t.shape[1]) for t in per_encoder)} wide, this model's text encoders "
                            f"{'/'.join(map(str, widths))} (a network for another model family)")
        loaded.append(embedding)
        vectors.append(per_encoder)
    for i, (tokenizer, text_encoder) in enumerate(zip(parts.tokenizers, encoders)):
        first_id = add_new_tokens(tokenizer, [t for e in loaded for t in e.tokens],
                                  flag="--textual_inversion_embeddings",
                                  fix="rename the file (its stem is the embedding's name, and two cannot share one)")
        base = text_encoder.get_input_embeddings()
        embedding = NewTokenEmbedding(base, first_id, torch.cat([v[i] for v in vectors])).to(base.weight.device)
        text_encoder.set_input_embeddings(embedding)
    return loaded


def _bundled(parts, files: Sequence) -> list[tuple[LoadedEmbedding, list[torch.Tensor]]]:
    """The embeddings bundled into network files (bundle_emb.<name>.*): A1111 installs them with the network, under
    their own names, hashed as the network file."""
    from networks.files import bundled_embeddings, read_network_file

    out = []
    for file in files:
        path = _existing(file, "network file", "--network_weights")
        weights, _ = read_network_file(path)
        for name, per_encoder in bundled_embeddings(weights, parts.family.embedding_keys(), source=str(path)).items():
            tokens = (name, *(f"{name}{i}" for i in range(1, per_encoder[0].shape[0])))
            out.append((LoadedEmbedding(path, tokens, _file_shorthash(path, 12, addnet=True)),
                        [v.float() for v in per_encoder]))
    return out


def _embedding_vectors(parts, path: Path, file) -> list[torch.Tensor]:
    """The file's vectors for each of the model's text encoders, in order."""
    from library.formats.embedding_files import load_embedding, load_sdxl_embedding

    if len(parts.text_encoders) == 1:
        return [load_embedding(path).vectors]
    try:
        embedding = load_sdxl_embedding(path)
    except UserError as err:
        raise UserError(f"--textual_inversion_embeddings {file}: {parts.family.label} embeddings have one vector set "
                        f"per text encoder ({err})") from None
    return [embedding.vectors[key] for key in parts.family.embedding_keys()]


# ---------------------------------------------------------------------------------------------- A1111 infotext
def a1111_parameters(prompt: str, negative: str | None, steps: int, sampler: str, cfg: float, seed: int, width: int,
                     height: int, model_name: str | None, networks: Sequence[tuple[str, float, str | None]] = (), *,
                     model_hash: str | None = None, denoising_strength: float | None = None,
                     clip_skip: int | None = None, embeddings: Sequence[tuple[str, str]] = (),
                     hypernetwork: tuple[str, float] | None = None) -> str:
    """AUTOMATIC1111's "parameters" text (modules/processing.py create_infotext): the prompt (with the
    `<lora:name:weight>` tags A1111 prompts carry), `Negative prompt: …`, then `Steps: N, Sampler: X, CFG scale: Y,
    Seed: Z, Size: WxH, Model hash: H, Model: M, …, Lora hashes: "name: hash", TI hashes: "name: hash"`."""
    tags = [f"<lora:{name}:{weight:g}>" for name, weight, _ in networks]
    if hypernetwork is not None:
        tags.append(f"<hypernet:{hypernetwork[0]}:{hypernetwork[1]:g}>")
    prompt_text = " ".join([prompt, *tags]) if tags else prompt
    params = {
        "Steps": steps, "Sampler": SAMPLER_LABELS.get(sampler, sampler), "CFG scale": f"{cfg:g}", "Seed": seed,
        "Size": f"{width}x{height}", "Model hash": model_hash,
        # A1111 strips these so the value cannot break its parser.
        "Model": model_name.replace(",", "").replace(":", "") if model_name else None,
        "Denoising strength": None if denoising_strength is None else f"{denoising_strength:g}",
        "Clip skip": clip_skip if clip_skip and clip_skip > 1 else None,
        "Lora hashes": ", ".join(f"{name}: {h}" for name, _, h in networks if h) or None,
        "TI hashes": ", ".join(f"{name}: {h}" for name, h in embeddings) or None,
    }
    body = ", ".join(f"{key}: {_quote(value)}" for key, value in params.items() if value is not None)
    negative_text = f"\nNegative prompt: {negative}" if negative else ""
    return f"{prompt_text}{negative_text}\n{body}".strip()


def _quote(value: Any) -> str:
    text = str(value)
    # A1111's quote(): values holding its separators are written as JSON strings.
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",\n:") else text


def parse_a1111_parameters(text: str) -> dict[str, str]:
    """The infotext back as a dict: "Prompt", "Negative prompt" and each `key: value` of the last line."""
    *lines, last = text.strip().split("\n")
    if not _PARAM.match(last) or len(_PARAM.findall(last)) < 3:  # no parameter line: the text is all prompt
        lines, last = [*lines, last], ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PARAM.findall(last):
        out[key.strip()] = json.loads(value) if value.startswith('"') else value.strip()
    return out


# ---------------------------------------------------------------------------------------------- files
def _existing(file, what: str, flag: str) -> Path:
    path = Path(file).expanduser()
    if not path.exists():
        raise UserError(f"{flag} {file}: no such {what}; check the path")
    return path


def _model_name(source: str) -> str:
    path = Path(source)
    return path.stem if path.is_file() else path.name or source


def _file_shorthash(source, length: int, *, addnet: bool = False) -> str | None:
    """sha256 of a file, first `length` hex digits (A1111's shorthashes); `addnet`: of a .safetensors file's data
    after its header, as A1111 hashes LoRA files (so editing metadata keeps the hash)."""
    path = Path(source)
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        if addnet and path.suffix.lower() == ".safetensors":
            f.seek(8 + int.from_bytes(f.read(8), "little"))
        return hashlib.file_digest(f, "sha256").hexdigest()[:length]
