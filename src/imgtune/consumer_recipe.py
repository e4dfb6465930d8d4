# How to turn an image file into the input of an imgtune model.onnx, with only numpy and Pillow.
# It repeats, step for step, what imgtune does before its model sees an image (imgtune/data/decode.py
# and eval_transform in imgtune/data/transforms.py), so the two give identical uint8 pixels.
# `pre` is the model's metadata_props["preprocessing"] (a JSON object).
import io

import numpy as np
from PIL import Image, ImageCms, ImageOps

RESAMPLE = {"nearest": Image.Resampling.NEAREST, "nearest-exact": Image.Resampling.NEAREST,
            "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
            "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING,
            "lanczos": Image.Resampling.LANCZOS}
HIGH_DEPTH = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535}


def preprocess(file, pre: dict) -> np.ndarray:
    """An image file (path or binary file object) -> uint8 array (input_size, input_size, 3), RGB."""
    with Image.open(file) as img:
        short = min(img.size)
        if img.format == "JPEG" and short > 2 * pre["resize_size"]:
            # reduced-size JPEG decoding (libjpeg's DCT scaling), as imgtune does for large photos
            scale = pre["resize_size"] / short
            img.draft("RGB", (max(1, int(img.width * scale)), max(1, int(img.height * scale))))
        img.load()
        img = to_rgb(img)
    img = resize_shorter_side(img, pre["resize_size"], RESAMPLE[pre["interpolation"]])
    return center_crop(np.asarray(img), pre["input_size"])


def to_rgb(img: Image.Image) -> Image.Image:
    """EXIF orientation applied; alpha composited on white; 16-bit scaled (not clipped); CMYK through
    its ICC profile when it has one."""
    img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in HIGH_DEPTH or mode in ("I", "F"):
        return scale_to_8bit(img).convert("RGB")
    if mode == "CMYK":
        if img.info.get("icc_profile"):
            try:
                source = ImageCms.ImageCmsProfile(io.BytesIO(img.info["icc_profile"]))
                return ImageCms.profileToProfile(img, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
            except (ImageCms.PyCMSError, OSError):
                pass
        return img.convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or img.mode == "RGBA":
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def scale_to_8bit(img: Image.Image) -> Image.Image:
    values = np.asarray(img)
    if img.mode == "F":
        values = values.astype(np.float64)
        inside = values.min() >= 0 and values.max() <= 1
        low, high = (0.0, 1.0) if inside else (values.min(), values.max())
        scaled = (values - low) / max(high - low, 1e-12) * 255.0
    else:
        peak = int(values.max()) if values.size else 0
        top = HIGH_DEPTH.get(img.mode) or (255 if peak <= 255 else 65535 if peak <= 65535 else 2**32 - 1)
        scaled = values.astype(np.float64) * (255.0 / top)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def resize_shorter_side(img: Image.Image, size: int, resample) -> Image.Image:
    """The shorter side to `size`, the longer one to int(size * long / short) (Pillow's resize,
    which antialiases when it shrinks)."""
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    return img if (new_w, new_h) == (w, h) else img.resize((new_w, new_h), resample=resample)


def center_crop(pixels: np.ndarray, size: int) -> np.ndarray:
    """The central size x size pixels (zero-padded first if the image is smaller)."""
    h, w = pixels.shape[:2]
    if size > h or size > w:
        top, left = max(size - h, 0) // 2, max(size - w, 0) // 2
        bottom, right = max(size - h, 0) - top, max(size - w, 0) - left
        pixels = np.pad(pixels, ((top, bottom), (left, right), (0, 0)))
        h, w = pixels.shape[:2]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return np.ascontiguousarray(pixels[top:top + size, left:left + size])
