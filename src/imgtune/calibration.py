"""Calibration: how far the predicted confidence is from the accuracy, and one temperature to fix it.

Pure functions of probabilities (or logits) and labels, in numpy, like :mod:`imgtune.metrics`.

*Expected calibration error* (ECE) on the top label: each image's confidence is its largest
probability and it counts as correct when that class is the true one. The confidences are put into
``n_bins`` (15) equal-width bins; a bin holds the confidences in ``(lo, hi]``, and the first bin
also holds 0, so every confidence in [0, 1] has exactly one bin (the edges are
``np.linspace(0, 1, n_bins + 1)``, so a confidence equal to a float edge goes to the bin below it).
ECE = Σ_b |B_b| / n · |accuracy_b − confidence_b| over the non-empty bins.

*Temperature scaling* (Guo et al., 2017): probabilities softmax(z / T) with one T > 0 fitted by
minimising the negative log-likelihood on validation logits z. It changes no prediction (argmax
is unchanged), only how confident they are: T > 1 softens an over-confident model. imgtune keeps
probabilities, not logits; ``log(p)`` differs from the logits by a constant per image, to which
softmax is blind, so the logits are recovered from probabilities (clipped at 1e-12).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp, softmax

from .metrics import log_loss

N_BINS = 15
EPSILON = 1e-12
# Temperatures searched (on log T, bounded Brent): wide enough for any sane model, and a bound keeps a
# split that is 100% correct (whose likelihood keeps rising as T -> 0) from running off to zero.
T_BOUNDS = (0.01, 100.0)


def logits_from_probs(probs: np.ndarray) -> np.ndarray:
    """Logits up to a per-row constant (all softmax cares about): log of the probabilities, clipped."""
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), EPSILON, 1.0))


def scale(logits: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T)."""
    return softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)


