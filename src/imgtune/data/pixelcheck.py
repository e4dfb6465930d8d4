"""The pixel-level check that confirms a perceptual-hash candidate (``fingerprint.near_pairs``).

The hash alone does not hold across kinds of images: distinct images of one kind (low-resolution
scans of one digit, chest X-rays in one pose, one kind of road sign) share their low DCT
frequencies, so their hashes can be as close as a resized copy's. Stored beside each hash is a 32x32
greyscale thumbnail of the whole image (1 KB, made from the same decode). A candidate pair is a
near-duplicate only when, normalised to mean 0 and variance 1 at 16x16, one image's whole view and
the best-aligned window of the other correlate at least ``MIN_CORRELATION``. The alignment starts at
the best of the hash's 18 windows and is refined by a small search over the window's width, height
and offset, so a crop lines up. Measured (docs/data.md, bench/near_duplicates.py): resized, JPEG
re-encoded and brightened copies correlate above 0.996; on images of 160 px or more, crops of 10% at
offset 0 or 10% and 5% around the centre above 0.994; distinct digit scans and look-alikes mostly
below 0.99, where the hash alone called hundreds to thousands of them near-duplicates.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

THUMB = 32  # side of the stored thumbnail
COMPARE = 16  # side the views are compared at: both sides are shrunk, so blur and resampling match
MIN_CORRELATION = 0.99  # at least this is a near-duplicate (see the measurements above)
MAX_GAIN = 0.02  # the alignment search was measured to add at most 0.016; pairs further below are refused
STEPS = (0.02, 0.01, 0.005)  # of each side: the alignment search's steps, coarse to fine
SMALLEST = 0.8  # smallest window (fraction of each side) the search may reach
FLAT = 1.0  # a thumbnail whose grey levels vary less than this (standard deviation) is blank


def thumbnail(grey: Image.Image) -> bytes:
    """``THUMB x THUMB`` uint8 greyscale of the whole image (squashed to a square as the hash is)."""
    shrinking = min(grey.size) >= THUMB
    small = grey.resize((THUMB, THUMB), Image.BOX if shrinking else Image.BILINEAR)
    return np.asarray(small, dtype=np.uint8).tobytes()


def correlations(thumbs_a: np.ndarray, thumbs_b: np.ndarray, pairs: list[tuple[int, int]],
                 windows: list[tuple[float, float, float]], chunk: int = 1024) -> list[float]:
    """For each pair ``(i, j)``: the best correlation of one image's whole view with an aligned window of
    the other (either way); ``thumbs_*`` are ``(n, THUMB**2)`` uint8, ``windows`` the hash's (frac, ox, oy).
    Views are computed per chunk of pairs (19 KB per image of a pair), so memory stays bounded (~40 MB)."""
    boxes = [(1.0, 1.0, 0.0, 0.0)] + [(frac, frac, ox, oy) for frac, ox, oy in windows]
    out: list[float] = []
    for start in range(0, len(pairs), chunk):
        block = np.asarray(pairs[start:start + chunk], dtype=np.int64).reshape(-1, 2)
        a, b = _views(thumbs_a[block[:, 0]], boxes), _views(thumbs_b[block[:, 1]], boxes)
        ab = np.einsum("pvd,pd->pv", a[:, 1:], b[:, 0]) / a.shape[2]  # a's windows against b's whole
        ba = np.einsum("pvd,pd->pv", b[:, 1:], a[:, 0]) / a.shape[2]
        best = np.maximum(np.einsum("pd,pd->p", a[:, 0], b[:, 0]) / a.shape[2], np.maximum(ab.max(1), ba.max(1)))
        for p in np.flatnonzero(best >= MIN_CORRELATION - MAX_GAIN):
            i, j = block[p]
            score, _, whole, thumb, box = max(  # the best start: whole to whole, a's window to b, b's window to a
                (float(a[p, 0] @ b[p, 0]) / a.shape[2], 2, b[p, 0], thumbs_a[i], boxes[0]),
                (float(ab[p].max()), 1, b[p, 0], thumbs_a[i], boxes[1 + int(ab[p].argmax())]),
                (float(ba[p].max()), 0, a[p, 0], thumbs_b[j], boxes[1 + int(ba[p].argmax())]),
                key=lambda option: option[:2])
            best[p] = _refine(whole, thumb, box, score)
        flat = (thumbs_a[block[:, 0]].std(1) < FLAT) & (thumbs_b[block[:, 1]].std(1) < FLAT)
        best[flat] = 1.0  # two blank images: nothing to compare but their hashes
        out += best.tolist()
    return out


def _views(thumbs: np.ndarray, boxes: list[tuple[float, float, float, float]]) -> np.ndarray:
    """``(n, len(boxes), COMPARE**2)``: each box of each thumbnail resampled to ``COMPARE x COMPARE`` (as
    Pillow's antialiased bilinear resize does, as one matrix product), normalised to mean 0, variance 1."""
    images = thumbs.reshape(-1, THUMB, THUMB).astype(np.float32)
    rows = np.stack([_resampling(round(oy, 4), round(fy, 4)) for _, fy, _, oy in boxes])
    cols = np.stack([_resampling(round(ox, 4), round(fx, 4)) for fx, _, ox, _ in boxes])
    views = rows[None] @ images[:, None] @ cols.transpose(0, 2, 1)[None]
    views = views.reshape(len(images), len(boxes), -1)
    views -= views.mean(-1, keepdims=True)
    spread = views.std(-1, keepdims=True)
    return views / np.where(spread > 1e-6, spread, 1.0)


@functools.lru_cache(maxsize=4096)
def _resampling(offset: float, frac: float) -> np.ndarray:
    """``(COMPARE, THUMB)`` weights: the span ``[offset, offset + frac]`` (fractions of a side) of a row of
    ``THUMB`` pixels resampled to ``COMPARE`` with a triangle filter widened by the scale (antialiased)."""
    scale = frac * THUMB / COMPARE
    support = max(scale, 1.0)
    centres = offset * THUMB + (np.arange(COMPARE) + 0.5) * scale
    weights = np.clip(1 - np.abs(np.arange(THUMB)[None, :] + 0.5 - centres[:, None]) / support, 0, None)
    return (weights / weights.sum(1, keepdims=True)).astype(np.float32)


def _refine(whole: np.ndarray, thumb: np.ndarray, box: tuple[float, ...], score: float) -> float:
    """Pattern search over the window's width, height and offsets from ``box`` (a crop may keep more of
    one side than of the other), keeping the best correlation."""
    for step in STEPS:
        improved = True
        while improved and score < MIN_CORRELATION:
            improved = False
            for axis in range(4):
                for sign in (-1, 1):
                    moved = list(box)
                    moved[axis] += sign * step
                    if not _inside(moved):
                        continue
                    trial = float(_views(thumb[None], [tuple(moved)])[0, 0] @ whole / whole.size)
                    if trial > score:
                        score, box, improved = trial, tuple(moved), True
    return score


def _inside(box: list[float]) -> bool:
    fx, fy, ox, oy = box
    fits = 0.0 <= ox <= 1.0 - fx + 1e-9 and 0.0 <= oy <= 1.0 - fy + 1e-9
    return SMALLEST <= min(fx, fy) and max(fx, fy) <= 1.0 and fits
