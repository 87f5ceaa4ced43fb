"""A small built-in demo dataset (coloured shapes with captions) so the README's commands train on something real."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220)}


def make_demo_dataset(root: str | Path, *, count: int = 12, size: int = 64, seed: int = 0,
                      folder: str = "10_sks shape") -> Path:
    """`<root>/<folder>/` with `count` PNGs of one coloured shape each and a `.txt` caption naming it."""
    rng = random.Random(seed)
    out = Path(root) / folder
    out.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        image = Image.new("RGB", (size, size), (245, 245, 240))
        draw = ImageDraw.Draw(image)
        margin = rng.randint(size // 8, size // 4)
        box = (margin, margin, size - margin, size - margin)
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        else:
            draw.polygon([(size // 2, margin), (size - margin, size - margin), (margin, size - margin)],
                         fill=COLOURS[colour])
        image.save(out / f"{i:03d}.png")
        (out / f"{i:03d}.txt").write_text(f"sks shape, {colour} {shape}")
    return out
