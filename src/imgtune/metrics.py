"""Metrics as pure functions of labels and predicted probabilities (scikit-learn underneath)."""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm


def classification_report(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, top-k, balanced accuracy, per-class precision/recall/F1/support, macro and weighted
    averages, and the confusion matrix (rows: true class, columns: predicted)."""
    y_true = np.asarray(y_true)
    labels = np.arange(len(classes))
    y_pred = probs.argmax(axis=1)
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0)
    report = {
        "n": int(len(y_true)),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1.mean()),
        "weighted_f1": float(np.average(f1, weights=support)) if support.sum() else 0.0,
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "loss": log_loss(y_true, probs),
    }
    for k in top_k_values(len(classes)):
        report[f"top{k}_accuracy"] = float(skm.top_k_accuracy_score(y_true, probs, k=k, labels=labels))
    report["per_class"] = {
        c: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for c, p, r, f, s in zip(classes, precision, recall, f1, support)}
    report["confusion_matrix"] = skm.confusion_matrix(y_true, y_pred, labels=labels).tolist()
    return report


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
            "macro_f1": float(skm.f1_score(y_true, y_pred, labels=np.arange(num_classes), average="macro",
                                           zero_division=0))}


def bootstrap_ci(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int, n_boot: int = 1000,
                 level: float = 0.95, seed: int = 0) -> dict:
    """Percentile bootstrap intervals for accuracy and macro F1 (resampling images with replacement)."""
    rng = np.random.default_rng(seed)
    n = len(y_true)
    labels = np.arange(num_classes)
    acc, f1 = np.empty(n_boot), np.empty(n_boot)
    for b in range(n_boot):
        idx = rng.integers(0, n, n)
        t, p = y_true[idx], y_pred[idx]
        acc[b] = (t == p).mean()
        f1[b] = skm.f1_score(t, p, labels=labels, average="macro", zero_division=0)
    tail = (1 - level) / 2 * 100
    return {"level": level, "n_boot": n_boot,
            "accuracy": [float(np.percentile(acc, tail)), float(np.percentile(acc, 100 - tail))],
            "macro_f1": [float(np.percentile(f1, tail)), float(np.percentile(f1, 100 - tail))]}
