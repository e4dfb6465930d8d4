"""``imgtune evaluate``: metrics with confidence intervals, and the confusion matrix as CSV and PNG."""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import artifact
from .data.scan import SPLITS, Sample, check_files, find_samples, load_splits
from .errors import DataError, UsageError
from .metrics import bootstrap_ci, classification_report

log = logging.getLogger(__name__)


def full_report(y_true: np.ndarray, probs: np.ndarray, classes: list[str], seed: int = 0) -> dict:
    report = classification_report(y_true, probs, classes)
    report["ci95"] = bootstrap_ci(y_true, probs.argmax(axis=1), len(classes), seed=seed)
    return report


@dataclass
class EvaluationResult:
    split: str
    source: str
    report: dict
    skipped: list[tuple[str, str]]
    files: dict[str, Path]


def select_samples(run: artifact.RunInfo, data: str | None, split: str | None) -> tuple[list[Sample], str, list]:
    """Which images to evaluate: the run's own split (val by default) when ``data`` is None; else the
    given data's ``split`` (test if it has one, else val), or all of it when it has no splits."""
    if split is not None and split not in SPLITS:
        raise UsageError(f"--split must be one of {', '.join(SPLITS)}; got {split!r}")
    if data is None:
        cfg = run.config
        splits = load_splits(cfg.data.source, cfg.data.val_fraction, cfg.data.test_fraction, cfg.train.seed)
        name = split or "val"
        chosen = splits.split(name)
        if not chosen:
            raise DataError(f"the run's data {cfg.data.source} has no {name} split")
        return chosen, name, splits.skipped
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
    return good, name, skipped


def evaluate(run_dir: str | Path, data: str | None = None, split: str | None = None, device: str = "auto",
             batch_size: int = 32) -> EvaluationResult:
    from .predict import Predictor

    predictor = Predictor.from_run(run_dir, device)
    run = predictor.run
    samples, name, skipped = select_samples(run, data, split)
    probs, errors = predictor.probabilities([s.path for s in samples], batch_size)
    failed = [(str(s.path), e) for s, e in zip(samples, errors) if e]
    ok = [i for i, e in enumerate(errors) if e is None]
    if not ok:
        raise DataError(f"none of the {len(samples)} {name} image(s) could be read (first: {failed[0][0]}: "
                        f"{failed[0][1]})")
    index = {c: i for i, c in enumerate(run.classes)}
    y_true = np.array([index[samples[i].label] for i in ok])
    report = full_report(y_true, probs[ok], run.classes)
    files = write_confusion(run.path, name, run.classes, np.array(report["confusion_matrix"]))
    artifact.write_json(run.path / f"evaluation_{name}.json", {"split": name, "data": data or run.config.data.source,
                                                                 **report})
    return EvaluationResult(name, data or run.config.data.source, report, skipped + failed, files)


def write_confusion(run_dir: Path, split: str, classes: list[str], matrix: np.ndarray) -> dict[str, Path]:
    csv_path = run_dir / f"confusion_matrix_{split}.csv"
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["true \\ predicted", *classes])
    for name, row in zip(classes, matrix):
        writer.writerow([name, *map(int, row)])
    artifact.atomic_write_text(csv_path, buffer.getvalue())
    png_path = run_dir / f"confusion_matrix_{split}.png"
    plot_confusion(matrix, classes, png_path, f"Confusion matrix ({split})")
    return {"csv": csv_path, "png": png_path}


def plot_confusion(matrix: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    size = min(4 + 0.45 * len(classes), 30)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(matrix, display_labels=classes).plot(
        ax=ax, cmap="Blues", colorbar=False, xticks_rotation="vertical", include_values=len(classes) <= 30)
    ax.set_title(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    artifact.atomic_write_bytes(path, buffer.getvalue())
