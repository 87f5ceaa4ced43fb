#!/usr/bin/env python
"""Generate images from an SD 1.x/2.x or SDXL model with LoRA networks, embeddings and a hypernetwork (sd-scripts'
gen_img.py flags); each PNG is written as <outdir>/<index>_<seed>.png with AUTOMATIC1111's "parameters" text chunk.

Prompts take sd-scripts' options: `a cat --n blurry --w 512 --h 768 --d 42 --s 30 --l 7 --ss euler_a`, and for SDXL
the size/crop conditioning `--ow 2048 --oh 1024 --nw 512 --nh 512 --ct 0 --cl 0` (original, negative original, crop).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/gen_img.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.config.declarations import OPTIONS  # noqa: E402
from library.config.options import Option  # noqa: E402
from library.config.resolve import parse_tool_args  # noqa: E402
from library.errors import UserError, exit_on_user_error  # noqa: E402

SECTION = "generation"
# The options xyz_grid.py shares (the model, its add-ons and the sampling defaults).
BASE_OPTIONS = (
    Option("ckpt", str, None, "base model (SD 1.x/2.x or SDXL): .safetensors/.ckpt file, diffusers folder, hub id, "
           "tiny-sd1 or tiny-sdxl", SECTION),
    Option("prompt", str, None, "the prompt (sd-scripts options such as --n, --d may follow inside it)", SECTION),
    Option("negative_prompt", str, None, "negative prompt for prompts without --n", SECTION),
    Option("W", int, None, "image width, rounded down to a multiple of 8 (default 1024 for SDXL, else 512)", SECTION),
    Option("H", int, None, "image height, rounded down to a multiple of 8 (default 1024 for SDXL, else 512)", SECTION),
    # sd-scripts' gen_img.py SDXL size/crop conditioning; prompts override them with --ow --oh --nw --nh --ct --cl.
    Option("original_width", int, None, "SDXL: original width for the size conditioning (default: the width)",
           SECTION),
    Option("original_height", int, None, "SDXL: original height for the size conditioning (default: the height)",
           SECTION),
    Option("original_width_negative", int, None, "SDXL: original width for the negative prompt's conditioning "
           "(default: --original_width)", SECTION),
    Option("original_height_negative", int, None, "SDXL: original height for the negative prompt's conditioning "
           "(default: --original_height)", SECTION),
    Option("crop_top", int, None, "SDXL: crop top for the size conditioning (default 0)", SECTION),
    Option("crop_left", int, None, "SDXL: crop left for the size conditioning (default 0)", SECTION),
    Option("sdxl", bool, False, "sd-scripts: load an SDXL model (the family is read from the model; with this flag "
           "another family is refused)", SECTION),
    Option("v1", bool, False, "accepted (sd-scripts: an SD 1.x model); the family is read from the model", SECTION),
    Option("steps", int, 50, "sampling steps", SECTION),
    Option("scale", float, 7.5, "classifier-free guidance scale (CFG)", SECTION),
    Option("sampler", str, "ddim", "sampler: ddim, pndm, lms, euler, euler_a, heun, dpm_2, dpm_2_a, dpmsolver, "
           "dpmsolver++, dpmsingle (and k_ aliases)", SECTION),
    Option("seed", int, None, "seed (default: a random one per image)", SECTION),
    Option("network_weights", str, None, "LoRA / LoCon / LoHa / LoKr files to apply", SECTION, nargs="+"),
    Option("network_mul", float, None, "weight of each network (one value: for all; default 1.0)", SECTION,
           nargs="+"),
    Option("textual_inversion_embeddings", str, None, "embedding files; write the file's stem in prompts", SECTION,
           nargs="+"),
    Option("hypernetwork", str, None, "AUTOMATIC1111 hypernetwork .pt to apply", SECTION),
    Option("hypernetwork_mul", float, 1.0, "hypernetwork strength", SECTION),
    Option("fp16", bool, False, "load the model in float16", SECTION),
    Option("bf16", bool, False, "load the model in bfloat16", SECTION),
    Option("device", str, None, "device to generate on (default: cuda when available, else cpu)", SECTION),
    # sd-scripts' gen_img.py command lines carry these; accepted so they run unchanged.
    Option("network_module", str, None, "accepted; each network file's type (LoRA/LoCon/LoHa/LoKr) is read from it",
           SECTION, nargs="+"),
    Option("xformers", bool, False, "accepted; PyTorch scaled-dot-product attention is always used", SECTION),
    Option("sdpa", bool, False, "accepted; PyTorch scaled-dot-product attention is always used", SECTION),
    Option("batch_size", int, 1, "accepted; images are generated one at a time (same images)", SECTION),
)
SHARED_FLAGS = ("v2", "v_parameterization", "vae", "clip_skip")
TOOL_OPTIONS = (
    Option("outdir", str, None, "folder for the images (numbered after those already there)", SECTION),
    Option("from_file", str, None, "text file with one prompt per line (# comments and blank lines skipped)", SECTION),
    Option("images_per_prompt", int, 1, "images per prompt; image k uses seed + k", SECTION),
    Option("n_iter", int, 1, "repeat the whole prompt list this many times (seeds go on counting)", SECTION),
    Option("image_path", str, None, "image-to-image: start from this image (resized to --W x --H)", SECTION),
    Option("strength", float, None, "image-to-image: how much is re-noised, 0-1 (default 0.8)", SECTION),
)


def parse_args(argv, description: str, extra: tuple[Option, ...]):
    options = BASE_OPTIONS + extra + tuple(o for o in OPTIONS if o.name in SHARED_FLAGS)
    return parse_tool_args(argv, description, options, [o.name for o in BASE_OPTIONS + extra] + list(SHARED_FLAGS))


SIZE_FLAGS = ("original_width", "original_height", "original_width_negative", "original_height_negative",
              "crop_top", "crop_left")


def setup_from_args(args):
    """The GenerationSetup the shared options describe; user mistakes -> UserError before any model loads."""
    import torch

    from library.generation import GenerationSetup

    if not args.ckpt:
        raise UserError("--ckpt is required: the base model (.safetensors/.ckpt, diffusers folder, or tiny-sd1)")
    if args.fp16 and args.bf16:
        raise UserError("--fp16 and --bf16 exclude each other; give one")
    if args.sdxl:  # the SDXL family's own rule refuses --v2; --v1 (sd-scripts' SD 1.x switch) likewise
        from library.models.family import family_named

        problems = (["--v1 asks for an SD 1.x model; give the one for the model"] if args.v1 else []) + \
            family_named("sdxl").option_problems(vars(args), [])
        if problems:
            raise UserError(f"--sdxl: {problems[0]}")
    for flag in ("W", "H", *SIZE_FLAGS):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag.startswith("crop") else 1):
            raise UserError(f"--{flag} {value}: give {'0' if flag.startswith('crop') else '1'} or more")
    files = args.network_weights or []
    muls = args.network_mul or [1.0]
    if len(muls) not in (1, len(files)):
        raise UserError(f"--network_mul: give one value or one per --network_weights file ({len(files)}), "
                        f"got {len(muls)}")
    dtype = torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32
    return GenerationSetup(
        ckpt=args.ckpt, networks=[(f, muls[i] if len(muls) > 1 else muls[0]) for i, f in enumerate(files)],
        embeddings=list(args.textual_inversion_embeddings or []), hypernetwork=args.hypernetwork,
        hypernetwork_strength=args.hypernetwork_mul, sampler=args.sampler, steps=args.steps, scale=args.scale,
        width=args.W, height=args.H, seed=args.seed, negative_prompt=args.negative_prompt, dtype=dtype,
        device=args.device, sdxl=args.sdxl, **{flag: getattr(args, flag) for flag in SHARED_FLAGS + SIZE_FLAGS})


def check_sampling_defaults(setup) -> None:
    import math

    from library.training.sampling import SamplePrompt, check_prompts

    if setup.steps < 1:
        raise UserError(f"--steps {setup.steps}: give 1 or more sampling steps")
    if not math.isfinite(setup.scale):
        raise UserError(f"--scale {setup.scale}: give a number such as 7.5")
    check_prompts([SamplePrompt("", steps=setup.steps)], setup.sampler, where=f"--sampler {setup.sampler}")


def check_output_folder(folder, flag: str) -> None:
    """Before any model loads: the output folder may be new or a folder, not a file."""
    if Path(folder).exists() and not Path(folder).is_dir():
        raise UserError(f"{flag} {folder}: is a file; give a folder for the images")


def _next_index(folder: Path) -> int:
    """Numbering goes on after the images already there, so a second run never replaces the first one's."""
    taken = [int(p.name[:4]) for p in folder.glob("[0-9][0-9][0-9][0-9]_*.png")] if folder.is_dir() else []
    return max(taken, default=-1) + 1


