"""A linear head fitted to convergence on cached features: L2-regularised (multinomial) logistic
regression by L-BFGS (scikit-learn), its strength chosen by stratified cross-validation on the training
split only, then copied into the head's ``nn.Linear``.

Why: a fixed number of SGD epochs is not enough optimisation for a small training set (20 images at
batch 32 are 8 optimizer steps in 8 epochs: 0.70 val accuracy on hymenoptera with 10 images per class)
and more than needed for a large one. A convex problem solved to convergence is right at every size,
and choosing its regularisation by cross-validation (on log loss: a proper scoring rule, smoother than
accuracy on small folds, so fewer ties, and better-calibrated probabilities; the strongest within one
standard error of the best, :func:`choose_c`) is what a probe in the literature does
(Kornblith et al., 2019). Features are standardised for the fit (the scaling is folded back into the
weights, so the head takes the raw features as before).
"""

from __future__ import annotations

import logging
import time
import warnings

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

CS = np.logspace(-3, 1, 9)  # inverse regularisation strengths tried (on standardised features)
MAX_FOLDS = 5
SELECT_ON = 4000  # above this many images, C is chosen on a stratified sample of this size, then refitted on all
MAX_ITER = 1000
FOLD_THREADS: int | None = None  # threads for choose_c's folds; None: torch.get_num_threads() (bench/spinning.py: 1)


def linear_layer(head: nn.Module) -> nn.Linear | None:
    """The head's only ``nn.Linear`` when it is a linear head (optionally after dropout), else None."""
    layers = [m for m in head.modules() if not isinstance(m, (nn.Sequential, nn.Dropout))]
    return layers[0] if len(layers) == 1 and isinstance(layers[0], nn.Linear) else None


def fitted_by_lbfgs(head_fit: str, last: bool) -> bool:
    """``--head-fit``: lbfgs, or auto where the frozen phase is the last (linear-probe); before fine-tuning
    (gradual) auto keeps SGD, where a fitted head was not measured to help."""
    return (head_fit if head_fit != "auto" else ("lbfgs" if last else "sgd")) == "lbfgs"


def sklearn_class_weight(balance: str | None, weights: torch.Tensor | None) -> dict[int, float] | str | None:
    """``--balance`` as scikit-learn's ``class_weight``: sampler -> balanced, weights -> the loss's weights."""
    if balance == "sampler":
        return "balanced"
    return {i: float(w) for i, w in enumerate(weights.cpu())} if weights is not None else None


def fit_linear_head(layer: nn.Linear, features: torch.Tensor, targets: torch.Tensor, num_classes: int,
                    class_weight: dict[int, float] | str | None, seed: int,
                    sample_weight: torch.Tensor | None = None) -> dict:
    """Fit ``layer`` (``features`` -> logits) in place; returns what was chosen, for the log and the run.
    ``sample_weight``: per image (pseudo-labelled images count less than labelled ones: imgtune.semi)."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    start = time.perf_counter()
    x, y = features.double().numpy(), targets.numpy()
    keep = y >= 0
    x, y = x[keep], y[keep]
    w = sample_weight.double().numpy()[keep] if sample_weight is not None else None
    mean = np.average(x, axis=0, weights=w)  # weighted, so that a weight of 2 standardises as the row twice
    scale = np.sqrt(np.average((x - mean) ** 2, axis=0, weights=w))
    scale[scale < 1e-12] = 1.0
    z = (x - mean) / scale
    present = np.unique(y)
    threads = fold_threads()  # before the limit below, which also sets torch's own count to 1
    with warnings.catch_warnings(), threadpool_limits(1):  # one BLAS thread: the problem is small
        warnings.simplefilter("ignore")  # ConvergenceWarning (n_iter says it) and API FutureWarnings
        c, folds, losses = choose_c(z, y, class_weight, seed, w, threads)
        model = LogisticRegression(C=c, max_iter=MAX_ITER, class_weight=class_weight).fit(z, y, sample_weight=w)
    weight, bias = _logits_of(model, present, num_classes)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight / scale).to(layer.weight))
        layer.bias.copy_(torch.from_numpy(bias - (weight / scale) @ mean).to(layer.bias))
    iterations = int(np.max(model.n_iter_))
    return {"method": "lbfgs", "C": float(c), "folds": folds, "cv_log_loss": losses, "iterations": iterations,
            "converged": iterations < MAX_ITER, "images": int(len(y)), "seconds": round(time.perf_counter() - start, 2)}


def fold_threads() -> int:
    """Threads for :func:`choose_c`'s folds: :data:`FOLD_THREADS`, else what torch would use."""
    return FOLD_THREADS or max(1, torch.get_num_threads())


