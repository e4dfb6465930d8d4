"""Metrics as pure functions of labels and predicted probabilities.

Everything derives from the confusion matrix with numpy; ``tests/test_metrics.py`` checks each figure
against scikit-learn's. (Importing scikit-learn costs about a second, which every ``imgtune`` call
would pay; the numbers are the same.)
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts; rows: true class, columns: predicted class."""
    codes = np.asarray(y_true, dtype=np.int64) * num_classes + np.asarray(y_pred, dtype=np.int64)
    return np.bincount(codes, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_scores(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall, F1 and support per class; 0 where undefined (scikit-learn's zero_division=0)."""
    tp = np.diag(matrix).astype(np.float64)
    predicted, support = matrix.sum(axis=0), matrix.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    both = predicted + support
    f1 = np.divide(2 * tp, both, out=np.zeros_like(tp), where=both > 0)
    return precision, recall, f1, support


def top_k_accuracy(y_true: np.ndarray, probs: np.ndarray, k: int) -> float:
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return float((top == np.asarray(y_true)[:, None]).any(axis=1).mean()) if len(top) else float("nan")


def classification_report(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, top-k, balanced accuracy, per-class precision/recall/F1/support, macro and weighted
    averages, and the confusion matrix (rows: true class, columns: predicted)."""
    y_true = np.asarray(y_true)
    matrix = confusion_matrix(y_true, probs.argmax(axis=1), len(classes))
    report = matrix_report(matrix, classes)
    report["loss"] = log_loss(y_true, probs)
    for k in top_k_values(len(classes)):
        report[f"top{k}_accuracy"] = top_k_accuracy(y_true, probs, k)
    report["per_class"] = report.pop("per_class")  # after the summary figures, as before
    report["confusion_matrix"] = report.pop("confusion_matrix")
    return report


def matrix_report(matrix: np.ndarray, classes: list[str]) -> dict:
    """Every figure of :func:`classification_report` that a confusion matrix alone gives (no loss, no
    top-k): what a federation pools from its sites' summed matrices."""
    precision, recall, f1, support = per_class_scores(matrix)
    present = support > 0
    report = {
        "n": int(matrix.sum()),
        "accuracy": float(np.trace(matrix) / max(1, matrix.sum())),
        "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1.mean()),
        "weighted_f1": _weighted(f1, support),
        "weighted_precision": _weighted(precision, support),
        "weighted_recall": _weighted(recall, support),
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
    }
    report["per_class"] = {
        c: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for c, p, r, f, s in zip(classes, precision, recall, f1, support)}
    report["confusion_matrix"] = matrix.tolist()
    return report


def _weighted(values: np.ndarray, support: np.ndarray) -> float:
    return float(np.average(values, weights=support)) if support.sum() else 0.0


def top_k_values(num_classes: int) -> list[int]:
    """The k worth reporting: 3 and 5 where they are below the number of classes."""
    return [k for k in (3, 5) if k < num_classes]


def log_loss(y_true: np.ndarray, probs: np.ndarray) -> float:
    picked = probs[np.arange(len(y_true)), y_true]
    return float(-np.log(np.clip(picked, 1e-12, 1.0)).mean()) if len(y_true) else float("nan")


def quick_metrics(y_true: np.ndarray, probs: np.ndarray, num_classes: int) -> dict:
    """What is tracked every epoch: loss, accuracy, macro F1."""
    y_pred = probs.argmax(axis=1)
    return {"loss": log_loss(y_true, probs),
            "accuracy": float((y_pred == y_true).mean()),
            "macro_f1": float(per_class_scores(confusion_matrix(y_true, y_pred, num_classes))[2].mean())}


def bootstrap_ci(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int, n_boot: int = 1000,
                 level: float = 0.95, seed: int = 0) -> dict:
    """Percentile bootstrap intervals (resampling images with replacement) for accuracy and macro F1, and
    per class (``per_class``: one list per class, in class order) for precision, recall and F1.

    Vectorised over the resamples: one scikit-learn call per resample took seconds even for ten images."""
    rng = np.random.default_rng(seed)
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    acc = np.empty(n_boot)
    scores = np.empty((3, n_boot, num_classes))  # precision, recall, F1
    chunk = max(1, 2**22 // max(1, len(y_true) + num_classes))  # bounds the memory of the index array
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, len(y_true), (min(chunk, n_boot - start), len(y_true)))
        stop = start + len(idx)
        acc[start:stop], scores[0, start:stop], scores[1, start:stop], scores[2, start:stop] = rowwise_scores(
            y_true[idx], y_pred[idx], num_classes)

    def interval(values: np.ndarray) -> list:
        return percentile_interval(values, level)

    return {"level": level, "n_boot": n_boot, "accuracy": interval(acc), "macro_f1": interval(scores[2].mean(axis=1)),
            "per_class": {name: interval(values) for name, values in zip(("precision", "recall", "f1"), scores)}}


def percentile_interval(resampled: np.ndarray, level: float = 0.95) -> list:
    """[low, high] percentiles of bootstrap resamples (axis 0), the central ``level`` of them."""
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(resampled, [tail, 100 - tail], axis=0)
    return np.stack([low, high], axis=-1).tolist()


def bootstrap_mean_ci(values: np.ndarray, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> list:
    """Percentile bootstrap interval of the mean of ``values`` (resampling them with replacement), as
    :func:`bootstrap_ci` does for accuracy; [nan, nan] without values. For a paired difference, pass the
    per-item differences."""
    values = np.asarray(values, dtype=np.float64)
    if not len(values):
        return [float("nan"), float("nan")]
    idx = np.random.default_rng(seed).integers(0, len(values), (n_boot, len(values)))
    return percentile_interval(values[idx].mean(axis=1), level)


def rowwise_scores(t: np.ndarray, p: np.ndarray, num_classes: int) -> tuple[np.ndarray, ...]:
    """Accuracy (rows) and per-class precision, recall and F1 (rows x classes; 0 where undefined, as
    scikit-learn's ``zero_division=0``) of each row of ``t`` (true labels) against ``p`` (predictions)."""
    rows = len(t)
    offset = (np.arange(rows) * num_classes)[:, None]

    def per_class(labels: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
        codes = labels + offset
        codes = codes[keep] if keep is not None else codes.ravel()
        return np.bincount(codes, minlength=rows * num_classes).reshape(rows, num_classes)

    hit = t == p
    tp, true_count, pred_count = per_class(t, hit), per_class(t), per_class(p)

    def ratio(top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
        return np.divide(top, bottom, out=np.zeros(top.shape), where=bottom > 0)

    return (hit.mean(axis=1), ratio(tp, pred_count), ratio(tp, true_count), ratio(2 * tp, true_count + pred_count))
