"""Pseudo-labels for unlabelled images, chosen so that they never make the model worse on held-out
labelled images (``imgtune train DATA --unlabeled DIR --semi ...``). Pure functions over feature arrays;
:mod:`imgtune.semi_train` feeds them the frozen body's cached features and adds the pseudo-labelled
images to training.

- ``label-spreading`` (graph-based, Zhou et al. 2004): a k-nearest-neighbour graph over the
  L2-normalised features of labelled and unlabelled images (scikit-learn's ``LabelSpreading``); each
  unlabelled image gets the class that spreads to it and a confidence (its share of the spread mass).
- ``self-training``: the linear head fitted on the labelled images labels the unlabelled ones it is
  sure of, is fitted again on both, and so on, round after round.

What is kept is decided on the labelled **training** images only (val and test stay honest): stratified
folds (repeated), each hiding some labelled images, which are pseudo-labelled like the unlabelled
ones. For every confidence threshold (and, for self-training, every round) the head the run would fit
(L2 logistic regression, pseudo-labels weighted below real ones) is scored on the hidden images
against the head fitted on the labelled images alone. The best setting (accuracy, then log loss on a
tie) is used only if its accuracy is higher than labelled-only's: a lower log loss alone is not enough
(pseudo-labels make the head surer of itself whether or not they are right); otherwise no pseudo-label
is used, and the report says so. Pseudo-labels weigh ``weight`` each, and together never more than the
labelled images (``min(weight, labelled / pseudo-labelled)`` each): they refine the labelled images'
head rather than replace it. The hidden images also give each class's pseudo-labels an estimated precision.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

METHODS = ("label-spreading", "self-training", "none")
THRESHOLDS = (0.95, 0.9, 0.8, 0.6)  # confidences a pseudo-label must reach, tried on the inner hold-out
MAX_ROUNDS = 4  # self-training: at most this many rounds (fewer when the hold-out stops improving)
NEIGHBOURS = 10  # of the kNN graph
ALPHA = 0.2  # LabelSpreading's clamping: how far a labelled image's label may move
MAX_FOLDS = 5
REPEATS = 2  # folds drawn twice below SMALL labelled images: a small hold-out is noisy
SMALL = 60
MAX_ITER = 500
NOT_ASKED = "--semi none: the unlabelled images are not used"


@dataclass
class Score:
    """Held-out figures of one setting, summed over folds and repeats."""

    correct: int = 0
    seen: int = 0
    log_loss: float = 0.0

    def add(self, probs: np.ndarray, truth: np.ndarray) -> None:
        self.correct += int((probs.argmax(1) == truth).sum())
        self.seen += len(truth)
        self.log_loss += float(-np.log(np.clip(probs[np.arange(len(truth)), truth], 1e-12, None)).sum())

    def key(self) -> tuple[float, float]:
        """Higher is better: accuracy first, then (negative) log loss."""
        return (round(self.accuracy, 9), -self.mean_log_loss)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.seen, 1)

    @property
    def mean_log_loss(self) -> float:
        return self.log_loss / max(self.seen, 1)

    def to_dict(self) -> dict:
        return {"accuracy": round(self.accuracy, 4), "log_loss": round(self.mean_log_loss, 4)}


@dataclass
class Precision:
    """Hidden labelled images that would have been pseudo-labelled: how many were right, per class."""

    right: np.ndarray
    taken: np.ndarray

    def add(self, predicted: np.ndarray, truth: np.ndarray, keep: np.ndarray) -> None:
        np.add.at(self.taken, predicted[keep], 1)
        np.add.at(self.right, predicted[keep], (predicted[keep] == truth[keep]).astype(int))


@dataclass
class Setting:
    threshold: float
    rounds: int = 0  # self-training only
    score: Score = field(default_factory=Score)
    precision: Precision | None = None


@dataclass
class Choice:
    """The pseudo-labels to train on (``labels`` -1 where none) and why."""

    method: str  # what is used: label-spreading, self-training, or none
    labels: np.ndarray
    confidence: np.ndarray
    reason: str
    threshold: float | None = None
    rounds: int | None = None
    holdout: dict | None = None  # the inner hold-out's figures
    precision: Precision | None = None

    def counts(self, num_classes: int) -> np.ndarray:
        return np.bincount(self.labels[self.labels >= 0], minlength=num_classes)


def choose(x_lab: np.ndarray, y_lab: np.ndarray, x_unl: np.ndarray, num_classes: int, method: str,
           weight: float, seed: int) -> Choice:
    """Pseudo-labels for ``x_unl`` by ``method``, or none when the inner hold-out says they do not help."""
    if method not in METHODS:
        raise ValueError(f"unknown semi-supervised method {method!r}")
    if method == "none":
        return unused(len(x_unl), NOT_ASKED)
    folds = _folds(y_lab, seed)
    if not folds:
        return unused(len(x_unl), "a class has a single labelled training image: no hold-out to check pseudo-labels "
                      "on, so none are used")
    data = _Data(x_lab, y_lab, x_unl, num_classes, weight, seed)
    baseline = Score()
    for train, held in folds:
        baseline.add(data.fit(train).predict_proba(data.z_lab[held]), y_lab[held])
    tried = _spreading_settings(data, folds) if method == "label-spreading" else _self_training_settings(data, folds)
    best = max(tried, key=lambda s: s.score.key())
    repeats = _repeats(y_lab)
    holdout = {"folds": len(folds) // repeats, "repeats": repeats, "labelled_only": baseline.to_dict(),
               "with_pseudo_labels": best.score.to_dict(), "tried": [_row(s) for s in tried]}
    if best.score.accuracy <= baseline.accuracy:
        return unused(len(x_unl), f"pseudo-labels by {method} did not raise the accuracy of the labelled images alone "
                      f"on the inner hold-out (accuracy {best.score.accuracy:.3f} against {baseline.accuracy:.3f}, log loss "
                      f"{best.score.mean_log_loss:.3f} against {baseline.mean_log_loss:.3f}), so none are used", holdout)
    labels, confidence = data.final(method, best)
    return Choice(method, labels, confidence, f"{method} beat the labelled images alone on the inner hold-out "
                  f"(accuracy {best.score.accuracy:.3f} against {baseline.accuracy:.3f}, log loss "
                  f"{best.score.mean_log_loss:.3f} against {baseline.mean_log_loss:.3f})", best.threshold,
                  best.rounds if method == "self-training" else None, holdout, best.precision)


def pseudo_weight(weight: float, labelled: int, pseudo: int) -> float:
    """Each pseudo-label's weight: ``weight``, lowered so that together they weigh no more than the labelled."""
    return min(weight, labelled / max(pseudo, 1))


