"""Decoding any image file into 8-bit RGB, exactly and the same way everywhere.

Conversions (documented in docs/data.md):
- EXIF orientation is applied (``ImageOps.exif_transpose``).
- 16-bit and 32-bit integer images are *scaled* to 8 bits (``round(v * 255 / max_of_type)``), never clipped;
  floating-point images in [0, 1] are scaled by 255, other float ranges by their own min and max.
- Alpha (RGBA, LA, PA, palette with transparency) is composited onto ``ALPHA_BACKGROUND`` (white).
- CMYK uses the embedded ICC profile when there is one, else Pillow's conversion; palette, greyscale,
  1-bit and other modes become RGB with Pillow's conversion.
- Animated files (GIF, WebP, ...) give their first frame.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageCms, ImageOps

from .fingerprint import fingerprint as perceptual_fingerprint
from .image_ref import ImageRef
from .reading import FileTooLarge, NotRegularFile

ALPHA_BACKGROUND = (255, 255, 255)
# Too-large images are refused by _check_pixels with a clear reason; Pillow's own warning is noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
_HIGH_DEPTH_MAX = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535}


class DecodeError(Exception):
    """A file that cannot be read as an image; the message says why, ``kind`` names the problem:
    ``not-an-image``, ``truncated``, ``too-many-pixels``, ``corrupt``, ``not-a-file`` (a FIFO, device,
    socket or folder), ``too-large`` (over the file size limit), ``missing`` or ``unreadable``."""

    def __init__(self, message: str, kind: str = "corrupt"):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class ImageInfo:
    format: str  # Pillow's format name (JPEG, PNG, GIF, ...)
    mode: str
    width: int
    height: int
    bits: int = 8  # bits per channel of the stored data (16 for 16-bit PNG/TIFF)
    frames: int = 1  # animated GIF/WebP/...: more than one
    fingerprint: bytes | None = None  # perceptual fingerprint (data/fingerprint.py), when asked for


def load_rgb(path: str | Path | ImageRef | BinaryIO, draft_size: int | None = None) -> Image.Image:
    """Open ``path`` (a file, an :class:`~imgtune.data.image_ref.ImageRef` or a binary file object) and
    return a fully decoded 8-bit RGB image.

    ``draft_size`` lets JPEG decoding skip resolution that the caller will throw away (the result is
    at least ``draft_size`` pixels on its shorter side). Raises :class:`DecodeError`. A path is opened as
    an :class:`ImageRef` is: a regular file under the size limit, or a ``DecodeError`` saying why not.
    """
    if isinstance(path, (str, Path, ImageRef)):  # opened the one checked way
        with _opened(path) as handle:
            return load_rgb(handle, draft_size)
    try:
        with Image.open(path) as img:
            _check_pixels(img)
            if draft_size and img.format == "JPEG":
                _draft(img, draft_size)
            img.load()
            return to_rgb(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, EOFError) as exc:
        raise DecodeError(_describe(exc), _kind(exc)) from exc


@contextlib.contextmanager
def _opened(source: str | Path | ImageRef) -> Iterator[BinaryIO]:
    """``source`` opened as an :class:`ImageRef` opens it (a regular file under the size limit, or bytes);
    what cannot be opened is a :class:`DecodeError` saying why."""
    ref = source if isinstance(source, ImageRef) else ImageRef.file(source)
    try:
        handle = ref.open()
    except OSError as exc:
        raise DecodeError(_describe(exc), _kind(exc)) from exc
    with handle:
        yield handle


def probe(path: str | Path | BinaryIO, fingerprint: bool = False) -> ImageInfo:
    """Decode ``path`` (cheaply for large JPEGs) and return what it is; with ``fingerprint``, also its
    perceptual fingerprint (:mod:`imgtune.data.fingerprint`). Raises :class:`DecodeError`."""
    if isinstance(path, (str, Path, ImageRef)):
        with _opened(path) as handle:
            return probe(handle, fingerprint)
    try:
        with Image.open(path) as img:
            _check_pixels(img)
            fmt = img.format or "unknown"
            info = ImageInfo(fmt, img.mode, img.width, img.height, _bit_depth(img),
                             getattr(img, "n_frames", 1))
            if img.format == "JPEG":
                _draft(img, 64)
            img.load()  # decoding the data is what finds truncated and corrupt files
            if fingerprint:
                info = replace(info, fingerprint=perceptual_fingerprint(to_rgb(img)))
        return info
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, EOFError) as exc:
        raise DecodeError(_describe(exc), _kind(exc)) from exc


def _bit_depth(img: Image.Image) -> int:
    if img.mode in _HIGH_DEPTH_MAX or img.mode.startswith("I;16"):
        return 16
    if img.mode in ("I", "F"):
        return 16 if img.format == "PNG" else 32  # Pillow opens 16-bit greyscale PNG as mode I
    rawmode = getattr(getattr(img, "png", None), "im_rawmode", None) or ""
    if rawmode.endswith(";16B"):  # Pillow reads 16-bit colour PNG as 8-bit RGB(A); the raw mode tells
        return 16
    return 8


def _check_pixels(img: Image.Image) -> None:
    """Pillow only warns between MAX_IMAGE_PIXELS and twice that; imgtune refuses the whole range.
    (An explicit check, because ``warnings.catch_warnings`` is not thread-safe and files are
    checked in threads.)"""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and img.width * img.height > limit:
        raise Image.DecompressionBombError(
            f"{img.width}x{img.height} = {img.width * img.height} pixels is over the limit of {limit}")


def _draft(img: Image.Image, size: int) -> None:
    short = min(img.size)
    if short > 2 * size:
        scale = size / short
        img.draft("RGB", (max(1, int(img.width * scale)), max(1, int(img.height * scale))))


def to_rgb(img: Image.Image) -> Image.Image:
    img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _HIGH_DEPTH_MAX or mode in ("I", "F"):
        return _scale_to_8bit(img).convert("RGB")
    if mode == "CMYK":
        return _cmyk_to_rgb(img)
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or img.mode == "RGBA":
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _scale_to_8bit(img: Image.Image) -> Image.Image:
    values = np.asarray(img)
    if img.mode == "F":
        values = values.astype(np.float64)
        low, high = (0.0, 1.0) if values.min() >= 0 and values.max() <= 1 else (values.min(), values.max())
        scaled = (values - low) / max(high - low, 1e-12) * 255.0
    else:
        top = _HIGH_DEPTH_MAX.get(img.mode) or _integer_top(values)
        scaled = values.astype(np.float64) * (255.0 / top)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def _integer_top(values: np.ndarray) -> int:
    """Pillow opens 16-bit PNG/TIFF greyscale as mode I: infer the bit depth from the values."""
    peak = int(values.max()) if values.size else 0
    if peak <= 255:
        return 255
    if peak <= 65535:
        return 65535
    return 2**32 - 1


def _cmyk_to_rgb(img: Image.Image) -> Image.Image:
    icc = img.info.get("icc_profile")
    if icc:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(img, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError):
            pass  # a broken profile: fall back to the plain conversion below
    return img.convert("RGB")


def _kind(exc: BaseException) -> str:
    if isinstance(exc, NotRegularFile):
        return "not-a-file"
    if isinstance(exc, FileTooLarge):
        return "too-large"
    if isinstance(exc, FileNotFoundError):
        return "missing"
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not-an-image"
    if isinstance(exc, Image.DecompressionBombError):
        return "too-many-pixels"
    if "truncated" in str(exc) or isinstance(exc, EOFError):
        return "truncated"
    return "corrupt"


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, (NotRegularFile, FileTooLarge)):
        return text
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not an image Pillow can identify (wrong extension, or not an image at all)"
    if isinstance(exc, Image.DecompressionBombError):
        return f"too many pixels (decompression-bomb guard): {text}"
    if "truncated" in text:
        return f"truncated or incomplete file ({text})"
    return text
