"""``imgtune evaluate``: metrics with confidence intervals, the confusion matrix as CSV and PNG, and
calibration (ECE before and after the run's temperature) with a reliability diagram PNG."""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import artifact, calibration
from .data.scan import SPLITS, Sample, check_files, find_samples, load_splits
from .data.shards import is_shards, load_manifest, read_split
from .errors import DataError, UsageError
from .metrics import bootstrap_ci, classification_report

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
    split: str
    source: str
    report: dict
    skipped: list[tuple[str, str]]
    files: dict[str, Path]
    paths: list[str] = field(default_factory=list)  # the images measured, in the order of the rows below
    inputs: list = field(default_factory=list)  # what opens each (a path, or a file object for shards)
    y_true: np.ndarray | None = None  # class indices
    probs: np.ndarray | None = None  # (images, classes), the model's own (uncalibrated) probabilities


def select_samples(run: artifact.RunInfo, data: str | None, split: str | None) -> tuple[list[Sample], str, list]:
    """Which images to evaluate: the run's own split (val by default) when ``data`` is None; else the
    given data's ``split`` (test if it has one, else val), or all of it when it has no splits."""
    if split is not None and split not in SPLITS:
        raise UsageError(f"--split must be one of {', '.join(SPLITS)}; got {split!r}")
    if data is None and is_shards(run.config.data.source):
        return _from_shards(run.config.data.source, split or "val")
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


def _from_shards(source: str, name: str) -> tuple[list[Sample], str, list]:
    """The split read from the run's shards; each sample's ``path`` is its bytes (a file object), which
    is all the predictor needs; the name of the original file is kept for messages."""
    splits = load_manifest(source)
    samples = [Sample(_NamedBytes(data, path), label, name) for path, label, data in read_split(splits, name)]
    return samples, name, splits.skipped


class _NamedBytes(io.BytesIO):
    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.name = name

    def __str__(self) -> str:
        return self.name


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
    report["calibration"] = split_calibration(run, y_true, probs[ok], own_val=data is None and name == "val")
    files = write_confusion(run.path, name, run.classes, np.array(report["confusion_matrix"]))
    files["reliability"] = write_reliability(run.path, name, report["calibration"])
    artifact.write_json(run.path / f"evaluation_{name}.json", {"split": name, "data": data or run.config.data.source,
                                                                 **report})
    return EvaluationResult(name, data or run.config.data.source, report, skipped + failed, files,
                            [str(samples[i].path) for i in ok], [samples[i].path for i in ok], y_true, probs[ok])


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


def write_reliability(run_dir: Path, split: str, found: dict) -> Path:
    path = run_dir / f"reliability_{split}.png"
    artifact.atomic_write_bytes(path, reliability_png(found["reliability"], found["ece"], f"Reliability ({split})",
                                                      found.get("reliability_calibrated"), found["temperature"]))
    return path


def reliability_png(table: dict, ece: float, title: str, calibrated: dict | None = None,
                    temperature: float | None = None) -> bytes:
    """A reliability diagram as PNG bytes (for files and for HTML reports): accuracy per confidence bin
    as bars against the diagonal of perfect calibration, ECE in the title; with ``calibrated`` (a
    second :meth:`calibration.Reliability.to_dict`), the temperature-scaled accuracies as steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = np.array(table["edges"])
    width = np.diff(edges)

    def values(key: str, source: dict) -> np.ndarray:
        return np.array([np.nan if v is None else v for v in source[key]], dtype=float)

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.bar(edges[:-1], np.nan_to_num(values("accuracy", table)), width=width, align="edge", color="#4c72b0",
           edgecolor="white", label="accuracy (model)")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    heading = f"{title}: ECE {ece:.3f}"
    if calibrated is not None:
        ece_after = calibration.Reliability(edges, np.array(calibrated["count"]), values("confidence", calibrated),
                                            values("accuracy", calibrated)).ece
        ax.stairs(np.nan_to_num(values("accuracy", calibrated)), edges, baseline=None, color="#dd8452", linewidth=2,
                  label=f"accuracy at T = {temperature:.2f}")
        heading += f", {ece_after:.3f} at T = {temperature:.2f}"
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top label)", ylabel="accuracy", title=heading)
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


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
