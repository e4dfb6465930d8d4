"""A generated dataset with planted problems, for `imgtune doctor` (issue 5's acceptance test).

Four classes that a pretrained backbone tells apart easily (shape and colour family of the main
object), drawn on varied backgrounds (smooth random colour fields and clutter) so that no two
generated images are near-duplicates by accident. Then, on purpose: broken files, rare formats and
modes, exact and near duplicates across splits, a cross-class duplicate, and flipped labels. The
returned :class:`Plan` says what was planted where, so a test can check that every item is found.
"""

from __future__ import annotations

import io
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

# class -> (shape, base hue colour)
CLASSES = {"circle": ("circle", (210, 40, 40)), "square": ("square", (40, 170, 60)),
           "triangle": ("triangle", (40, 70, 210)), "star": ("star", (230, 200, 30))}


@dataclass
class Plan:
    root: Path
    broken: dict[str, str] = field(default_factory=dict)  # relative path -> problem kind
    outliers: dict[str, str] = field(default_factory=dict)  # relative path -> what is odd
    exact_leaks: list[tuple[str, str]] = field(default_factory=list)  # (train copy, val copy)
    near_leaks: dict[str, tuple[str, str]] = field(default_factory=dict)  # kind -> (train original, val variant)
    cross_class: tuple[str, str] | None = None  # same bytes under two classes
    flipped: dict[str, tuple[str, str]] = field(default_factory=dict)  # relative path -> (given, true)


def background(rng: np.random.Generator, size: int) -> Image.Image:
    """A random colour field (upsampled noise at two scales) with clutter: boxes, discs and lines, as
    busy as a photo's background, so that different images have different perceptual hashes."""
    coarse = rng.uniform(30, 230, (rng.integers(3, 7), rng.integers(3, 7), 3)).astype(np.uint8)
    fine = rng.normal(0, 28, (12, 12, 3))
    image = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC)).astype(np.float64)
    image += np.asarray(Image.fromarray(np.clip(fine + 128, 0, 255).astype(np.uint8)).resize(
        (size, size), Image.BICUBIC)).astype(np.float64) - 128
    image += rng.normal(0, 5, (size, size, 3))
    image = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(12, 25)):
        x, y = rng.uniform(0, size, 2)
        r = rng.uniform(2, size * 0.08)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = rng.integers(3)
        if kind == 0:
            draw.rectangle([x - r, y - r * rng.uniform(0.3, 1.5), x + r, y + r], fill=colour)
        elif kind == 1:
            draw.ellipse([x - r * 0.6, y - r * 0.6, x + r * 0.6, y + r * 0.6], fill=colour)
        else:
            x2, y2 = rng.uniform(0, size, 2)
            draw.line([x, y, x2, y2], fill=colour, width=int(rng.integers(1, 4)))
    return image


def draw_object(image: Image.Image, shape: str, colour, rng: np.random.Generator) -> None:
    size = image.width
    draw = ImageDraw.Draw(image)
    r = size * rng.uniform(0.2, 0.32)
    cx, cy = rng.uniform(r + 2, size - r - 2, 2)
    jitter = rng.integers(-30, 31, 3)
    fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(colour, jitter))
    outline = tuple(int(v) for v in rng.integers(0, 80, 3))
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=2)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=2)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill, outline=outline)
    else:
        angles = np.linspace(-np.pi / 2, 1.5 * np.pi, 11)[:-1]
        radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        draw.polygon([(cx + q * np.cos(a), cy + q * np.sin(a)) for q, a in zip(radii, angles)], fill=fill,
                     outline=outline)


def make_image(label: str, rng: np.random.Generator, size: int = 160) -> Image.Image:
    shape, colour = CLASSES[label]
    image = background(rng, size)
    draw_object(image, shape, colour, rng)
    return image


def write_clean(root: Path, per_class: dict[str, int], seed: int = 0, size: int = 160) -> dict[str, list[Path]]:
    """``root/<split>/<class>/<class>_<split>_<i>.jpg``; ``per_class`` maps split -> images per class."""
    rng = np.random.default_rng(seed)
    written: dict[str, list[Path]] = {}
    for split, count in per_class.items():
        for label in CLASSES:
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                path = folder / f"{label}_{split}_{i:03d}.jpg"
                make_image(label, rng, size).save(path, quality=90)
                written.setdefault(f"{split}/{label}", []).append(path)
    return written


