"""``imgtune evaluate``: metrics with confidence intervals, the confusion matrix and calibration (ECE before
and after the run's temperature).

:func:`evaluate` (and :func:`measure`, with a Predictor already built) only computes; :func:`write_evaluation`
writes the files into the run folder, with figures from :mod:`imgtune.figures`:
``evaluation_<split>.json``, ``confusion_matrix_<split>.csv`` and ``.png``, ``reliability_<split>.png`` for
the run's own data, and ``..._<split>_<tag>...`` for other data (:func:`data_tag`), so measuring other
data never replaces the run's own evaluation.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import artifact, calibration, figures, runlock
from .data.image_ref import ImageRef
from .data.scan import SPLITS, check_files, find_samples, load_splits
from .data.shards import is_shards, load_manifest, read_split
from .errors import DataError, UsageError
from .metrics import bootstrap_ci, classification_report

if TYPE_CHECKING:
    from .predictions import RunPredictor

log = logging.getLogger(__name__)


def full_report(y_true: np.ndarray, probs: np.ndarray, classes: list[str], seed: int = 0) -> dict:
    """The classification report with 95% bootstrap intervals: ``ci95`` for accuracy and macro F1, and
    each class's ``per_class[c]["ci95"]`` for its precision, recall and F1."""
    report = classification_report(y_true, probs, classes)
    ci = bootstrap_ci(y_true, probs.argmax(axis=1), len(classes), seed=seed)
    per_class = ci.pop("per_class")
    report["ci95"] = ci
    for i, name in enumerate(classes):
        report["per_class"][name]["ci95"] = {key: values[i] for key, values in per_class.items()}
    return report


@dataclass
class EvaluationResult:
    run_dir: Path
    classes: list[str]
    split: str
    source: str  # the data measured: the run's own source, or the DATA argument
    own_data: bool  # False when measured on other data (a DATA argument)
    report: dict
    skipped: list[tuple[str, str]]
    images: list[ImageRef] = field(default_factory=list)  # the images measured, in the order of the rows below
    y_true: np.ndarray | None = None  # class indices
    probs: np.ndarray | None = None  # (images, classes), the model's own (uncalibrated) probabilities
    tta: bool = False  # probabilities averaged with the mirror images' (--tta)

    @property
    def paths(self) -> list[str]:
        return [str(image) for image in self.images]


@dataclass
class Selection:
    images: list[ImageRef]
    labels: list[str]
    split: str
    skipped: list[tuple[str, str]]


def select_images(run: artifact.RunInfo, data: str | None, split: str | None) -> Selection:
    """Which images to evaluate: the run's own split (val by default) when ``data`` is None; else the
    given data's ``split`` (test if it has one, else val), or all of it when it has no splits."""
    if split is not None and split not in SPLITS:
        raise UsageError(f"--split must be one of {', '.join(SPLITS)}; got {split!r}")
    if data is None and is_shards(run.config.data.source):
        return _from_shards(run.config.data.source, split or "val")
    if data is None and not run.config.data.source:
        raise DataError(f"{run.path} was trained by a federation (imgtune federate): its images stayed at the sites, "
                        "so name some: imgtune evaluate RUN DATA (or imgtune export RUN --check-images DIR)")
    if data is None:
        cfg = run.config
        splits = load_splits(cfg.data.source, cfg.data.val_fraction, cfg.data.test_fraction, cfg.train.seed,
                             allow_outside_paths=cfg.data.allow_outside_paths)
        name = split or "val"
        chosen = splits.split(name)
        if not chosen:
            raise DataError(f"the run's data {cfg.data.source} has no {name} split")
        return _selection(chosen, name, splits.skipped)
    samples, _ = find_samples(data)
    good, skipped, _ = check_files(samples)
    present = {s.split for s in good} - {None}
    if present:
        name = split or ("test" if "test" in present else "val")
        good = [s for s in good if s.split == name]
        if not good:
            raise DataError(f"{data} has no readable images in its {name} split")
    else:
        name = "all"
    unknown = sorted({s.label for s in good} - set(run.classes))
    if unknown:
        raise DataError(f"{data} has class(es) {unknown} that the model was not trained on "
                        f"(its classes: {run.classes})")
    return _selection(good, name, skipped)


def _selection(samples: list, name: str, skipped: list) -> Selection:
    return Selection([ImageRef.file(s.path) for s in samples], [s.label for s in samples], name, skipped)


def _from_shards(source: str, name: str) -> Selection:
    """The split read from the run's shards: each image's bytes in memory, named by its original file."""
    splits = load_manifest(source)
    items = read_split(splits, name)
    return Selection([ImageRef.in_memory(data, path) for path, _, data in items], [label for _, label, _ in items],
                     name, splits.skipped)


def evaluate(run_dir: str | Path, data: str | None = None, split: str | None = None, device: str = "auto",
             batch_size: int = 32, engine: str = "auto", int8: bool = False, tta: bool = False) -> EvaluationResult:
    """Measure the run on its own split (val by default) or on ``data`` (see :func:`select_images`), with
    the ``engine`` of :func:`~imgtune.ort_predict.open_predictor`. Computes only: :func:`write_evaluation`
    writes the files ``imgtune evaluate`` writes."""
    from .ort_predict import open_predictor

    return measure(open_predictor(run_dir, engine, device, int8=int8), data, split, batch_size, tta)