def nll(logits: np.ndarray, y_true: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of softmax(logits / T)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    return float(np.mean(logsumexp(z, axis=1) - z[np.arange(len(z)), np.asarray(y_true)]))


def fit_temperature(logits: np.ndarray, y_true: np.ndarray) -> float:
    """The T in ``T_BOUNDS`` minimising the NLL of softmax(logits / T). Deterministic: a bounded scalar
    search on log T (the NLL is convex in 1/T, hence has a single minimum along log T)."""
    logits, y_true = np.asarray(logits, dtype=np.float64), np.asarray(y_true)
    if not len(y_true):
        raise ValueError("fit_temperature needs at least one labelled image")
    low, high = np.log(T_BOUNDS[0]), np.log(T_BOUNDS[1])
    found = minimize_scalar(lambda log_t: nll(logits, y_true, float(np.exp(log_t))), bounds=(low, high),
                            method="bounded", options={"xatol": 1e-6})
    return float(np.exp(found.x))


def at_bound(temperature: float) -> bool:
    """T stopped at an end of ``T_BOUNDS``: typically a validation split the model gets 100% right
    (the likelihood keeps rising as T shrinks), where the fitted T says little."""
    return bool(min(abs(np.log(temperature / bound)) for bound in T_BOUNDS) < 1e-3)


@dataclass
class Reliability:
    """Per-bin figures for a reliability diagram; ``confidence`` and ``accuracy`` are NaN in empty bins."""

    edges: np.ndarray
    count: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray

    @property
    def n(self) -> int:
        return int(self.count.sum())

    @property
    def ece(self) -> float:
        if not self.n:
            return float("nan")
        full = self.count > 0
        gaps = np.abs(self.accuracy[full] - self.confidence[full])
        return float(np.sum(self.count[full] / self.n * gaps))

    def to_dict(self) -> dict:
        """JSON-ready (None for the empty bins' means)."""
        def plain(values: np.ndarray) -> list:
            return [None if np.isnan(v) else float(v) for v in values]
        return {"edges": [float(e) for e in self.edges], "count": [int(c) for c in self.count],
                "confidence": plain(self.confidence), "accuracy": plain(self.accuracy)}


def bin_index(confidence: np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
    """Bin of each confidence: ``(lo, hi]``, with 0 in the first bin."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)


def reliability(probs: np.ndarray, y_true: np.ndarray, n_bins: int = N_BINS) -> Reliability:
    """Count, mean confidence and accuracy of the top label in each of ``n_bins`` equal-width bins."""
    probs, y_true = np.asarray(probs, dtype=np.float64), np.asarray(y_true)
    confidence = probs.max(axis=1) if len(probs) else np.zeros(0)
    correct = (probs.argmax(axis=1) == y_true).astype(np.float64) if len(probs) else np.zeros(0)
    bins = bin_index(confidence, n_bins)
    count = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(bins, weights=confidence, minlength=n_bins) / count
        accuracy = np.bincount(bins, weights=correct, minlength=n_bins) / count
    return Reliability(np.linspace(0.0, 1.0, n_bins + 1), count, mean_conf, accuracy)


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, n_bins: int = N_BINS) -> float:
    return reliability(probs, y_true, n_bins).ece


def stratified_halves(y_true: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint halves of the indices, each class split as evenly as it can be (seeded)."""
    rng = np.random.default_rng(seed)
    y_true = np.asarray(y_true)
    order = np.concatenate([rng.permutation(np.flatnonzero(y_true == c)) for c in np.unique(y_true)]) \
        if len(y_true) else np.zeros(0, dtype=int)
    # alternating along the classes laid end to end: each class differs by at most one image between
    # the halves, and the halves by at most one image in all
    fold = np.arange(len(order)) % 2
    return np.sort(order[fold == 0]), np.sort(order[fold == 1])


def cross_fit(logits: np.ndarray, y_true: np.ndarray, seed: int = 0, fit=fit_temperature
              ) -> tuple[np.ndarray, list[float], list[np.ndarray]]:
    """2-fold cross-fitting: T fitted on one half scales the other half, and vice versa, so no image is
    scaled by a temperature fitted on it. Returns the calibrated probabilities of every image (in
    input order), the two temperatures and the two halves (T[i] was fitted on halves[i])."""
    logits, y_true = np.asarray(logits, dtype=np.float64), np.asarray(y_true)
    halves = stratified_halves(y_true, seed)
    if any(len(h) == 0 for h in halves):
        raise ValueError("cross-fitting needs at least two images")
    calibrated = np.empty_like(logits)
    temperatures = []
    for fitted, other in (halves, halves[::-1]):
        temperature = fit(logits[fitted], y_true[fitted])
        calibrated[other] = scale(logits[other], temperature)
        temperatures.append(float(temperature))
    return calibrated, temperatures, list(halves)


def assess(val_probs: np.ndarray, val_y: np.ndarray, test_probs: np.ndarray | None = None,
           test_y: np.ndarray | None = None, seed: int = 0, n_bins: int = N_BINS) -> dict | None:
    """Fit T on the validation predictions; measure ECE and NLL before and after scaling on the test
    split when there is one, else by 2-fold cross-fitting on val (never on the images T was fitted
    on). None when val has no images."""
    val_logits = logits_from_probs(val_probs)
    if not len(val_y):
        return None
    temperature = fit_temperature(val_logits, val_y)
    result = {"temperature": temperature, "at_bound": at_bound(temperature), "fitted_on": "val",
              "n_fit": int(len(val_y)), "n_bins": n_bins,
              "binning": "equal-width bins (lo, hi] of the top-label confidence; 0 in the first"}
    if test_probs is not None and test_y is not None and len(test_y):
        test_logits = logits_from_probs(test_probs)
        before, after, y = scale(test_logits, 1.0), scale(test_logits, temperature), np.asarray(test_y)
        result.update(assessed_on="test", n_assessed=int(len(y)))
    elif len(val_y) >= 2:
        after, temperatures, _ = cross_fit(val_logits, val_y, seed)
        before, y = scale(val_logits, 1.0), np.asarray(val_y)
        result.update(assessed_on="val, 2-fold cross-fitting (T fitted on one half, measured on the other)",
                      n_assessed=int(len(y)), fold_temperatures=temperatures)
    else:
        result.update(assessed_on="none (one validation image: nothing held out to measure on)", n_assessed=0)
        return result
    result.update(ece_before=expected_calibration_error(before, y, n_bins),
                  ece_after=expected_calibration_error(after, y, n_bins),
                  nll_before=log_loss(y, before), nll_after=log_loss(y, after))
    return result

