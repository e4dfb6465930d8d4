"""Pictures to bytes and bytes to ``data:`` URIs: the one place imgtune encodes an image or a figure.

Figures (matplotlib, Agg) become PNG at :data:`FIGURE_DPI` and are closed; PIL images become PNG (lossless:
overlays written to files) or JPEG (thumbnails and overlays embedded in HTML, where size matters).
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Callable

from PIL import Image

FIGURE_DPI = 110
DATA_URI = re.compile(r"data:image/[\w.+-]+;base64,[A-Za-z0-9+/=]+")  # an embedded image in a page


def figure_png(fig, dpi: int = FIGURE_DPI) -> bytes:
    """The figure as PNG bytes; the figure is closed (pyplot keeps every open figure alive otherwise)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return buffer.getvalue()


def image_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def image_jpeg(image: Image.Image, quality: int = 85) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def data_uri(data: bytes | None, mime: str = "image/png") -> str | None:
    """``data:<mime>;base64,...`` for embedding in HTML; None stays None (a figure that could not be drawn)."""
    return None if data is None else f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def from_base64(text: str) -> bytes:
    """The bytes of Base64 ``text`` (or of a ``data:...;base64,`` URI, the inverse of :func:`data_uri`);
    ValueError when it is not strictly valid (characters outside the alphabet, wrong padding)."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    return base64.b64decode(text, validate=True)  # binascii.Error is a ValueError


def bare_image(data: bytes, quality: int = 90) -> bytes:
    """The image in ``data`` encoded again from its pixels alone: no EXIF, ICC profile, XMP, comment or
    text chunk survives. JPEG stays JPEG (at ``quality``), anything else becomes PNG."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        jpeg = image.format == "JPEG"
        mode = "RGB" if jpeg else image.mode if image.mode in ("RGB", "RGBA", "L", "LA") else "RGBA"
        pixels = image.convert(mode)
    bare = Image.frombytes(mode, pixels.size, pixels.tobytes())  # no info, no exif, no palette
    return image_jpeg(bare, quality) if jpeg else image_png(bare)


def map_embedded(text: str, image: Callable[[bytes], bytes], between: Callable[[str], str]) -> str:
    """``text`` (a page) with each embedded image's bytes passed through ``image`` (and embedded again
    as PNG or JPEG, whichever the result is), and the text between them through ``between``."""
    parts, last = [], 0
    for match in DATA_URI.finditer(text):
        parts.append(between(text[last:match.start()]))
        found = image(from_base64(match.group(0)))
        parts.append(data_uri(found, "image/jpeg" if found.startswith(b"\xff\xd8") else "image/png"))
        last = match.end()
    parts.append(between(text[last:]))
    return "".join(parts)