def unused(n: int, reason: str, holdout: dict | None = None) -> Choice:
    """No pseudo-label for any of ``n`` unlabelled images, and why."""
    return Choice("none", np.full(n, -1), np.zeros(n), reason, holdout=holdout)


def _row(setting: Setting) -> dict:
    return {"threshold": setting.threshold, **({"rounds": setting.rounds} if setting.rounds else {}),
            **setting.score.to_dict()}


def _folds(y: np.ndarray, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import RepeatedStratifiedKFold

    counts = np.bincount(y)
    smallest = int(counts[counts > 0].min())
    if smallest < 2:
        return []
    splitter = RepeatedStratifiedKFold(n_splits=min(MAX_FOLDS, smallest), n_repeats=_repeats(y), random_state=seed)
    return list(splitter.split(np.zeros(len(y)), y))


def _repeats(y: np.ndarray) -> int:
    return REPEATS if len(y) < SMALL else 1


class _Data:
    """The features twice: standardised for the head (statistics of all images, labelled or not: no
    label is used) and L2-normalised for the graph (cosine neighbours)."""

    def __init__(self, x_lab, y_lab, x_unl, num_classes: int, weight: float, seed: int):
        from .head_fit import choose_c

        everything = np.vstack([x_lab, x_unl]).astype(np.float64)
        mean, scale = everything.mean(axis=0), everything.std(axis=0)
        scale[scale < 1e-12] = 1.0
        self.z_lab, self.z_unl = (x_lab - mean) / scale, (x_unl - mean) / scale
        self.g_lab, self.g_unl = _unit(x_lab), _unit(x_unl)
        self.y_lab, self.num_classes, self.weight, self.seed = y_lab, num_classes, weight, seed
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scikit-learn's API FutureWarnings
            self.c = choose_c(self.z_lab, y_lab, None, seed)[0]  # the head's strength on the labelled images

    def fit(self, train: np.ndarray, pseudo: np.ndarray | None = None, z_extra: np.ndarray | None = None,
            start: _AllClasses | None = None) -> _AllClasses:
        """The run's head on labelled ``train`` (+ ``z_extra`` labelled ``pseudo``, weighted ``weight``),
        warm-started from ``start``'s weights when given."""
        from sklearn.linear_model import LogisticRegression
        from threadpoolctl import threadpool_limits

        z, y, w = self.z_lab[train], self.y_lab[train], np.ones(len(train))
        if pseudo is not None and len(pseudo):
            z, y = np.vstack([z, z_extra]), np.concatenate([y, pseudo])
            w = np.concatenate([w, np.full(len(pseudo), pseudo_weight(self.weight, len(train), len(pseudo)))])
        with warnings.catch_warnings(), threadpool_limits(1):
            warnings.simplefilter("ignore")
            model = LogisticRegression(C=self.c, max_iter=MAX_ITER, warm_start=start is not None)
            if start is not None and np.array_equal(start.model.classes_, np.unique(y)):
                model.coef_, model.intercept_ = start.model.coef_.copy(), start.model.intercept_.copy()
            model.fit(z, y, sample_weight=w)
        return _AllClasses(model, self.num_classes)

    def spread(self, train: np.ndarray, others: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Label spreading from labelled ``train`` to ``others`` (rows of g): (class, confidence) of each."""
        from sklearn.semi_supervised import LabelSpreading

        g = np.vstack([self.g_lab[train], others])
        y = np.concatenate([self.y_lab[train], np.full(len(others), -1)])
        k = max(1, min(NEIGHBOURS, len(g) - 1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rows no label reaches: 0/0, set to no confidence below
            found = LabelSpreading(kernel="knn", n_neighbors=k, alpha=ALPHA, max_iter=100).fit(g, y)
        dist = np.nan_to_num(found.label_distributions_[len(train):])
        classes = found.classes_
        return classes[dist.argmax(1)], dist.max(1)

    def final(self, method: str, best: Setting) -> tuple[np.ndarray, np.ndarray]:
        """The chosen setting on every labelled image: the pseudo-labels that train the run."""
        everyone = np.arange(len(self.y_lab))
        if method == "label-spreading":
            labels, confidence = self.spread(everyone, self.g_unl)
        else:  # the pseudo-labels of round ``rounds``: given by the head of the round before
            head = self.fit(everyone)
            for _ in range(best.rounds - 1):
                probs = head.predict_proba(self.z_unl)
                keep = probs.max(1) >= best.threshold
                head = self.fit(everyone, probs.argmax(1)[keep], self.z_unl[keep], head)
            probs = head.predict_proba(self.z_unl)
            labels, confidence = probs.argmax(1), probs.max(1)
        return np.where(confidence >= best.threshold, labels, -1), confidence


class _AllClasses:
    """A fitted scikit-learn model's probabilities as columns of every class (one missing from a fold: 0)."""

    def __init__(self, model, num_classes: int):
        self.model, self.num_classes = model, num_classes

    def predict_proba(self, z: np.ndarray) -> np.ndarray:
        out = np.zeros((len(z), self.num_classes))
        out[:, self.model.classes_] = self.model.predict_proba(z)
        return out


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)


def _spreading_settings(data: _Data, folds) -> list[Setting]:
    """Every threshold, scored on every fold: the hidden labelled images are spread to along with the
    unlabelled ones (so they also measure the pseudo-labels' precision)."""
    settings = [Setting(t, precision=_empty(data.num_classes)) for t in THRESHOLDS]
    for train, held in folds:
        labels, confidence = data.spread(train, np.vstack([data.g_lab[held], data.g_unl]))
        held_labels, held_conf = labels[:len(held)], confidence[:len(held)]
        unl_labels, unl_conf = labels[len(held):], confidence[len(held):]
        for setting in settings:
            keep = unl_conf >= setting.threshold
            model = data.fit(train, unl_labels[keep], data.z_unl[keep])
            setting.score.add(model.predict_proba(data.z_lab[held]), data.y_lab[held])
            setting.precision.add(held_labels, data.y_lab[held], held_conf >= setting.threshold)
    return settings


def _self_training_settings(data: _Data, folds) -> list[Setting]:
    """For each threshold, rounds in step on every fold, stopping when the hold-out stops improving
    (each fold's head warm-started from its previous round's)."""
    chosen = []
    for t in THRESHOLDS:
        heads = [data.fit(train) for train, _ in folds]  # round 0: labelled images only
        kept = None
        for r in range(1, MAX_ROUNDS + 1):
            setting = Setting(t, r, precision=_empty(data.num_classes))
            for i, (train, held) in enumerate(folds):
                previous = heads[i].predict_proba(data.z_lab[held])  # the head that labels this round
                setting.precision.add(previous.argmax(1), data.y_lab[held], previous.max(1) >= t)
                probs = heads[i].predict_proba(data.z_unl)
                keep = probs.max(1) >= t
                heads[i] = data.fit(train, probs.argmax(1)[keep], data.z_unl[keep], heads[i])
                setting.score.add(heads[i].predict_proba(data.z_lab[held]), data.y_lab[held])
            if kept is not None and setting.score.key() <= kept.score.key():
                break  # the hold-out stopped improving
            kept = setting
        chosen.append(kept)
    return chosen


def _empty(num_classes: int) -> Precision:
    return Precision(np.zeros(num_classes, dtype=int), np.zeros(num_classes, dtype=int))