def near_variants(image: Image.Image) -> dict[str, Image.Image]:
    """The four kinds of near-duplicate the doctor must find."""
    w, h = image.size
    return {"half-size": image.resize((w // 2, h // 2), Image.LANCZOS),
            "jpeg-q70": Image.open(io.BytesIO(_jpeg(image, 70))),
            "crop-10%": image.crop((0, 0, int(w * 0.9), int(h * 0.9))),
            "brightness+10%": ImageEnhance.Brightness(image).enhance(1.1)}


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def make_planted(root: Path, seed: int = 0) -> Plan:
    """424 images in train/val (4 classes x (80 train + 20 val) clean, plus the planted files)."""
    written = write_clean(root, {"train": 80, "val": 20}, seed)
    rng = np.random.default_rng(seed + 1)
    plan = Plan(root)
    rel = lambda p: str(Path(p).relative_to(root))  # noqa: E731
    _plant_broken(root, plan, written)
    _plant_outliers(root, plan, rng)
    # exact duplicates across splits: copy train images into val (same class)
    for label, i in (("circle", 0), ("square", 1), ("triangle", 2)):
        source = written[f"train/{label}"][i]
        target = root / "val" / label / f"copy_of_{source.name}"
        shutil.copyfile(source, target)
        plan.exact_leaks.append((rel(source), rel(target)))
    # near duplicates across splits, one of each kind
    for (kind, k), label in zip(enumerate(["half-size", "jpeg-q70", "crop-10%", "brightness+10%"]), CLASSES):
        source = written[f"train/{label}"][10 + kind]
        variant = near_variants(Image.open(source).convert("RGB"))[k]
        target = root / "val" / label / f"near_{k.replace('%', 'pc').replace('+', '')}_{source.stem}.jpg"
        variant.save(target, quality=70 if k == "jpeg-q70" else 95)
        plan.near_leaks[k] = (rel(source), rel(target))
    # the same bytes under two classes (a label conflict), both in train
    source = written["train/star"][20]
    target = root / "train" / "circle" / f"also_{source.name}"
    shutil.copyfile(source, target)
    plan.cross_class = (rel(source), rel(target))
    _plant_flips(root, plan, written, rng)
    return plan


def _plant_broken(root: Path, plan: Plan, written) -> None:
    source = written["train/circle"][30]
    truncated = root / "train" / "circle" / "truncated.jpg"
    data = source.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    plan.broken["train/circle/truncated.jpg"] = "truncated"
    (root / "train" / "square" / "notes.jpg").write_text("not an image, just text\n")
    plan.broken["train/square/notes.jpg"] = "not-an-image"
    (root / "train" / "triangle" / "empty.jpg").write_bytes(b"")
    plan.broken["train/triangle/empty.jpg"] = "empty"


def _plant_outliers(root: Path, plan: Plan, rng: np.random.Generator) -> None:
    cmyk = make_image("star", rng).convert("CMYK")
    cmyk.save(root / "train" / "star" / "cmyk.jpg", quality=90)
    plan.outliers["train/star/cmyk.jpg"] = "CMYK"
    grey = np.asarray(make_image("square", rng).convert("L")).astype(np.uint16) * 257
    Image.fromarray(grey).save(root / "train" / "square" / "deep16.png")  # mode I;16
    plan.outliers["train/square/deep16.png"] = "16-bit"


def _plant_flips(root: Path, plan: Plan, written, rng: np.random.Generator) -> None:
    """Move ten clean training images into another class's folder."""
    labels = list(CLASSES)
    for n in range(10):
        true = labels[n % 4]
        given = labels[(n % 4 + 1 + n // 4) % 4]
        source = written[f"train/{true}"][40 + n]
        target = root / "train" / given / f"img_{n:02d}_{source.stem.split('_')[-1]}.jpg"
        shutil.move(source, target)
        plan.flipped[str(target.relative_to(root))] = (given, true)
