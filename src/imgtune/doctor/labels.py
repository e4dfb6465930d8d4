"""Likely label errors by confident learning (Northcutt et al., the ``cleanlab`` library).

Each image gets out-of-fold class probabilities from a linear probe (logistic regression on the
features of a frozen pretrained backbone, ``folds``-fold stratified cross-validation, so no image is
judged by a model that saw its label); ``cleanlab.filter.find_label_issues`` flags the images whose
given label disagrees with what the other images imply, ranked most suspicious first. The features
come from the same cache as ``imgtune train --strategy linear-probe``: a later training run with the
same backbone does not compute them again.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np

from .. import features, models
from ..cache import default_cache_dir
from ..config import ModelConfig
from ..data.scan import Sample
from ..inference import select_device
from ..errors import ImgtuneError

log = logging.getLogger(__name__)


def find_label_errors(samples: list[Sample], classes: list[str], settings, seed: int) -> tuple[dict, list]:
    """Returns (what was done, findings ranked most suspicious first)."""
    from . import Finding

    counts = Counter(s.label for s in samples)
    usable = [c for c in classes if counts[c] >= 2]
    if len(usable) < 2:
        return {"skipped": "fewer than two classes with at least two readable images"}, []
    members = [s for s in samples if s.label in usable]
    try:
        probs, targets, rows, model_name = _out_of_fold(members, usable, settings, seed)
    except ImgtuneError as exc:
        log.warning("label-error check skipped: %s", exc)
        return {"skipped": str(exc)}, [Finding("label-error", "info", f"label-error check skipped: {exc}", [])]
    from cleanlab.filter import find_label_issues

    ranked = find_label_issues(targets, probs, return_indices_ranked_by="self_confidence")
    findings = [_finding(rank, members[rows[i]], usable, probs[i], targets[i]) for rank, i in enumerate(ranked, 1)]
    info = {"model": model_name, "folds": _folds(members, settings.folds), "images": int(len(targets)),
            "out_of_fold_accuracy": float((probs.argmax(1) == targets).mean()), "flagged": len(findings),
            "method": "linear probe on frozen features, out-of-fold; cleanlab.filter.find_label_issues, "
                      "ranked by self-confidence"}
    return info, findings


def _folds(samples: list[Sample], wanted: int) -> int:
    return max(2, min(wanted, min(Counter(s.label for s in samples).values())))


def _out_of_fold(samples: list[Sample], classes: list[str], settings, seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    built = models.create(ModelConfig(name=settings.model, img_size=settings.img_size), len(classes),
                          offline=settings.offline)
    if built.weights is None:
        raise ImgtuneError(f"{settings.model} has no pretrained weights; the label check needs them")
    cache_dir = Path(settings.cache_dir) if settings.cache_dir else default_cache_dir()
    store = features.store_for(built, "penultimate", cache_dir)
    found = features.extract(built, samples, classes, store, select_device(settings.device), settings.batch_size,
                             0, description="features for the label check")
    x, y = found.features.numpy(), found.targets.numpy()
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    cv = StratifiedKFold(_folds(samples, settings.folds), shuffle=True, random_state=seed)
    probs = cross_val_predict(probe, x, y, cv=cv, method="predict_proba")
    return probs, y, found.positions.numpy(), built.spec.name


def _finding(rank: int, sample: Sample, classes: list[str], probs: np.ndarray, given: int):
    from . import Finding

    suggested = int(probs.argmax())
    return Finding("label-error", "warning",
                   f"{sample.path}: labelled {classes[given]!r}, looks like {classes[suggested]!r} "
                   f"(p={probs[suggested]:.2f}; p of its label {probs[given]:.2f})", [str(sample.path)],
                   {"rank": rank, "given": classes[given], "suggested": classes[suggested],
                    "p_given": float(probs[given]), "p_suggested": float(probs[suggested]), "split": sample.split})
