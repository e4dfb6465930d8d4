"""decode.load_rgb / probe: every mode becomes exact 8-bit RGB; broken files raise DecodeError."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from imagegen import (write_animated_gif, write_exif_jpeg, write_noise, write_palette, write_solid, write_text,
                      write_truncated_jpeg)
from PIL import Image, ImageFile

from imgtune.data.decode import ALPHA_BACKGROUND, DecodeError, ImageInfo, load_rgb, probe


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def over_white(value: int, alpha: int) -> int:
    """The documented compositing onto ALPHA_BACKGROUND (white), rounded."""
    return round((value * alpha + 255 * (255 - alpha)) / 255)


def test_alpha_background_is_white():
    assert ALPHA_BACKGROUND == (255, 255, 255)


def test_rgb_passes_through_unchanged(tmp_path):
    path = write_noise(tmp_path / "noise.png")
    assert np.array_equal(pixels(load_rgb(path)), np.asarray(Image.open(path)).astype(int))


def test_16bit_grey_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[65535, 32896, 257, 0, 128, 65280]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")  # the case under test: Pillow opens it as 16-bit
    out = pixels(load_rgb(path))
    assert out.shape == (1, 6, 3)
    assert out[0, :, 0].tolist() == [255, 128, 1, 0, 0, 254]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_dark_16bit_png_stays_dark(tmp_path):
    """Every value <= 255 in a 16-bit file is almost black, not the full 8-bit range."""
    path = tmp_path / "dark.png"
    Image.fromarray(np.array([[255, 200, 0]], dtype=np.uint16)).save(path)
    assert pixels(load_rgb(path))[0, :, 0].tolist() == [1, 1, 0]


def test_rgba_half_transparent_is_composited_on_white(tmp_path):
    image = Image.new("RGBA", (3, 1))
    image.putdata([(0, 100, 200, 128), (10, 20, 30, 255), (10, 20, 30, 0)])
    image.save(tmp_path / "alpha.png")
    out = pixels(load_rgb(tmp_path / "alpha.png"))
    assert out[0, 0].tolist() == [over_white(0, 128), over_white(100, 128), over_white(200, 128)] == [127, 177, 227]
    assert out[0, 1].tolist() == [10, 20, 30]
    assert out[0, 2].tolist() == list(ALPHA_BACKGROUND)


def test_la_half_transparent_is_composited_on_white(tmp_path):
    image = Image.new("LA", (2, 1))
    image.putdata([(0, 128), (60, 255)])
    image.save(tmp_path / "la.png")
    assert Image.open(tmp_path / "la.png").mode == "LA"
    out = pixels(load_rgb(tmp_path / "la.png"))
    assert out[0, 0].tolist() == [127, 127, 127]
    assert out[0, 1].tolist() == [60, 60, 60]


def test_palette_gif_with_transparency_shows_white(tmp_path):
    path = write_palette(tmp_path / "p.gif", [[0, 1], [2, 1]], [(0, 0, 0), (255, 0, 0), (0, 0, 255)],
                         transparency=0)
    with Image.open(path) as img:
        assert img.mode == "P" and "transparency" in img.info
    out = pixels(load_rgb(path))
    assert out[0, 0].tolist() == [255, 255, 255]  # transparent black -> background, not black
    assert out[0, 1].tolist() == [255, 0, 0]
    assert out[1, 0].tolist() == [0, 0, 255]


def test_palette_without_transparency_keeps_palette_colours(tmp_path):
    path = write_palette(tmp_path / "p.png", [[0, 1, 2]], [(0, 0, 0), (255, 0, 0), (12, 34, 56)])
    with Image.open(path) as img:
        assert img.mode == "P" and "transparency" not in img.info
    assert pixels(load_rgb(path))[0].tolist() == [[0, 0, 0], [255, 0, 0], [12, 34, 56]]


def test_cmyk_jpeg_becomes_rgb_of_the_right_colour(tmp_path):
    path = write_solid(tmp_path / "cmyk.jpg", (0, 255, 255, 0), mode="CMYK", quality=95)  # pure red ink
    with Image.open(path) as img:
        assert img.mode == "CMYK"
    out = pixels(load_rgb(path))
    assert np.abs(out - [255, 0, 0]).max() <= 8


@pytest.mark.parametrize("mode,value,expected", [("L", 77, 77), ("1", 1, 255), ("1", 0, 0)])
def test_greyscale_and_bilevel_become_rgb(tmp_path, mode, value, expected):
    path = write_solid(tmp_path / f"{mode}.png", value, mode=mode)
    with Image.open(path) as img:
        assert img.mode == mode
    out = pixels(load_rgb(path))
    assert out.shape == (16, 16, 3) and (out == expected).all()


@pytest.mark.parametrize("orientation,top_colour", [(6, (255, 0, 0)), (8, (0, 0, 255))])
def test_exif_orientation_is_applied(tmp_path, orientation, top_colour):
    """Orientation 6 rotates 90 degrees clockwise for display (stored left half -> top), 8 counter-clockwise."""
    path = write_exif_jpeg(tmp_path / "rotated.jpg", orientation, size=(32, 16))
    with Image.open(path) as img:
        assert img.size == (32, 16) and img.getexif()[0x0112] == orientation
    image = load_rgb(path)
    assert image.size == (16, 32)
    out = pixels(image)
    assert np.abs(out[4, 8] - top_colour).max() <= 16
    assert np.abs(out[27, 8] - top_colour).max() > 200


def test_animated_gif_gives_first_frame(tmp_path):
    path = write_animated_gif(tmp_path / "anim.gif", [(255, 0, 0), (0, 255, 0), (0, 0, 255)])
    with Image.open(path) as img:
        assert img.n_frames == 3
    out = pixels(load_rgb(path))
    assert out.shape == (16, 16, 3) and (out == [255, 0, 0]).all()


def test_draft_size_decodes_large_jpeg_smaller_but_not_below_request(tmp_path):
    path = write_noise(tmp_path / "big.jpg", size=(256, 128))
    image = load_rgb(path, draft_size=32)
    assert image.mode == "RGB" and 32 <= min(image.size) < 128
    assert load_rgb(path).size == (256, 128)


def test_probe_reports_format_mode_and_size(tmp_path):
    write_solid(tmp_path / "a.png", (1, 2, 3), size=(20, 10))
    write_solid(tmp_path / "b.jpg", 5, size=(12, 30), mode="L")
    assert probe(tmp_path / "a.png") == ImageInfo("PNG", "RGB", 20, 10)
    assert probe(tmp_path / "b.jpg") == ImageInfo("JPEG", "L", 12, 30)


# ---- errors -------------------------------------------------------------------------------------------


def _truncated(tmp_path):
    return write_truncated_jpeg(tmp_path / "cut.jpg"), "truncated"


def _text_named_jpg(tmp_path):
    return write_text(tmp_path / "notes.jpg"), "not an image"


def _zero_bytes(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    return path, "not an image"


def _missing(tmp_path):
    return tmp_path / "nowhere.jpg", "No such file"


@pytest.mark.parametrize("decode", [load_rgb, probe], ids=["load_rgb", "probe"])
@pytest.mark.parametrize("make", [_truncated, _text_named_jpg, _zero_bytes, _missing],
                         ids=["truncated", "text", "zero-bytes", "missing"])
def test_broken_files_raise_decode_error_saying_why(tmp_path, monkeypatch, decode, make):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    path, words = make(tmp_path)
    with pytest.raises(DecodeError, match=words):
        decode(path)


def test_missing_file_message_names_the_file(tmp_path):
    with pytest.raises(DecodeError, match="nowhere.jpg"):
        load_rgb(tmp_path / "nowhere.jpg")


@pytest.mark.parametrize("decode", [load_rgb, probe], ids=["load_rgb", "probe"])
@pytest.mark.parametrize("side", [12, 16], ids=["over-limit-warning", "over-twice-limit-error"])
def test_decompression_bomb_raises_decode_error(tmp_path, monkeypatch, decode, side):
    """Pillow warns above MAX_IMAGE_PIXELS and errors above twice it: both must become DecodeError."""
    path = write_solid(tmp_path / "bomb.png", size=(side, side))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    filters_before = list(warnings.filters)
    with pytest.raises(DecodeError, match="pixels"):
        decode(path)
    assert warnings.filters == filters_before  # the warning filter is not left behind
