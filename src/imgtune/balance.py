"""Class imbalance: measuring it, choosing a treatment, and the two treatments.

``weights``: the loss of each class is weighted by ``n / (k * n_c)`` (scikit-learn's "balanced"), so over
an epoch every class carries the same total weight in the loss (PyTorch normalises each batch by the
sum of its weights, so within one batch this holds only on average); ``sampler``: batches are drawn with
replacement, each image with probability proportional to ``1 / n_c``, so every class is seen equally
often. Validation and test metrics are never weighted; balanced accuracy and macro F1 are reported
beside accuracy so that imbalance cannot hide behind it.
"""

from __future__ import annotations

import torch

from .config import IMBALANCE_THRESHOLD
from .data.sampler import EpochSampler, training_sampler


def imbalance_ratio(counts: dict[str, int]) -> float:
    """Images of the largest class over images of the smallest (inf when a class has none)."""
    values = list(counts.values())
    if not values:
        return 1.0
    return max(values) / min(values) if min(values) > 0 else float("inf")


def choose(requested: str | None, counts: dict[str, int]) -> tuple[str, str]:
    """The treatment to use and why: the requested one, else ``weights`` above the threshold."""
    ratio = imbalance_ratio(counts)
    described = f"largest/smallest training class {ratio:.1f}:1"
    if requested is not None:
        return requested, f"{described}; --balance {requested} as requested"
    if ratio > IMBALANCE_THRESHOLD:
        return "weights", (f"{described} is above {IMBALANCE_THRESHOLD:g}:1, so the loss is class-weighted "
                           "(--balance weights); pass --balance none or sampler to choose otherwise")
    return "none", f"{described}; no balancing needed"


def _class_counts(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.bincount(targets[targets >= 0], minlength=num_classes).double()


def class_weights(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``n / (k * n_c)`` per class (0 for a class without images), float32."""
    counts = _class_counts(targets, num_classes)
    present = counts > 0
    weights = torch.zeros(num_classes, dtype=torch.float64)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights.float()


def balanced_sampler(targets: torch.Tensor, num_classes: int, seed: int) -> EpochSampler:
    """Draws ``len(targets)`` items per epoch with replacement, every class equally likely; the draws
    of an epoch depend only on ``seed`` and the epoch, so an interrupted run resumes them exactly."""
    counts = _class_counts(targets, num_classes)
    per_item = torch.where(targets >= 0, 1.0 / counts.clamp(min=1)[targets.clamp(min=0)], 0.0)
    return training_sampler(len(targets), seed, weights=per_item)
