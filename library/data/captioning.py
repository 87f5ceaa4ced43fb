"""Captioning images with a transformers vision-language model, shared by tools/make_captions.py (BLIP) and
tools/make_captions_by_git.py (GIT): where the model comes from (a local folder, or a hub id the user names), loading
it, generating captions in batches, cleaning them and writing `<stem><ext>` beside each image.

transformers and torch are imported inside the functions that need them, so `--help` and mistakes in the command
line (a missing folder, a .pth file) answer at once instead of after seconds of imports.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from library.data.images import CorruptImageError, load_image
from library.data.prep import PrepRun, list_images, sidecar, write_text
from library.errors import UserError

# Salesforce's blip_decoder (what sd-scripts' make_captions.py runs) feeds this prompt before every caption and cuts
# it off the result; the transformers port of the same weights captions alike when given the same prompt.
BLIP_PROMPT = "a picture of "

# sd-scripts' make_captions_by_git.py --remove_words: GIT (trained on TextCaps) often invents the text written in a
# picture ("a sign that says stop"); these phrases are cut out, in this order.
REMOVE_WORDS_PATTERNS = tuple(re.compile(pattern) for pattern in (
    r'(has|with|and) the (words?|letters?|name) (" ?[^"]*"|\w+)( ?(is )?(on|in) (the |her |their |him )?\w+)?',
    r'(with a sign )?that says ?(" ?[^"]*"|\w+)( ?on it)?',
    r"(with a sign )?that says ?(' ?(i'm)?[^']*'|\w+)( ?on it)?",
    r"with the number \d+ on (it|\w+ \w+)",
    r'with the words "',
    r"word \w+ on it",
    r"that says the word \w+ on it",
    "that says'the word \"( on it)?",
))

# Single weight files (sd-scripts' BLIP loads Salesforce's .pth): transformers needs the whole folder instead.
_WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".safetensors")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # "org/name": the form every BLIP and GIT model on the hub has

Captioner = Callable[[list[Image.Image]], list[str]]


@dataclass(frozen=True)
class ModelKind:
    name: str  # "BLIP", in messages
    flag: str  # the option naming the model
    model_type: str  # config.json's model_type
    architecture: str  # the class, in config.json's architectures when it lists any
    example: str  # a hub id to suggest


BLIP = ModelKind("BLIP", "--caption_weights", "blip", "BlipForConditionalGeneration",
                 "Salesforce/blip-image-captioning-large")
GIT = ModelKind("GIT", "--model_id", "git", "GitForCausalLM", "microsoft/git-large-textcaps")


def _download_hint(kind: ModelKind) -> str:
    return (f"download a transformers {kind.name} folder with `huggingface-cli download {kind.example} --local-dir "
            f"DIR` and pass {kind.flag} DIR (or pass the hub id {kind.example} to let transformers download it)")


@dataclass(frozen=True)
class ModelSource:
    name: str  # what from_pretrained gets: a folder or a hub id
    local: bool  # an existing folder: loaded with local_files_only, nothing is downloaded


def model_source(value: str | None, kind: ModelKind) -> ModelSource:
    """Where the model comes from: an existing folder, or a hub id ("org/name") that is not a folder here.

    Anything else that names no folder is a mistake reported now, before images are listed or transformers loads.
    """
    if not value:
        raise UserError(f"{kind.flag}: no model given; {_download_hint(kind)}")
    path = Path(value).expanduser()
    if path.is_dir():
        check_model_folder(path, kind)
        return ModelSource(str(path), local=True)
    if value.startswith(("http://", "https://")) or value.lower().endswith(_WEIGHT_FILE_SUFFIXES):
        what = "Salesforce's own BLIP checkpoint (what sd-scripts loads)" if kind is BLIP else "a weight file or URL"
        raise UserError(f"{kind.flag} {value}: {what}, not a transformers model folder; {_download_hint(kind)}")
    if path.exists():
        raise UserError(f"{kind.flag} {value}: a file, not a model folder; {_download_hint(kind)}")
    # "models/blip" where a folder "models" exists here is a local path with a typo, not a hub id to download.
    if _HUB_ID.match(value) and not value.startswith(".") and not Path(value.split("/")[0]).is_dir():
        return ModelSource(value, local=False)
    raise UserError(f"{kind.flag} {value}: no such folder; {_download_hint(kind)}")


def check_model_folder(folder: Path, kind: ModelKind) -> None:
    """A transformers folder holding a model of the right kind (config.json read directly: no imports needed)."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UserError(f"{kind.flag} {folder}: not a transformers model folder (no config.json); "
                        f"{_download_hint(kind)}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{config_file}: cannot be read as JSON ({err}); download the model folder again") from None
    check_config(config if isinstance(config, dict) else {}, str(folder), kind)


