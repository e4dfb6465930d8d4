"""Distinct images that look alike: what near-duplicate checks must not call copies (issue 12, item 9).

- ``digits``: scikit-learn's bundled 8x8 scans of handwritten digits (1,797 distinct scans, 16 grey
  levels), upscaled as a user's low-resolution scans would be.
- ``xray``: small grey chest-X-ray-like images, one pose: a bright torso, two dark lungs, a spine and
  ribs, each drawn with its own size, position, contrast and noise.
- ``sign``: one kind of road sign (a red ring with a white bar on red, "no entry") on varied
  backgrounds, with varied size, position, colour and noise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def digits(size: int = 32) -> tuple[list[Image.Image], list[str]]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = [Image.fromarray(np.round(x * 255 / 16).astype(np.uint8)).resize((size, size), Image.BICUBIC)
              for x in data.images]
    return images, [str(t) for t in data.target]


def xray(rng: np.random.Generator, size: int = 64) -> Image.Image:
    image = Image.new("L", (size, size), int(rng.integers(5, 30)))
    draw = ImageDraw.Draw(image)
    c, s = size / 2 + rng.normal(0, 2.5, 2), size * rng.uniform(0.8, 1.0)
    draw.ellipse([c[0] - 0.42 * s, c[1] - 0.45 * s, c[0] + 0.42 * s, c[1] + 0.55 * s], fill=int(rng.integers(150, 190)))
    lung = int(rng.integers(50, 90))
    for side in (-1, 1):
        x = c[0] + side * s * rng.uniform(0.15, 0.23)
        w, h = s * rng.uniform(0.11, 0.18), s * rng.uniform(0.26, 0.38)
        draw.ellipse([x - w, c[1] - h * 0.9, x + w, c[1] + h], fill=lung + int(rng.integers(-8, 9)))
    for k in range(6):  # ribs
        y = c[1] - 0.25 * s + k * s * 0.09 + rng.normal(0, 0.6)
        draw.arc([c[0] - 0.38 * s, y - 0.1 * s, c[0] + 0.38 * s, y + 0.1 * s], 200, 340, fill=lung + 40, width=1)
    spine = int(rng.integers(180, 220))
    draw.rectangle([c[0] - 0.03 * s, c[1] - 0.45 * s, c[0] + 0.03 * s, c[1] + 0.5 * s], fill=spine)
    image = image.rotate(rng.normal(0, 3), Image.BILINEAR).filter(ImageFilter.GaussianBlur(rng.uniform(0.8, 1.5)))
    shade = np.asarray(Image.fromarray(rng.normal(0, 18, (3, 3))).resize((size, size), Image.BICUBIC))  # exposure
    pixels = np.asarray(image, dtype=np.float64) + shade + rng.normal(0, rng.uniform(4, 9), (size, size))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def sign(rng: np.random.Generator, size: int = 48) -> Image.Image:
    sky = rng.uniform(60, 200, 3)
    field = rng.normal(0, 12, (4, 4, 3)) + sky
    image = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(2, 6)):  # clutter: poles, branches, other signs' edges
        x, y = rng.uniform(0, size, 2)
        draw.line([x, y, *rng.uniform(0, size, 2)], fill=tuple(int(v) for v in rng.integers(0, 256, 3)),
                  width=int(rng.integers(1, 4)))
    c, r = size / 2 + rng.normal(0, 3, 2), size * rng.uniform(0.28, 0.42)
    red = (int(rng.integers(170, 235)), int(rng.integers(10, 50)), int(rng.integers(20, 60)))
    draw.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=red)
    bar_h = r * rng.uniform(0.22, 0.3)
    white = tuple(int(v) for v in rng.integers(215, 256, 3))
    draw.rectangle([c[0] - r * 0.65, c[1] - bar_h, c[0] + r * 0.65, c[1] + bar_h], fill=white)
    gain = rng.uniform(0.8, 1.15)  # exposure
    pixels = np.asarray(image, dtype=np.float64) * gain + rng.normal(0, rng.uniform(2, 6), (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_tree(root: Path, images: list[Image.Image], labels: list[str]) -> None:
    """``root/<label>/<i>.png``: a class folder tree, as a user's dataset would be."""
    for i, (image, label) in enumerate(zip(images, labels)):
        (root / label).mkdir(parents=True, exist_ok=True)
        image.save(root / label / f"{i:05d}.png")


def generated(kind: str, count: int, seed: int = 0) -> tuple[list[Image.Image], list[str]]:
    """``count`` distinct images of one ``kind`` (xray or sign), in two classes (as a task would have)."""
    make = {"xray": xray, "sign": sign}[kind]
    rng = np.random.default_rng(seed)
    return [make(rng) for _ in range(count)], [("a", "b")[i % 2] for i in range(count)]