def measure(predictor: "RunPredictor", data: str | None = None, split: str | None = None,
            batch_size: int = 32, tta: bool = False) -> EvaluationResult:
    """:func:`evaluate` with a predictor already built from the run (``Predictor.from_run`` or
    ``OrtPredictor.from_run``, uncalibrated), so a caller that needs the model again (the report's
    Grad-CAM gallery) builds it once."""
    run = predictor.run
    if run is None or predictor.temperature is not None:
        raise UsageError("measure() needs an uncalibrated predictor made from the run folder "
                         "(Predictor.from_run(RUN) or OrtPredictor.from_run(RUN); it reads the run's data and "
                         "calibration)")
    chosen = select_images(run, data, split)
    probs, errors = predictor.probabilities(chosen.images, batch_size, tta)
    failed = [(str(image), e) for image, e in zip(chosen.images, errors) if e]
    ok = [i for i, e in enumerate(errors) if e is None]
    if not ok:
        raise DataError(f"none of the {len(chosen.images)} {chosen.split} image(s) could be read (first: "
                        f"{failed[0][0]}: {failed[0][1]})")
    index = {c: i for i, c in enumerate(run.classes)}
    y_true = np.array([index[chosen.labels[i]] for i in ok])
    report = full_report(y_true, probs[ok], run.classes)
    report["calibration"] = split_calibration(run, y_true, probs[ok], own_val=data is None and chosen.split == "val")
    report["tta"] = "flip" if tta else None
    return EvaluationResult(run.path, run.classes, chosen.split, data or run.config.data.source, data is None, report,
                            chosen.skipped + failed, [chosen.images[i] for i in ok], y_true, probs[ok], tta)


def split_calibration(run: artifact.RunInfo, y_true: np.ndarray, probs: np.ndarray, own_val: bool) -> dict:
    """ECE of these predictions, and with the run's stored temperature when it has one; the reliability
    tables of both."""
    table = calibration.reliability(probs, y_true)
    found: dict = {"n_bins": calibration.N_BINS, "ece": table.ece, "reliability": table.to_dict(),
                   "temperature": None, "ece_calibrated": None}
    if not (run.path / artifact.CALIBRATION).is_file():
        found["note"] = (f"no {artifact.CALIBRATION} in the run (trained before imgtune fitted a temperature): "
                         "no calibrated ECE")
        return found
    temperature = float(artifact.read_calibration(run.path)["temperature"])
    scaled = calibration.reliability(calibration.scale(calibration.logits_from_probs(probs), temperature), y_true)
    found.update(temperature=temperature, ece_calibrated=scaled.ece, reliability_calibrated=scaled.to_dict())
    if own_val:
        found["note"] = ("the temperature was fitted on this split, so the calibrated ECE is in-sample "
                         "(optimistic); metrics.json's calibration block holds the held-out figure")
    return found


def data_tag(data: str | Path) -> str:
    """A short name for other data in file names: its file or folder name (letters, digits and ``-``)
    and 8 hex digits of a hash of its absolute path (or URL), e.g. ``photos-1a2b3c4d``."""
    text = str(data)
    where = text if "://" in text else str(Path(text).expanduser().resolve())
    name = re.sub(r"[^A-Za-z0-9]+", "-", Path(where).name).strip("-")[:32] or "data"
    return f"{name}-{hashlib.sha256(where.encode()).hexdigest()[:8]}"


def evaluation_files(result: EvaluationResult) -> dict[str, Path]:
    """Where :func:`write_evaluation` puts each file: ``<kind>_<split>`` for the run's own data,
    ``<kind>_<split>_<tag>`` for other data (see :func:`data_tag`), then ``_tta`` with ``--tta`` (so a
    measurement with flip TTA sits beside the plain one); all match ``artifact.EVALUATION_FILES``."""
    suffix = result.split if result.own_data else f"{result.split}_{data_tag(result.source)}"
    suffix += "_tta" if result.tta else ""
    return {"json": result.run_dir / f"evaluation_{suffix}.json",
            "csv": result.run_dir / f"confusion_matrix_{suffix}.csv",
            "png": result.run_dir / f"confusion_matrix_{suffix}.png",
            "reliability": result.run_dir / f"reliability_{suffix}.png"}


def write_evaluation(result: EvaluationResult) -> dict[str, Path]:
    """Write the evaluation into the run folder (each file atomically): the report as JSON, the confusion
    matrix as CSV and PNG, the reliability diagram; returns :func:`evaluation_files`."""
    files = evaluation_files(result)
    matrix = np.array(result.report["confusion_matrix"])
    found = result.report["calibration"]
    with runlock.hold(files["json"].parent, "evaluate"):
        artifact.atomic_write_text(files["csv"], confusion_csv(matrix, result.classes))
        artifact.atomic_write_bytes(files["png"], figures.confusion_png(matrix, result.classes,
                                                                        f"Confusion matrix ({result.split})"))
        artifact.atomic_write_bytes(files["reliability"], figures.reliability_png(
            found["reliability"], found["ece"], f"Reliability ({result.split})",
            found.get("reliability_calibrated"), found["temperature"]))
        artifact.write_json(files["json"], {"split": result.split, "data": result.source, **result.report})
    return files


def confusion_csv(matrix: np.ndarray, classes: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["true \\ predicted", *classes])
    for name, row in zip(classes, matrix):
        writer.writerow([name, *map(int, row)])
    return buffer.getvalue()
