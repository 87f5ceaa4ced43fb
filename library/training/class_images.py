"""Class images for DreamBooth prior preservation: fill regularisation folders up to --num_class_images.

sd-scripts has no generator; this follows diffusers' DreamBooth example and the Dreambooth extension: the base
model draws the missing images from the class prompt before training, into the regularisation folder itself.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import PNDMScheduler
from tqdm.auto import tqdm

from library.data.subsets import find_images
from library.errors import UserError
from library.models.components import Components
from library.safe_write import atomic_file
from library.training.sampling import (
    PNDM_MIN_STEPS,
    SAMPLERS,
    SIZE_MULTIPLE,
    _autocast,
    _eval_on_device,
    _pipeline,
    _preserved_rng,
    _quiet_diffusers,
    make_sampler,
)

if TYPE_CHECKING:
    from library.data.plan import RunPlan

FILE_PREFIX = "class_"


@dataclass(frozen=True)
class ClassImageJob:
    """One regularisation folder to fill: it holds `have` images and should hold `want`."""

    folder: Path
    prompt: str
    negative_prompt: str | None
    have: int
    want: int
    width: int
    height: int
    caption_extension: str


def class_image_jobs(config: Mapping[str, Any], plan: RunPlan) -> list[ClassImageJob]:
    """One job per regularisation folder holding fewer than --num_class_images images; [] when that is unset/0.

    The folders come from the plan's dataset specs, which keep empty subsets (the plan only ignores their
    images). Images are counted as the dataset lists them (find_images), so a filled folder gives no job on a re-run.
    """
    want = config.get("num_class_images") or 0
    if want <= 0:
        return []
    jobs: dict[Path, ClassImageJob] = {}
    for spec in (dataset.spec for dataset in plan.datasets):
        for subset in spec.subsets:
            if not subset.is_reg or subset.image_dir is None or subset.num_repeats < 1:
                continue  # sd-scripts ignores subsets with num_repeats < 1: images there would not be used
            folder = Path(subset.image_dir)
            if folder.resolve() in jobs:
                continue  # one folder in two datasets: fill it once, at the first dataset's size
            have = len(find_images(folder))
            if have >= want:
                continue
            prompt = config.get("class_prompt") or subset.class_tokens
            if not prompt:
                raise UserError(f"no prompt for the class images of '{folder}': give --class_prompt, or class "
                                "tokens (class_tokens in the dataset config, or a '<repeats>_<class tokens>' folder)")
            width, height = (max(SIZE_MULTIPLE, v - v % SIZE_MULTIPLE) for v in spec.resolution)
            jobs[folder.resolve()] = ClassImageJob(folder, prompt, config.get("class_negative_prompt"), have, want,
                                                   width, height, subset.caption_extension)
    if jobs:
        _check_sampling(config)  # fail now, before any weights load, not after them
    return list(jobs.values())


def generate_class_images(parts: Components, jobs: Sequence[ClassImageJob], *, config: Mapping[str, Any],
                          device: str | torch.device, dtype: torch.dtype | None = None) -> int:
    """Generate the missing images of every job with the base model; return how many were written.

    Image `class_{i:05d}.png` always comes from seed base + i (base: --class_seed, else --seed, else 0), and the
    missing images take the lowest free indices, so a run that stops and restarts, or a deleted image, gives
    exactly the files an uninterrupted run writes. Batches are fixed blocks of --class_batch_size indices, always
    generated whole (only the missing images kept): a batched image differs by rounding with its batch-mates.
    A name a user's image or caption has is skipped, never overwritten. Each image gets a caption file holding
    its prompt, which training then reads. The caller's random states, and the models' modes and devices, are
    left as they were.
    """
    work = [(job, _free_indices(job, job.want - job.have)) for job in jobs if job.want > job.have]
    if not work:
        return 0
    device = torch.device(device)
    base = next((s for s in (config.get("class_seed"), config.get("seed")) if s is not None), 0)
    batch = max(1, config["class_batch_size"])
    for job, indices in work:
        print(f"class images: generating {len(indices)} for '{job.folder}' (\"{job.prompt}\")")
    written = 0
    modules = list(parts.modules())
    with (_preserved_rng(), _eval_on_device(modules, device), torch.no_grad(),
          tqdm(total=sum(len(i) for _, i in work), desc="class images") as bar):
        pipe = _pipeline(parts)
        for job, indices in work:
            wanted = set(indices)
            for block in sorted({index // batch for index in wanted}):
                chunk = list(range(block * batch, (block + 1) * batch))
                for index, image in zip(chunk, _generate(pipe, parts, job, chunk, base, config, device, dtype)):
                    if index in wanted:
                        _save(job, index, image)
                        written += 1
                        bar.update(1)
        del pipe
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return written


def _check_sampling(config: Mapping[str, Any]) -> None:
    steps, sampler = config["class_infer_steps"], config["class_sampler"]
    if steps < 1:
        raise UserError(f"--class_infer_steps must be at least 1, got {steps}")
    if SAMPLERS.get(sampler.strip().lower()) is PNDMScheduler and steps < PNDM_MIN_STEPS:
        raise UserError(f"--class_sampler {sampler} needs at least {PNDM_MIN_STEPS} steps, got --class_infer_steps "
                        f"{steps}; raise it or choose another sampler")


def _free_indices(job: ClassImageJob, count: int) -> list[int]:
    """The `count` lowest indices whose name `class_{i:05d}` holds no image (of any extension: both would read
    the same caption) and no caption other than the job's prompt (then it is a user's; an equal one is ours,
    left by a deleted image)."""
    images = {os.path.splitext(p.name)[0] for p in find_images(job.folder)}
    free: list[int] = []
    index = 0
    while len(free) < count:
        stem = f"{FILE_PREFIX}{index:05d}"
        caption = job.folder / (stem + job.caption_extension)
        if stem not in images and not (caption.exists() and _read(caption) != job.prompt):
            free.append(index)
        index += 1
    return free


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError):
        return None  # unreadable: a user's file, never ours


def _generate(pipe: Any, parts: Components, job: ClassImageJob, indices: list[int], base: int,
              config: Mapping[str, Any], device: torch.device, dtype: torch.dtype | None) -> list[Any]:
    # A fresh scheduler per call: multistep samplers keep state between steps.
    pipe.scheduler = make_sampler(config["class_sampler"], v_parameterization=parts.v_parameterization)
    # One private generator per image: image i's noise depends on its seed only, not on the batch it is in.
    generators = [torch.Generator(device).manual_seed(base + index) for index in indices]
    count = len(indices)
    negative = [job.negative_prompt] * count if job.negative_prompt else None
    with _autocast(device, dtype), _quiet_diffusers():
        result = pipe(prompt=[job.prompt] * count, negative_prompt=negative, height=job.height, width=job.width,
                      num_inference_steps=config["class_infer_steps"],
                      guidance_scale=config["class_guidance_scale"],
                      generator=generators, output_type="pil")
    return result.images


def _save(job: ClassImageJob, index: int, image: Any) -> None:
    # The image first: after a crash between the two writes the image counts and keeps its name on a re-run.
    stem = job.folder / f"{FILE_PREFIX}{index:05d}"
    with atomic_file(stem.with_name(stem.name + ".png")) as tmp:
        image.save(tmp, format="PNG")
    with atomic_file(stem.with_name(stem.name + job.caption_extension)) as tmp:
        tmp.write_text(job.prompt, encoding="utf-8")
