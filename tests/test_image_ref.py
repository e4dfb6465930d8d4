"""ImageRef: a file or in-memory bytes with a name, opened one way; load_rgb reads both alike."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from imgtune.data import DecodeError, ImageRef, load_rgb
from imgtune.data.image_ref import as_image_ref


@pytest.fixture
def picture(tmp_path):
    path = tmp_path / "dots.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 9, 3), dtype=np.uint8)).save(path)
    return path


def test_file_and_bytes_decode_alike_and_reopen(picture):
    by_file = ImageRef.file(picture)
    held = ImageRef.in_memory(picture.read_bytes(), "train/a/dots.png")
    expected = np.asarray(load_rgb(picture))
    for ref in (by_file, held, held):  # opening again starts at the first byte: no seek(0) anywhere
        assert np.array_equal(np.asarray(load_rgb(ref)), expected)
    with held.open() as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    assert str(by_file) == str(picture) and str(held) == "train/a/dots.png"
    assert "data=" not in repr(held)  # the bytes are not dumped into messages
    assert as_image_ref(str(picture)) == by_file and as_image_ref(held) is held


def test_unreadable_references_raise_decode_errors(tmp_path):
    with pytest.raises(DecodeError):
        load_rgb(ImageRef.file(tmp_path / "missing.png"))
    with pytest.raises(DecodeError) as caught:
        load_rgb(ImageRef.in_memory(b"not an image", "x.jpg"))
    assert caught.value.kind == "not-an-image"


def test_a_reference_is_a_path_or_named_bytes():
    with pytest.raises(ValueError):
        ImageRef()
    with pytest.raises(ValueError):
        ImageRef(path="a.png", data=b"x", name="a.png")
    with pytest.raises(ValueError):
        ImageRef(data=b"x")  # bytes without a name to show