def check_config(config: dict, where: str, kind: ModelKind) -> None:
    model_type = config.get("model_type")
    if model_type != kind.model_type:
        raise UserError(f"{kind.flag} {where}: a {model_type or 'unknown'} model, not {kind.name} "
                        f"(config.json model_type {model_type!r}); {_download_hint(kind)}")
    architectures = config.get("architectures") or []
    # BLIP's question-answering and retrieval models share model_type "blip" but have no captioning head.
    if architectures and kind.architecture not in architectures:
        raise UserError(f"{kind.flag} {where}: a {', '.join(architectures)} model, not the captioning "
                        f"{kind.architecture}; {_download_hint(kind)}")


def load_model(source: ModelSource, kind: ModelKind, device):
    """(model in eval mode on `device`, processor) from the folder, or from the hub for a hub id."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor, BlipForConditionalGeneration

    model_class = BlipForConditionalGeneration if kind is BLIP else AutoModelForCausalLM
    try:
        if not source.local:  # the folder case was checked before anything was loaded
            check_config(AutoConfig.from_pretrained(source.name).to_dict(), source.name, kind)
        processor = AutoProcessor.from_pretrained(source.name, local_files_only=source.local)
        model = model_class.from_pretrained(source.name, local_files_only=source.local)
    # OSError is transformers' word for missing files, an unknown hub id and no network alike; ValueError for a
    # config.json it cannot make sense of (a model type this transformers does not know).
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        what = (f"cannot load the {kind.name} folder" if source.local
                else "no such folder, and the hub could not supply it as a model id")
        raise UserError(f"{kind.flag} {source.name}: {what} ({reason}); {_download_hint(kind)}") from None
    return model.to(device).eval(), processor


def pick_device(value: str | None):
    """--device, or cuda when there is one and cpu otherwise."""
    import torch

    if value is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
    except RuntimeError:
        raise UserError(f"--device {value}: not a torch device; give cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {value}: this torch sees no CUDA device; give --device cpu")
    return device


def blip_captioner(model, processor, device, *, beam_search: bool, num_beams: int, top_p: float, max_length: int,
                   min_length: int) -> Captioner:
    """BLIP captions as sd-scripts makes them: after BLIP_PROMPT, by beam search or nucleus sampling.

    max_length and min_length count the prompt's tokens too, as in Salesforce's blip_decoder.generate.
    """
    if beam_search:
        settings = {"do_sample": False, "num_beams": num_beams}
    else:  # blip_decoder samples with this repetition penalty; its beam search uses none
        settings = {"do_sample": True, "num_beams": 1, "top_p": top_p, "repetition_penalty": 1.1}

    def caption(images: list[Image.Image]) -> list[str]:
        inputs = processor(images=images, text=[BLIP_PROMPT] * len(images), return_tensors="pt").to(device)
        out = model.generate(pixel_values=inputs.pixel_values, input_ids=inputs.input_ids,
                             attention_mask=inputs.attention_mask, max_length=max_length, min_length=min_length,
                             **settings)
        # generate drops the prompt's closing [SEP] and returns the prompt in front of each caption: cut it off.
        prompt_tokens = inputs.input_ids.shape[1] - 1
        return processor.batch_decode(out[:, prompt_tokens:], skip_special_tokens=True)

    return caption


def git_captioner(model, processor, device, *, max_length: int) -> Captioner:
    """GIT captions as sd-scripts makes them: generate from the image alone, up to max_length tokens."""

    def caption(images: list[Image.Image]) -> list[str]:
        pixel_values = processor(images=images, return_tensors="pt").pixel_values.to(device)
        out = model.generate(pixel_values=pixel_values, max_length=max_length)
        return processor.batch_decode(out, skip_special_tokens=True)

    return caption


def remove_words(caption: str) -> str:
    """The caption without sd-scripts' --remove_words phrases (text GIT claims to read in the picture)."""
    for pattern in REMOVE_WORDS_PATTERNS:
        caption = pattern.sub("", caption)
    return tidy(caption)


