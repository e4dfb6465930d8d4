"""How well a frozen backbone's features separate the user's classes: the numbers ``imgtune rank`` ranks by.

- :func:`cross_validated_probe`: a logistic-regression probe (scikit-learn) scored by k-fold cross-validation
  on the training images. Its regularisation is chosen *inside* each outer fold (``LogisticRegressionCV``
  on that fold's training part only: nested cross-validation), so the held-out fold never influences the
  model that predicts it and the accuracy is not tuned on its own test images. Accuracy and macro F1 come
  from the out-of-fold predictions of every training image, with percentile-bootstrap intervals
  (``metrics.bootstrap_ci``, as ``imgtune evaluate`` gives them).
- :func:`logme`: the LogME transferability score (You et al., "LogME: Practical Assessment of Pre-trained
  Models for Transfer Learning", ICML 2021; the fixed-point form of "Ranking and Tuning Pre-trained
  Models", arXiv 2110.10545): the log marginal evidence of a Bayesian linear model of the one-hot labels on
  the features, per image, averaged over classes. It has no hyper-parameter, needs one SVD, and in those
  papers tracks fine-tuned accuracy better than kNN-style or LEEP/NCE scores; imgtune reports it beside the
  probe and uses it only to order candidates whose probe figures tie.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from dataclasses import asdict, dataclass

import numpy as np

from .cache import ArrayStore
from .errors import DataError
from .metrics import bootstrap_ci, confusion_matrix, per_class_scores

log = logging.getLogger(__name__)

C_GRID = np.logspace(-4, 0, 5)  # inverse regularisation strengths tried inside each fold (standardised features)
# C is chosen by log loss (smoother than accuracy on small folds, where many C tie on accuracy)
INNER_FOLDS = 3
MAX_ITER = 100
TOLERANCE = 1e-3  # lbfgs stops here: the probe ranks backbones, a fourth decimal of loss does not move a rank


@dataclass
class ProbeResult:
    accuracy: float  # out-of-fold, over every training image
    macro_f1: float
    ci95: dict  # {"accuracy": [low, high], "macro_f1": [low, high]} (bootstrap over images)
    fold_accuracy: list[float]
    folds: int  # the folds used (fewer than asked when a class has fewer images)
    chosen_c: list[float]  # the regularisation each outer fold chose
    val_accuracy: float | None = None  # a probe fitted on all training images, scored on the val split
    val_macro_f1: float | None = None


def cross_validated_probe(features: np.ndarray, targets: np.ndarray, num_classes: int, folds: int, seed: int,
                          val: tuple[np.ndarray, np.ndarray] | None = None) -> ProbeResult:
    """Nested k-fold logistic-regression probe; ``val`` (features, targets): also scored on held-out images."""
    from sklearn.model_selection import StratifiedKFold

    k = _usable_folds(targets, num_classes, folds)
    outer = StratifiedKFold(k, shuffle=True, random_state=seed)
    predicted = np.empty(len(targets), dtype=np.int64)
    fold_accuracy, chosen = [], []
    for train_idx, test_idx in outer.split(features, targets):
        model = _fit(features[train_idx], targets[train_idx], seed)
        predicted[test_idx] = model.predict(features[test_idx])
        fold_accuracy.append(float((predicted[test_idx] == targets[test_idx]).mean()))
        probe = model[-1]  # C_: an array before scikit-learn 1.10, then a float; a fixed-C probe has only C
        chosen.append(float(np.ravel(probe.C_ if hasattr(probe, "C_") else probe.C)[0]))
    accuracy, macro_f1 = _scores(targets, predicted, num_classes)
    ci = bootstrap_ci(targets, predicted, num_classes, seed=seed)
    result = ProbeResult(accuracy, macro_f1, {"accuracy": ci["accuracy"], "macro_f1": ci["macro_f1"]},
                         fold_accuracy, k, chosen)
    if val is not None and len(val[1]):
        model = _fit(features, targets, seed)
        result.val_accuracy, result.val_macro_f1 = _scores(val[1], model.predict(val[0]), num_classes)
    return result


def scored(features: np.ndarray, targets: np.ndarray, num_classes: int, folds: int, seed: int,
           val: tuple[np.ndarray, np.ndarray] | None = None, store: ArrayStore | None = None
           ) -> tuple[ProbeResult, float]:
    """:func:`cross_validated_probe` and :func:`logme`, remembered in ``store`` (``cache.probe_store``) under a
    digest of everything they read. Both are deterministic functions of the features, labels and settings, and
    the nested cross-validation is most of a warm ranking's time: ranking the same data again (``imgtune rank``
    twice, ``train --model auto`` after ``rank``) refits nothing."""
    digest = _digest(features, targets, num_classes, folds, seed, val)
    entry = store.get(digest) if store is not None else None
    if entry is not None:
        try:
            fields = json.loads(entry.tobytes().decode())
            return ProbeResult(**fields["probe"]), float(fields["logme"])
        except (ValueError, TypeError, KeyError):  # a valid entry of another layout: score again
            log.debug("probe cache entry %s unreadable: scoring again", digest)
    result = cross_validated_probe(features, targets, num_classes, folds, seed, val)
    score = logme(features, targets, num_classes)
    if store is not None:
        text = json.dumps({"probe": asdict(result), "logme": score})
        store.put(digest, np.frombuffer(text.encode(), dtype=np.uint8).copy())
    return result, score


def _digest(features: np.ndarray, targets: np.ndarray, num_classes: int, folds: int, seed: int,
            val: tuple[np.ndarray, np.ndarray] | None) -> str:
    """sha256 of the arrays (dtype, shape, bytes) and of every setting the probe and LogME depend on."""
    h = hashlib.sha256(json.dumps({"classes": num_classes, "folds": folds, "seed": seed, "c_grid": C_GRID.tolist(),
                                   "inner": INNER_FOLDS, "max_iter": MAX_ITER, "tol": TOLERANCE}).encode())
    for array in (features, targets, *(val if val is not None else ())):
        array = np.ascontiguousarray(array)
        h.update(f"{array.dtype.str}{array.shape}".encode())
        h.update(array.tobytes())
    return h.hexdigest()


def _usable_folds(targets: np.ndarray, num_classes: int, folds: int) -> int:
    """Stratified folds need every class in every fold: at most the smallest class's size."""
    counts = np.bincount(targets, minlength=num_classes)
    smallest = int(counts.min())
    if smallest < 2:
        raise DataError(f"class index {int(counts.argmin())} has {smallest} training image(s); a cross-validated "
                        "probe needs at least 2 per class (add images, or lower --val-fraction)")
    if smallest < folds:
        log.warning("the smallest class has %d training images: %d-fold cross-validation instead of %d",
                    smallest, smallest, folds)
    return min(folds, smallest)


