"""Tiny generated datasets for end-to-end tests: a few classes of small images that differ clearly in
colour and shape, so a tiny model can tell them apart in a couple of epochs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# class name -> (shape, fill colour); backgrounds are noisy grey so no two classes share a colour
CLASSES = {"red_circle": ("circle", (220, 30, 30)), "green_square": ("square", (30, 200, 40)),
           "blue_triangle": ("triangle", (30, 50, 220))}


def draw(name: str, rng: np.random.Generator, size: int = 40) -> Image.Image:
    shape, colour = CLASSES[name]
    pixels = np.clip(128 + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    canvas = ImageDraw.Draw(image)
    radius = size * rng.uniform(0.3, 0.4)
    cx, cy = size / 2 + rng.uniform(-3, 3, 2)
    box = [cx - radius, cy - radius, cx + radius, cy + radius]
    if shape == "circle":
        canvas.ellipse(box, fill=colour)
    elif shape == "square":
        canvas.rectangle(box, fill=colour)
    else:
        canvas.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour)
    return image


def write_images(folder: Path, name: str, count: int, rng: np.random.Generator, size: int = 40) -> list[Path]:
    """``count`` images of class ``name`` in ``folder`` (whose name is the label imgtune reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"{name}_{i:02d}.png"
        draw(name, rng, size).save(path)
        paths.append(path)
    return paths


def make_split_dataset(root: Path, classes: tuple[str, ...] = tuple(CLASSES), train: int = 10, val: int = 5,
                       test: int = 0, seed: int = 0, size: int = 40) -> Path:
    """``root/train/<class>/*.png`` and ``root/val/<class>/*.png`` (and ``test/`` when ``test`` > 0)."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val), ("test", test)):
        for name in classes if count else ():
            write_images(root / split / name, name, count, rng, size)
    return root


def make_class_folders(root: Path, classes: tuple[str, ...] = tuple(CLASSES), per_class: int = 12,
                       seed: int = 0, size: int = 40) -> Path:
    """``root/<class>/*.png``: one tree that imgtune splits itself (--val-fraction, --test-fraction)."""
    rng = np.random.default_rng(seed)
    for name in classes:
        write_images(root / name, name, per_class, rng, size)
    return root


def write_unreadable(path: Path) -> Path:
    """A text file with an image extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("this is not an image\n")
    return path


# Command-line arguments of the tiny models the end-to-end tests train (pretrained weights come from
# the installed offline package, never from a download).
SCRATCH_ARGS = ("--model", "imgtune:small_cnn", "--img-size", "32", "--strategy", "scratch")
PRETRAINED_ARGS = ("--model", "mobilenet_v2", "--img-size", "64", "--offline")
