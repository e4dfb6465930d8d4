"""A built-in sample dataset, drawn on the fly so it needs no download: circles, squares and triangles
of random colour, size, position and rotation on noisy backgrounds, as JPEG photos in train/ and val/.
One deliberately truncated file shows how imgtune reports broken images instead of crashing."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle")


def draw_shape(shape: str, rng: random.Random, size: int = 160) -> Image.Image:
    background = tuple(rng.randint(0, 255) for _ in range(3))
    noise = np.random.default_rng(rng.randint(0, 2**31)).normal(0, 18, (size, size, 3))
    pixels = np.clip(np.array(background, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    colour = tuple((c + rng.randint(90, 165)) % 256 for c in background)  # always differs from the background
    radius = rng.uniform(0.18, 0.38) * size
    cx, cy = (rng.uniform(radius, size - radius) for _ in range(2))
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
    else:
        corners = 4 if shape == "square" else 3
        start = rng.uniform(0, 2 * math.pi)
        points = [(cx + radius * math.cos(start + 2 * math.pi * i / corners),
                   cy + radius * math.sin(start + 2 * math.pi * i / corners)) for i in range(corners)]
        draw.polygon(points, fill=colour)
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.2)))


def make_sample(root: str | Path, train_per_class: int = 30, val_per_class: int = 15, seed: int = 0,
                broken_file: bool = True) -> Path:
    """Write the sample under ``root`` (``train/<shape>/*.jpg``, ``val/<shape>/*.jpg``); returns ``root``."""
    root = Path(root)
    rng = random.Random(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for shape in SHAPES:
            folder = root / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                draw_shape(shape, rng).save(folder / f"{shape}_{i:03d}.jpg", quality=rng.randint(70, 95))
    if broken_file:
        whole = (root / "train" / "square" / "square_000.jpg").read_bytes()
        (root / "train" / "square" / "broken_download.jpg").write_bytes(whole[: len(whole) // 3])
    return root
