"""Pictures to bytes and bytes to ``data:`` URIs: the one place imgtune encodes an image or a figure.

Figures (matplotlib, Agg) become PNG at :data:`FIGURE_DPI` and are closed; PIL images become PNG (lossless:
overlays written to files) or JPEG (thumbnails and overlays embedded in HTML, where size matters).
"""

from __future__ import annotations

import base64
import io

from PIL import Image

FIGURE_DPI = 110


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