def _fit(features: np.ndarray, targets: np.ndarray, seed: int):
    """Standardise, then logistic regression with C chosen by an inner stratified k-fold on these images only
    (C = 1 where a class has a single image here, which no inner split can hold out)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    inner = min(INNER_FOLDS, int(np.bincount(targets).min()))
    cv = StratifiedKFold(inner, shuffle=True, random_state=seed) if inner >= 2 else None
    probe = LogisticRegressionCV(Cs=C_GRID, cv=cv, scoring="neg_log_loss", max_iter=MAX_ITER, tol=TOLERANCE,
                                 random_state=seed) \
        if cv is not None else LogisticRegression(C=1.0, max_iter=MAX_ITER, tol=TOLERANCE, random_state=seed)
    model = make_pipeline(StandardScaler(), probe)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # separable features: weights grow until max_iter
        warnings.filterwarnings("ignore", category=FutureWarning, module="sklearn")  # 1.10 default changes: C_ read both ways
        model.fit(features, targets)
    return model


def _scores(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> tuple[float, float]:
    matrix = confusion_matrix(y_true, y_pred, num_classes)
    return float(np.trace(matrix) / max(1, matrix.sum())), float(per_class_scores(matrix)[2].mean())


def logme(features: np.ndarray, targets: np.ndarray, num_classes: int, iterations: int = 11) -> float:
    """LogME of ``features`` (n, d) for ``targets`` (n,), per image, averaged over the one-hot columns.

    Fixed-point updates of the prior precision ``alpha`` and noise precision ``beta`` for every class at
    once, in the basis of the features' singular vectors (arXiv 2110.10545, Algorithm 2)."""
    f = np.asarray(features, dtype=np.float64)
    n, d = f.shape
    y = np.eye(num_classes)[targets]  # (n, classes)
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    keep = s > 1e-10 * max(1.0, float(s.max(initial=0.0)))
    u, sigma = u[:, keep], (s[keep] ** 2)[:, None]  # (n, k), (k, 1)
    x2 = (u.T @ y) ** 2  # (k, classes)
    rest = (y**2).sum(axis=0) - x2.sum(axis=0)  # the labels' energy outside the features' span
    alpha, beta = np.ones(num_classes), np.ones(num_classes)
    for _ in range(iterations):
        t = alpha / beta
        gamma = (sigma / (sigma + t)).sum(axis=0)
        m2 = (sigma * x2 / (t + sigma) ** 2).sum(axis=0)
        res2 = (x2 / (1 + sigma / t) ** 2).sum(axis=0) + rest
        alpha, beta = gamma / (m2 + 1e-5), (n - gamma) / (res2 + 1e-5)
        if np.all(np.abs(alpha / beta - t) / t <= 1e-3):
            break
    evidence = (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - 0.5 * np.log(alpha + beta * sigma).sum(axis=0)
                - beta / 2 * res2 - alpha / 2 * m2 - n / 2 * np.log(2 * np.pi)) / n
    return float(evidence.mean())
