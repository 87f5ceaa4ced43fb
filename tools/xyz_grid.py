#!/usr/bin/env python
"""Generate one labelled grid of images over up to three axes (AUTOMATIC1111's X/Y/Z plot): LoRA file and weight,
prompt, seed, steps, CFG scale, sampler; with --z, one grid per z value, stacked top to bottom under its label.
SD 1.x/2.x and SDXL models take gen_img.py's options (SDXL: --original_width ... and --ow/--oh/--ct/--cl in prompts).

Axes are TYPE:v1,v2,… e.g. --x "lora_weight:0,0.5,1" --y "seed:1,2" --z "lora:a.safetensors,b.safetensors";
a value holding commas is double-quoted (prompt:"a cat, red","a dog"). The lora and lora_weight axes act on the first
--network_weights file (a lora axis adds it when there is none). Every cell shares one seed unless a seed axis,
--seed or the prompt's --d sets it. Writes <outdir>/xyz_grid_NNNN.png (or --outfile) with the first cell's
AUTOMATIC1111 parameters.
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python tools/xyz_grid.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from library.config.options import Option  # noqa: E402
from library.errors import UserError, exit_on_user_error  # noqa: E402
from tools.gen_img import (SECTION, check_output_folder, check_sampling_defaults, parse_args,  # noqa: E402
                           setup_from_args)

# Axis type -> (label title, value type, SamplePrompt field it overrides; None: acts on the networks).
AXIS_TYPES: dict[str, tuple[str, type, str | None]] = {
    "lora": ("LoRA", str, None), "lora_weight": ("LoRA weight", float, None), "prompt": ("Prompt", str, "prompt"),
    "seed": ("Seed", int, "seed"), "steps": ("Steps", int, "steps"), "cfg": ("CFG scale", float, "scale"),
    "sampler": ("Sampler", str, "sample_sampler"),
}
PAD = 4  # pixels around label text
Y_LABEL_MAX = 256  # widest the row-label column gets; longer labels wrap
TOOL_OPTIONS = (
    Option("x", str, None, "columns axis, TYPE:v1,v2,... (types: " + ", ".join(AXIS_TYPES) + ")", SECTION),
    Option("y", str, None, "rows axis (optional)", SECTION),
    Option("z", str, None, "one grid per value, stacked (optional)", SECTION),
    Option("outdir", str, None, "folder for the grid (written as xyz_grid_NNNN.png, the next free number)", SECTION),
    Option("outfile", str, None, "write the grid to this .png path instead", SECTION),
)


@dataclass(frozen=True)
class Axis:
    kind: str
    values: tuple

    @property
    def labels(self) -> list[str]:
        title = AXIS_TYPES[self.kind][0]
        return [f"{title}: {_display(self.kind, v)}" for v in self.values]


def _display(kind: str, value: Any) -> str:
    if kind == "lora":
        return Path(value).name
    return f"{value:g}" if isinstance(value, float) else str(value)


def parse_axis(spec: str, flag: str) -> Axis:
    """`TYPE:v1,v2` -> Axis with typed values; a bad spec -> UserError naming the flag."""
    kind, sep, rest = spec.partition(":")
    kind = kind.strip().lower()
    if not sep or kind not in AXIS_TYPES:
        raise UserError(f"{flag} {spec!r}: expected TYPE:v1,v2,... with TYPE one of {', '.join(AXIS_TYPES)}, "
                        f"e.g. {flag} \"seed:1,2,3\"")
    values = [v.strip() for v in next(csv.reader([rest], skipinitialspace=True), [])]
    if not values or any(not v for v in values):
        raise UserError(f"{flag} {spec!r}: empty value; list values separated by single commas, e.g. {kind}:1,2")
    return Axis(kind, tuple(_convert(kind, v, flag) for v in values))


def _convert(kind: str, text: str, flag: str) -> Any:
    value_type = AXIS_TYPES[kind][1]
    try:
        value = value_type(text)
    except ValueError:
        raise UserError(f"{flag}: {kind} value {text!r} is not {'a whole number' if value_type is int else 'a number'}"
                        f"; e.g. {kind}:{'1,2' if value_type is int else '0.5,1'}") from None
    if kind in ("seed", "steps") and value < (1 if kind == "steps" else 0):
        lowest = 1 if kind == "steps" else 0
        raise UserError(f"{flag}: {kind} value {value} is out of range; use {lowest} or more")
    if kind == "sampler":
        from library.training.sampling import _sampler_key

        value = _sampler_key(value, flag)
    if kind == "lora" and not Path(value).expanduser().is_file():
        raise UserError(f"{flag}: LoRA file {value} does not exist; check the path")
    return value


def read_axes(args) -> list[Axis]:
    if not args.x:
        raise UserError("--x is required: the columns axis, e.g. --x \"seed:1,2,3\"")
    if args.z and not args.y:
        raise UserError("--z needs --y as well; use --y for a second axis first")
    axes = [parse_axis(spec, flag) for flag, spec in (("--x", args.x), ("--y", args.y), ("--z", args.z)) if spec]
    kinds = [axis.kind for axis in axes]
    duplicate = next((k for k in kinds if kinds.count(k) > 1), None)
    if duplicate:
        raise UserError(f"the {duplicate} axis is given twice; give each axis type once")
    return axes


# ---------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class GridLayout:
    """Where everything goes: a header row (x labels), a left column (y labels), per z value a title band."""

    cell_width: int
    cell_height: int
    columns: int
    rows: int
    blocks: int
    left: int
    top: int
    band: int

    @property
    def width(self) -> int:
        return self.left + self.columns * self.cell_width

    @property
    def block_height(self) -> int:
        return self.band + self.top + self.rows * self.cell_height

    @property
    def height(self) -> int:
        return self.blocks * self.block_height

    def cell_origin(self, column: int, row: int, block: int) -> tuple[int, int]:
        return (self.left + column * self.cell_width,
                block * self.block_height + self.band + self.top + row * self.cell_height)


def grid_layout(x_labels, y_labels, z_labels, cell_size: tuple[int, int], font=None) -> GridLayout:
    """Header sizes from the labels: x labels wrap to the cell width, y labels to Y_LABEL_MAX, z to the grid width."""
    font = font or ImageFont.load_default()
    cell_width, cell_height = cell_size
    line = _line_height(font)
    top = 2 * PAD + line * max(len(_wrap(label, cell_width - 2 * PAD, font)) for label in x_labels)
    left = 2 * PAD + min(Y_LABEL_MAX, max(_text_width(label, font) for label in y_labels)) if y_labels else 0
    width = left + len(x_labels) * cell_width
    band = 2 * PAD + line * max(len(_wrap(label, width - 2 * PAD, font)) for label in z_labels) if z_labels else 0
    return GridLayout(cell_width, cell_height, len(x_labels), max(1, len(y_labels)), max(1, len(z_labels)),
                      left, top, band)


def draw_grid(cells: dict[tuple[int, int, int], Image.Image], x_labels, y_labels, z_labels,
              layout: GridLayout, font=None) -> Image.Image:
    """The grid: white background, black labels, each cell's image pasted at layout.cell_origin."""
    font = font or ImageFont.load_default()
    canvas = Image.new("RGB", (layout.width, layout.height), "white")
    draw = ImageDraw.Draw(canvas)
    for block in range(layout.blocks):
        base = block * layout.block_height
        if z_labels:
            _draw_label(draw, z_labels[block], (0, base, layout.width, base + layout.band), font)
        for column, label in enumerate(x_labels):
            x, y = layout.cell_origin(column, 0, block)
            _draw_label(draw, label, (x, y - layout.top, x + layout.cell_width, y), font)
        for row, label in enumerate(y_labels):
            x, y = layout.cell_origin(0, row, block)
            _draw_label(draw, label, (0, y, layout.left, y + layout.cell_height), font)
    for (column, row, block), image in cells.items():
        canvas.paste(image, layout.cell_origin(column, row, block))
    return canvas


