"""Perceptual fingerprints for finding near-duplicate images.

A fingerprint is the DCT perceptual hash (the algorithm of ``imagehash.phash``) of the whole image and of 18 windows
(90% and 95% of each side, at three offsets on each axis), each at two sizes: 64 bits for a fast
first pass and 256 bits to decide. Resizing, JPEG re-compression and brightness changes of ~10%
leave the whole-image hash almost unchanged; a crop of up to 10% of each side matches one of the
other image's windows. Two images are near-duplicates when the closest of (whole, whole), (whole,
window) and (window, whole) is within ``NEAR_BITS`` of 256 bits. Measured on hymenoptera
(docs/data.md): different photos are at least 78 bits apart, the variants above at most 56.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .pixelcheck import MIN_CORRELATION, THUMB, correlations, thumbnail

WINDOWS = [(frac, ox, oy) for frac, offsets in ((0.9, (0.0, 0.05, 0.1)), (0.95, (0.0, 0.025, 0.05)))
           for ox in offsets for oy in offsets]
ROWS = 1 + len(WINDOWS)  # whole image first
WORDS = 5  # per row: one uint64 of the 64-bit hash, four of the 256-bit hash
HASH_BYTES = ROWS * WORDS * 8
NEAR_BITS = 60  # of 256: at most this many differing bits is a near-duplicate (crops measured <= 56, photos >= 78)
FIRST_PASS_BITS = 16  # of 64: candidates for the 256-bit check (crops measured at most 8)
# the unnormalised DCT-II's lowest 16 rows for 64 samples (scipy.fft.dct's type 2, norm=None)
_LOW = 2 * np.cos(np.pi * np.arange(16)[:, None] * (2 * np.arange(64)[None, :] + 1) / 128)


def fingerprint(img: Image.Image) -> bytes:
    """``ROWS x WORDS`` uint64 values as bytes, then the ``THUMB x THUMB`` thumbnail (pixelcheck.py):
    ``Sample.fingerprint``, 1,784 bytes.

    The algorithm of ``imagehash.phash`` (greyscale, resize, 2-D DCT-II, low frequencies above their
    median), batched: each view is resized once to 64x64, and one product with the DCT-II's 16 lowest
    basis rows (:data:`_LOW`) gives both sizes (the 8x8 and 16x16 lowest frequencies) of all 19 views.
    Calling imagehash 38 times per image was 5x slower; the full 64x64 DCT (scipy's ``dctn``), whose
    bits these equal on every image measured, took half of a 28 px image's time."""
    grey = img.convert("L")
    if max(grey.size) > 128:  # the hashes look at 64 pixels; shrink once
        grey = grey.resize(_fit(grey.size, 128), Image.LANCZOS, reducing_gap=2.0)
    w, h = grey.size
    views = [grey] + [grey.crop((round(ox * w), round(oy * h), round((ox + frac) * w), round((oy + frac) * h)))
                      for frac, ox, oy in WINDOWS]
    pixels = np.stack([np.asarray(v.resize((64, 64), Image.LANCZOS)) for v in views]).astype(np.float64)
    dct = _LOW @ pixels @ _LOW.T  # (ROWS, 16, 16): scipy.fft.dctn(pixels, type=2, axes=(1, 2))[:, :16, :16]
    # rounding leaves ~1e-13 where the DCT is exactly zero (a blank view, a symmetric one): zero, as the FFT gives
    dct[np.abs(dct) <= 1e-9 * np.abs(dct).max(axis=(1, 2), keepdims=True)] = 0.0
    out = np.empty((ROWS, WORDS), dtype=np.uint64)
    for size, columns in ((8, slice(0, 1)), (16, slice(1, WORDS))):
        low = dct[:, :size, :size].reshape(ROWS, -1)
        bits = low > np.median(low, axis=1, keepdims=True)
        out[:, columns] = np.frombuffer(np.packbits(bits, axis=1).tobytes(), dtype=">u8").reshape(ROWS, -1)
    return out.tobytes() + thumbnail(grey)


def _fit(size: tuple[int, int], longest: int) -> tuple[int, int]:
    scale = longest / max(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


@dataclass(frozen=True)
class Prints:
    """Fingerprints of ``n`` images: ``hashes`` ``(n, ROWS, WORDS)`` uint64, ``thumbs`` ``(n, THUMB**2)`` uint8."""
    hashes: np.ndarray
    thumbs: np.ndarray

    def __len__(self) -> int:
        return len(self.hashes)


def stack(fingerprints: list[bytes]) -> Prints:
    if not fingerprints:
        return Prints(np.zeros((0, ROWS, WORDS), dtype=np.uint64), np.zeros((0, THUMB * THUMB), dtype=np.uint8))
    raw = np.frombuffer(b"".join(fingerprints), dtype=np.uint8).reshape(len(fingerprints), -1)
    return Prints(raw[:, :HASH_BYTES].copy().view(np.uint64).reshape(len(fingerprints), ROWS, WORDS),
                  raw[:, HASH_BYTES:HASH_BYTES + THUMB * THUMB])


def near_pairs(prints: Prints, queries: Prints | None = None, chunk: int = 64) -> list[tuple[int, int, int]]:
    """Pairs ``(i, j, bits)`` of near-duplicates with ``bits`` the 256-bit distance. Without ``queries``,
    all pairs i < j of ``prints``; with them, ``i`` indexes ``queries`` and ``j`` indexes ``prints``.
    Hash candidates count only when their pixels agree (``pixelcheck.correlations``)."""
    same = queries is None
    queries = prints if same else queries
    candidates = _hash_pairs(prints.hashes, queries.hashes, same, chunk)
    scores = correlations(queries.thumbs, prints.thumbs, [(i, j) for i, j, _ in candidates], WINDOWS)
    return [pair for pair, score in zip(candidates, scores) if score >= MIN_CORRELATION]


def _hash_pairs(prints: np.ndarray, queries: np.ndarray, same: bool, chunk: int) -> list[tuple[int, int, int]]:
    """The hash candidates: within ``NEAR_BITS`` of 256 bits (after a 64-bit first pass), in order of
    ``(i, j)``. Both passes are whole-array operations: images of one kind (digit scans) pass the first
    for a fifth of all pairs, hundreds of thousands on a few thousand images."""
    if not len(prints) or not len(queries):
        return []
    full64 = np.ascontiguousarray(prints[:, 0, 0])
    rows64 = np.ascontiguousarray(prints[:, :, 0].T)  # (ROWS, n): one contiguous scan per row, 4x faster
    found_i, found_j = [], []
    for start in range(0, len(queries), chunk):
        block = queries[start:start + chunk]
        # first pass, 64 bits: the query's whole image against every row (whole, windows) of the other ...
        whole = block[:, 0, 0][:, None]
        nearest = np.bitwise_count(whole ^ rows64[0][None, :])
        for row in rows64[1:]:
            np.minimum(nearest, np.bitwise_count(whole ^ row[None, :]), out=nearest)
        close = nearest <= FIRST_PASS_BITS
        if not same:  # ... and every row of the query against the other's whole image (over all pairs of one
            # set, the first pass already covers each window against the other's whole image)
            close |= np.bitwise_count(block[:, None, :, 0] ^ full64[None, :, None]).min(-1) <= FIRST_PASS_BITS
        i, j = np.nonzero(close)
        found_i.append(i + start)
        found_j.append(j)
    i, j = np.concatenate(found_i), np.concatenate(found_j)
    if same:  # each unordered pair once, as (smaller, larger)
        keep = i != j
        i, j = np.minimum(i[keep], j[keep]), np.maximum(i[keep], j[keep])
    key = np.unique(i.astype(np.int64) * len(prints) + j)  # sorted, each pair once
    i, j = key // len(prints), key % len(prints)
    bits = np.concatenate([_distances256(queries[i[k:k + 8192]], prints[j[k:k + 8192]])
                           for k in range(0, len(key), 8192)] or [np.zeros(0, dtype=np.int64)])
    near = bits <= NEAR_BITS
    return list(zip(i[near].tolist(), j[near].tolist(), bits[near].tolist()))


def _distances256(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """For pairs ``(x[p], y[p])`` of ``(ROWS, WORDS)`` hashes: the closest of whole-whole, whole-window and
    window-whole, in bits of 256."""
    xy = np.bitwise_count(x[:, None, 0, 1:] ^ y[:, :, 1:]).sum(-1, dtype=np.int64).min(-1)
    yx = np.bitwise_count(y[:, None, 0, 1:] ^ x[:, :, 1:]).sum(-1, dtype=np.int64).min(-1)
    return np.minimum(xy, yx)
