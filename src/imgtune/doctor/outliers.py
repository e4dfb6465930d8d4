"""Files that are odd for their dataset: a rare format or colour mode, 16-bit depth, CMYK, alpha,
animation, a tiny image, an extreme aspect ratio. Each is decoded correctly (docs/data.md says how),
but an odd file is often a placeholder, a screenshot or an image from another source.

Rules (documented in docs/data.md): a format or mode held by under ``RARE_SHARE`` of the readable
files is rare; an image is tiny when its shorter side is under ``TINY_SIDE`` pixels or under a
quarter of the dataset's median shorter side; an aspect ratio over ``ASPECT_LIMIT``:1 is extreme.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from ..data.scan import FileCheck

RARE_SHARE = 0.05
TINY_SIDE = 32
SMALL_FACTOR = 4
ASPECT_LIMIT = 3.0
_MODE_NAMES = {"RGB": "RGB", "L": "greyscale", "P": "palette", "1": "1-bit", "CMYK": "CMYK", "RGBA": "alpha",
               "LA": "alpha", "PA": "alpha", "YCbCr": "YCbCr", "I": "integer", "F": "floating point"}


def colour_kind(check: FileCheck) -> str:
    info = check.info
    if info.bits > 8:
        return f"{info.bits}-bit"
    return _MODE_NAMES.get(info.mode, info.mode)


def find_outliers(checks: list[FileCheck]) -> list:
    from . import Finding

    if not checks:
        return []
    formats = Counter(c.info.format for c in checks)
    kinds = Counter(colour_kind(c) for c in checks)
    median_short = float(np.median([min(c.info.width, c.info.height) for c in checks]))
    findings = []
    for check in checks:
        reasons = _reasons(check, formats, kinds, len(checks), median_short)
        if reasons:
            info = check.info
            findings.append(Finding(
                "outlier", "warning", f"{check.sample.path}: " + "; ".join(reasons), [str(check.sample.path)],
                {"reasons": reasons, "format": info.format, "mode": info.mode, "bits": info.bits,
                 "width": info.width, "height": info.height, "frames": info.frames, "label": check.sample.label}))
    return findings


def _reasons(check: FileCheck, formats: Counter, kinds: Counter, total: int, median_short: float) -> list[str]:
    info, reasons = check.info, []
    if formats[info.format] < RARE_SHARE * total:
        reasons.append(f"rare format {info.format} ({formats[info.format]} of {total} files; most are "
                       f"{formats.most_common(1)[0][0]})")
    kind = colour_kind(check)
    if kinds[kind] < RARE_SHARE * total:
        reasons.append(f"rare colour mode {kind} ({kinds[kind]} of {total}; most are {kinds.most_common(1)[0][0]})"
                       + _conversion(kind))
    if info.frames > 1:
        reasons.append(f"animated ({info.frames} frames): only the first frame is used")
    short, long = min(info.width, info.height), max(info.width, info.height)
    if short < TINY_SIDE or short < median_short / SMALL_FACTOR:
        reasons.append(f"tiny: {info.width}x{info.height} (the median shorter side is {median_short:.0f})")
    if long > ASPECT_LIMIT * short:
        reasons.append(f"extreme aspect ratio {long / short:.1f}:1 ({info.width}x{info.height}); the centre "
                       "crop sees little of it")
    return reasons


def _conversion(kind: str) -> str:
    return {"CMYK": ": converted to RGB with its ICC profile", "alpha": ": composited on white",
            "16-bit": ": scaled to 8 bits", "palette": ": converted to RGB"}.get(kind, "")
