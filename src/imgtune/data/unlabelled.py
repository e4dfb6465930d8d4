"""Folders of unlabelled images (``imgtune suggest RUN DIR``, ``imgtune train DATA --unlabeled DIR``),
checked as labelled data is: every file decoded once (``scan.check_files``), unreadable ones skipped and
named; an empty folder or one whose images are all unreadable is an error.

For semi-supervised training (:func:`open_unlabelled`) an unlabelled image that is a copy or a
near-copy of a val or test image (same bytes, or close perceptual fingerprints confirmed by their
pixels: :mod:`imgtune.data.duplicates`) is skipped with a warning naming both: trained on with a
pseudo-label, it would leak the held-out image into training. Copies of labelled training images are
skipped too (their label is known already).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..cache import ArrayStore
from ..errors import DataError
from .duplicates import leaks_into
from .scan import DataSplits, Sample, _image_files, check_files

log = logging.getLogger(__name__)

SHOWN = 10  # leaking images named one by one in the log; the rest counted


@dataclass
class Unlabelled:
    """The usable unlabelled images of a folder and what was left out, and why."""

    folder: Path
    samples: list[Sample]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # unreadable: (path, reason)
    leaking: list[tuple[str, str, str]] = field(default_factory=list)  # (path, held-out image, "copy"/"near-copy")
    labelled: int = 0  # copies of labelled training images

    def summary(self) -> dict:
        return {"folder": str(self.folder), "images": len(self.samples),
                "skipped_unreadable": [{"path": p, "reason": r} for p, r in self.skipped],
                "skipped_leaking": [{"path": p, "copy_of": h, "match": m} for p, h, m in self.leaking],
                "skipped_already_labelled": self.labelled}


def checked_images(folder: str | Path, flag: str = "DIR", checks: ArrayStore | None = None,
                   progress: bool = True) -> tuple[list[Sample], list[tuple[str, str]]]:
    """Every readable image under ``folder`` (recursively) and the skipped files (path, reason)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{flag} {folder} is not a folder; pass the folder of unlabelled images")
    found = [Sample(path, "") for path in _image_files(folder)]
    if not found:
        raise DataError(f"{flag} {folder} holds no image files (none with an image extension such as .jpg or .png, "
                        "in it or its subfolders); pass the folder that holds the unlabelled images")
    good, skipped, _ = check_files(found, progress, checks)
    if not good:
        raise DataError(f"{flag} {folder}: none of its {len(found)} image file(s) can be read ({skipped[0][0]}: "
                        f"{skipped[0][1]}, ...); check the files or pass another folder")
    return good, skipped


def unlabelled_images(folder: str | Path, flag: str = "DIR") -> list[Sample]:
    """Every readable image under ``folder`` (recursively), checked like training data."""
    return checked_images(folder, flag)[0]


def open_unlabelled(folder: str | Path, splits: DataSplits, checks: ArrayStore | None = None,
                    progress: bool = True) -> Unlabelled:
    """The images of ``folder`` that semi-supervised training may use alongside ``splits``."""
    good, skipped = checked_images(folder, "--unlabeled", checks, progress)
    held = [s for s in splits.samples if s.split in ("val", "test")]
    by_digest = {s.digest: s for s in held if s.digest}
    labelled = {s.digest for s in splits.split("train") if s.digest}
    leaking = [(s, by_digest[s.digest], "copy") for s in good if s.digest in by_digest]
    leaking += [(unl, other, "near-copy") for other, unl, _ in leaks_into(good, held) if unl.digest not in by_digest]
    _warn(leaking)
    out = {s.path for s, _, _ in leaking}
    known = [s for s in good if s.digest in labelled and s.path not in out]
    if known:
        log.info("--unlabeled: %d image(s) are copies of labelled training images and are left out", len(known))
    out |= {s.path for s in known}
    kept = [s for s in good if s.path not in out]
    if not kept:
        raise DataError(f"--unlabeled {folder}: none of its {len(good)} readable image(s) can be used (copies or "
                        f"near-copies of val/test images: {len(leaking)}, of labelled training images: {len(known)}); "
                        "pass a folder of images that are not in the dataset")
    log.info("--unlabeled %s: %d image(s) (%d unreadable, %d leaking val/test images, %d already labelled skipped)",
             folder, len(kept), len(skipped), len(leaking), len(known))
    return Unlabelled(Path(folder), kept, skipped, [(str(s.path), str(o.path), m) for s, o, m in leaking],
                      len(known))


def _warn(leaking: list[tuple[Sample, Sample, str]]) -> None:
    for sample, other, match in leaking[:SHOWN]:
        log.warning("--unlabeled: skipping %s: a %s of %s (%s split); trained on, it would leak into the "
                    "measurement", sample.path, match, other.path, other.split)
    if len(leaking) > SHOWN:
        log.warning("--unlabeled: skipping %d more copies or near-copies of val/test images", len(leaking) - SHOWN)