def _draw_label(draw, text: str, box: tuple[int, int, int, int], font) -> None:
    x0, y0, x1, y1 = box
    lines = _wrap(text, x1 - x0 - 2 * PAD, font)
    line = _line_height(font)
    y = y0 + max(PAD, (y1 - y0 - line * len(lines)) // 2)
    for text_line in lines:
        draw.text((x0 + max(0, (x1 - x0 - _text_width(text_line, font)) // 2), y), text_line, fill="black", font=font)
        y += line


def _wrap(text: str, width: int, font) -> list[str]:
    """Greedy wrap at spaces; a word wider than `width` is broken between characters (at least one per line)."""
    lines: list[str] = []
    current = ""
    for word in text.split(" "):
        candidate = f"{current} {word}" if current else word
        if _text_width(candidate, font) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        while _text_width(word, font) > width and len(word) > 1:
            cut = max(1, max((n for n in range(1, len(word)) if _text_width(word[:n], font) <= width), default=1))
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    return [*lines, current] if current or not lines else lines


def _text_width(text: str, font) -> int:
    left, _, right, _ = font.getbbox(text)
    return int(right - left)


def _line_height(font) -> int:
    _, top, _, bottom = font.getbbox("Ayg|")
    return int(bottom - top) + 2


# ---------------------------------------------------------------------------------------------- generating
def _prepare(args, axes):
    from library.generation import Generator

    setup = setup_from_args(args)
    check_sampling_defaults(setup)
    kinds = {axis.kind: axis for axis in axes}
    if "lora" in kinds and not setup.networks:
        setup.networks = [(kinds["lora"].values[0], (args.network_mul or [1.0])[0])]
    if "lora_weight" in kinds and not setup.networks:
        raise UserError("the lora_weight axis needs a network: give --network_weights FILE or a lora axis")
    if not args.prompt and "prompt" not in kinds:
        raise UserError("give --prompt \"...\" or a prompt axis, e.g. --y \"prompt:a cat,a dog\"")
    generator = Generator(setup)
    base = generator.resolve(args.prompt or kinds["prompt"].values[0])  # one seed shared by every cell
    return generator, base


def _render(generator, base, settings: dict[str, Any]):
    """One cell: the network changes first, then the prompt fields the axes override."""
    if "lora" in settings:
        generator.swap_network(0, settings["lora"])
    if "lora_weight" in settings:
        generator.set_weight(0, settings["lora_weight"])
    overrides = {AXIS_TYPES[kind][2]: value for kind, value in settings.items() if AXIS_TYPES[kind][2]}
    request = generator.resolve(base, **overrides)
    return generator.generate(request), request


def _output_path(args) -> Path:
    if args.outfile:
        path = Path(args.outfile)
        if path.suffix.lower() != ".png":
            raise UserError(f"--outfile {path}: the grid is a PNG; name it .png")
        if path.exists() and not _is_png(path):
            raise UserError(f"--outfile {path}: already exists and is not a PNG; refusing to overwrite it")
        return path
    if not args.outdir:
        raise UserError("give --outdir DIR (or --outfile grid.png) for the grid")
    check_output_folder(args.outdir, "--outdir")
    folder = Path(args.outdir)
    return next(folder / f"xyz_grid_{n:04d}.png" for n in range(10_000_000)
                if not (folder / f"xyz_grid_{n:04d}.png").exists())


def _is_png(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class GridResult:
    path: Path
    layout: GridLayout
    images: int


@exit_on_user_error
def main(argv=None) -> GridResult:
    args = parse_args(argv, __doc__, TOOL_OPTIONS)
    axes = read_axes(args)
    output = _output_path(args)
    from library.console import quiet_libraries
    from library.generation import save_png

    quiet_libraries()
    generator, base = _prepare(args, axes)
    cells, parameters = {}, None
    shape = [len(axis.values) for axis in axes] + [1] * (3 - len(axes))
    # z outermost, x innermost (A1111's order); cells are keyed (column, row, block).
    for block, row, column in product(range(shape[2]), range(shape[1]), range(shape[0])):
        settings = {axis.kind: axis.values[i] for axis, i in zip(axes, (column, row, block))}
        cells[column, row, block], request = _render(generator, base, settings)
        parameters = parameters or generator.parameters(request)
    labels = [axis.labels for axis in axes] + [[]] * (3 - len(axes))
    layout = grid_layout(*labels, cells[0, 0, 0].size)
    save_png(draw_grid(cells, *labels, layout), output, parameters)
    print(f"wrote {output} ({layout.width}x{layout.height}, {len(cells)} images)")
    return GridResult(output, layout, len(cells))


if __name__ == "__main__":
    main()
