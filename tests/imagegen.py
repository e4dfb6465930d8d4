"""Small functions that write generated test images (tiny, in a temporary folder); nothing is downloaded."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

# Distinct, palette-exact colours so each class is recognisable after decoding.
CLASS_COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


def write_solid(path: Path, colour=(255, 0, 0), size=(16, 16), mode: str = "RGB", **save_args) -> Path:
    """One flat colour; the format follows the file extension. PNG and JPEG files carry their own name
    in a text chunk or comment, so two files are never byte-identical (as real photos are not):
    identical copies are duplicates, which imgtune keeps in one split and refuses across classes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path, **{**_unique_metadata(path), **save_args})
    return path


def _unique_metadata(path: Path) -> dict:
    suffix = path.suffix.lower()
    if suffix == ".png":
        info = PngInfo()
        info.add_text("name", str(path))
        return {"pnginfo": info}
    if suffix in (".jpg", ".jpeg"):
        return {"comment": str(path).encode()}
    return {}


def write_noise(path: Path, size=(48, 48), seed: int = 0, **save_args) -> Path:
    """Random RGB pixels: compresses badly, so a truncated copy really lacks image data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path, **save_args)
    return path


def write_truncated_jpeg(path: Path) -> Path:
    write_noise(path, format="JPEG", quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_text(path: Path, text: str = "this is not an image\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_class_tree(root: Path, counts: dict[str, int], ext: str = ".png") -> Path:
    """``root/<class>/<i><ext>`` with ``counts[class]`` images, each class its own colour (and each file
    unique, see :func:`write_solid`)."""
    for k, (label, n) in enumerate(sorted(counts.items())):
        for i in range(n):
            write_solid(root / label / f"{i}{ext}", CLASS_COLOURS[k % len(CLASS_COLOURS)])
    return root


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_exif_jpeg(path: Path, orientation: int, size=(32, 16)) -> Path:
    """Left half red, right half blue as stored, with an EXIF orientation tag (0x0112)."""
    image = Image.new("RGB", size, (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, size[0] // 2, size[1]))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=95, exif=exif)
    return path


def write_animated_gif(path: Path, colours, size=(16, 16)) -> Path:
    frames = [Image.new("RGB", size, c) for c in colours]
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    return path


def write_palette(path: Path, indices, palette_colours, transparency: int | None = None) -> Path:
    """A mode-P image from a 2-D list of palette indices; ``transparency`` is a transparent index."""
    image = Image.fromarray(np.asarray(indices, dtype=np.uint8), "P")
    flat = [v for colour in palette_colours for v in colour]
    image.putpalette(flat + [0] * (768 - len(flat)))
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {} if transparency is None else {"transparency": transparency}
    image.save(path, **extra)
    return path