def read_prompt_lines(args) -> list[tuple[str, str]]:
    """(where, line) for each prompt: --prompt, or the lines of --from_file."""
    if bool(args.prompt) == bool(args.from_file):
        raise UserError("give either --prompt \"...\" or --from_file prompts.txt (one of them)")
    if args.prompt:
        return [("--prompt", args.prompt)]
    path = Path(args.from_file)
    if not path.is_file():
        raise UserError(f"--from_file {path}: no such file; check the path")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"--from_file {path}: not UTF-8 text ({err.reason}); save it as UTF-8") from None
    lines = [(f"{path}:{n}", line.strip()) for n, line in enumerate(text.splitlines(), 1)
             if line.strip() and not line.strip().startswith("#")]
    if not lines:
        raise UserError(f"--from_file {path}: holds no prompt lines")
    return lines


def load_init_image(args):
    from PIL import Image, UnidentifiedImageError

    if args.strength is not None and not args.image_path:
        raise UserError("--strength needs --image_path (it is the image-to-image strength)")
    if not args.image_path:
        return None
    if args.strength is not None and not 0 < args.strength <= 1:
        raise UserError(f"--strength {args.strength}: give a value in (0, 1] (how much of the image is re-noised)")
    try:
        with Image.open(args.image_path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise UserError(f"--image_path {args.image_path}: cannot read it as an image ({err})") from None


@exit_on_user_error
def main(argv=None) -> list[Path]:
    args = parse_args(argv, __doc__, TOOL_OPTIONS)
    if not args.outdir:
        raise UserError("--outdir is required: the folder the images are written to")
    check_output_folder(args.outdir, "--outdir")
    if args.n_iter < 1:
        raise UserError(f"--n_iter {args.n_iter}: give 1 or more")
    if args.images_per_prompt < 1:
        raise UserError(f"--images_per_prompt {args.images_per_prompt}: give 1 or more")
    setup = setup_from_args(args)
    check_sampling_defaults(setup)
    lines = read_prompt_lines(args)
    init_image = load_init_image(args)
    from library.console import quiet_libraries
    from library.generation import DEFAULT_STRENGTH, Generator

    quiet_libraries()
    generator = Generator(setup)
    requests = [generator.request(line, where=where, enum=n) for n, (where, line) in enumerate(lines)]
    strength = DEFAULT_STRENGTH if args.strength is None else args.strength
    paths, first = [], _next_index(Path(args.outdir))
    # Image k of a prompt (counting on through --n_iter rounds) uses seed + k.
    jobs = [(request, round_ * args.images_per_prompt + k) for round_ in range(args.n_iter) for request in requests
            for k in range(args.images_per_prompt)]
    for request, k in jobs:
        resolved = generator.resolve(request, seed=None if request.seed is None else request.seed + k)
        image = generator.generate(resolved, init_image=init_image, strength=strength)
        path = generator.save(image, resolved, Path(args.outdir) / f"{first + len(paths):04d}_{resolved.seed}.png",
                              strength=strength if init_image else None)
        print(f"wrote {path}")
        paths.append(path)
    return paths


if __name__ == "__main__":
    main()