def tidy(caption: str) -> str:
    """One space between words, none at the ends (removed phrases leave double and trailing spaces)."""
    return " ".join(caption.split())


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags both tools take (sd-scripts' names and defaults, then ours)."""
    parser.add_argument("train_data_dir", help="folder of images to caption")
    parser.add_argument("--caption_extension", default=".caption", help="extension of the caption files")
    parser.add_argument("--caption_extention", default=None,
                        help="sd-scripts' old misspelling of --caption_extension; wins when given")
    parser.add_argument("--batch_size", type=int, default=1, help="images captioned together")
    parser.add_argument("--max_data_loader_n_workers", type=int, default=None,
                        help="decode images in this many background processes (default: in the main process)")
    parser.add_argument("--pin_memory", action="store_true",
                        help="accepted for sd-scripts' command lines; no effect (images reach the model as PIL "
                             "images and become tensors in the main process)")
    parser.add_argument("--debug", action="store_true", help="print each image's caption")
    parser.add_argument("--recursive", action="store_true", help="caption images in subfolders too")
    parser.add_argument("--overwrite", action="store_true",
                        help="caption images that already have a caption file (default: skip them, so an "
                             "interrupted run resumes)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")


def run_captioning(args: argparse.Namespace, kind: ModelKind, model_value: str | None,
                   make_captioner: Callable[..., Captioner], *, clean: Callable[[str], str] = tidy,
                   seed: int | None = None) -> PrepRun:
    """The whole run: check the flags, list the images, load the model only if some need a caption, caption
    them, print the summary. `make_captioner(model, processor, device)` builds the model's captioner."""
    source = model_source(model_value, kind)
    extension = args.caption_extention or args.caption_extension
    if args.batch_size < 1:
        raise UserError(f"--batch_size {args.batch_size}: give 1 or more")
    if args.max_data_loader_n_workers is not None and args.max_data_loader_n_workers < 0:
        raise UserError(f"--max_data_loader_n_workers {args.max_data_loader_n_workers}: give 0 or more")
    device = pick_device(args.device)
    images = list_images(args.train_data_dir, recursive=args.recursive)
    if not images:
        hint = "" if args.recursive else "; add --recursive to look in its subfolders"
        raise UserError(f"train_data_dir {args.train_data_dir}: no images (.png, .jpg, .webp, .bmp){hint}")
    run = PrepRun(f"{kind.name} captions", images, overwrite=args.overwrite,
                  outputs=lambda image: [sidecar(image, extension)])
    empty = 0
    if run.todo:
        model, processor = load_model(source, kind, device)
        if seed is not None:
            import torch

            torch.manual_seed(seed)  # once, after loading, as sd-scripts: a run with the same seed samples alike
        captioner = make_captioner(model, processor, device)
        empty = caption_images(run, captioner, extension=extension, batch_size=args.batch_size,
                               workers=args.max_data_loader_n_workers, clean=clean, debug=args.debug)
    extra = [f"  {empty} captions came out empty (written as empty files)"] if empty else []
    print(run.summary(extra))
    return run


def caption_images(run: PrepRun, captioner: Captioner, *, extension: str, batch_size: int, workers: int | None,
                   clean: Callable[[str], str] = tidy, debug: bool = False) -> int:
    """Caption run.todo in batches of decodable images and write each caption; the number that came out empty."""
    import torch

    empty = 0
    loaded = run.progress(_decoded(run, workers), total=len(run.todo))
    for batch in _batches(loaded, batch_size):
        with torch.inference_mode():
            raw = captioner([image for _, image in batch])
        for (path, _), text in zip(batch, raw):
            caption = clean(text)
            if debug:
                changed = f" (was: {tidy(text)})" if caption != tidy(text) else ""
                tqdm.write(f"{path}: {caption}{changed}")
            write_text(sidecar(path, extension), caption)
            run.written += 1
            empty += not caption
    return empty


def _batches(loaded: Iterable[tuple[Path, Image.Image | None]], size: int) -> Iterator[list]:
    """Full batches of decoded images: an unreadable one (None) leaves no gap."""
    batch = []
    for path, image in loaded:
        if image is None:
            continue
        batch.append((path, image))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _decoded(run: PrepRun, workers: int | None) -> Iterator[tuple[Path, Image.Image | None]]:
    """(path, image or None) for run.todo in order, decoded here or (--max_data_loader_n_workers) in workers."""
    if workers is None:
        for path in run.todo:
            yield path, run.load(path)
        return
    from torch.utils.data import DataLoader

    loader = DataLoader(_ImageFiles(run.todo), batch_size=None, shuffle=False, num_workers=workers,
                        collate_fn=_unchanged)
    for path, image in loader:
        # A worker cannot add to run's records; decoding the (rare) failure again here reports it as run.load does.
        yield path, image if image is not None else run.load(path)


class _ImageFiles:
    """A map-style dataset of decoded images; None for one that cannot be decoded."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Path, Image.Image | None]:
        path = self.paths[index]
        try:
            return path, load_image(path)
        except CorruptImageError:
            return path, None


def _unchanged(item):
    return item  # PIL images go to the processor as they are, so no tensor collation