def choose_c(z: np.ndarray, y: np.ndarray, class_weight, seed: int,
             sample_weight: np.ndarray | None = None, threads: int | None = None) -> tuple[float, int, dict | None]:
    """The strongest regularisation (smallest C) whose mean cross-validated log loss is within one
    standard error of the best C's (the one-standard-error rule: Hastie, Tibshirani and Friedman, The
    Elements of Statistical Learning, section 7.10), over stratified folds of the training split (as
    many as the smallest class allows, at most 5), the path of Cs warm-started in each fold
    (``LogisticRegressionCV``). Differences within the folds' noise then do not pick a weaker
    regularisation: on hymenoptera the best mean picked C 0.316 with every seed (0.954 on val), the rule
    0.03 to 0.1 (0.961); elsewhere level on average, within two val images (docs/benchmarks.md, bench/c_choice.py).
    The folds run in ``threads`` threads (default :func:`fold_threads`), one BLAS thread each: the same
    figures as one after another (MNIST's probe: 6.18 s down to 3.83 s on 2 cores, bench/spinning.py)."""
    from joblib import parallel_backend
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold, train_test_split

    smallest = int(np.bincount(y)[np.unique(y)].min())
    folds = min(MAX_FOLDS, smallest)
    if folds < 2:
        log.info("head fit: a class has one training image, so no cross-validation: C = 1")
        return 1.0, 0, None
    w = np.ones(len(y)) if sample_weight is None else sample_weight
    if len(y) > SELECT_ON:
        z, _, y, _, w, _ = train_test_split(z, y, w, train_size=SELECT_ON, stratify=y, random_state=seed)
    search = LogisticRegressionCV(Cs=CS, cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
                                  max_iter=MAX_ITER, class_weight=class_weight, refit=False, scoring="neg_log_loss")
    with parallel_backend("threading", n_jobs=min(folds, threads or fold_threads())):
        search.fit(z, y, sample_weight=None if sample_weight is None else w)  # the folds in threads
    scores = search.scores_
    scores = np.asarray(next(iter(scores.values())) if isinstance(scores, dict) else scores).reshape(folds, -1)
    mean, error = scores.mean(axis=0), scores.std(axis=0, ddof=1) / np.sqrt(folds)
    top = int(np.argmax(mean))
    chosen = int(np.flatnonzero(mean >= mean[top] - error[top] - 1e-9)[0])  # CS ascend: the strongest
    return float(CS[chosen]), folds, {f"{c:g}": round(float(-m), 4) for c, m in zip(CS, mean)}


def _logits_of(model, present: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's coefficients as a ``num_classes``-row linear layer: a binary model's one row
    ``w`` becomes ``(-w/2, w/2)`` (the same softmax); a class absent from the training split gets
    logits far below the others."""
    coef, intercept = model.coef_, model.intercept_
    if len(present) == 2:
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.concatenate([-intercept / 2, intercept / 2])
    weight = np.zeros((num_classes, coef.shape[1]))
    bias = np.full(num_classes, -50.0)
    weight[present], bias[present] = coef, intercept
    return weight, bias
