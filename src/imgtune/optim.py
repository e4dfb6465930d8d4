"""Optimisers and learning-rate schedules: parameter groups (head and body learning rates, no weight
decay on biases and norms), the optimiser named in the config, warm-up then cosine decay."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .config import TrainConfig
from .models import Classifier
from .strategies import Phase


def make_optimizer(model: Classifier, phase: Phase, train: TrainConfig) -> torch.optim.Optimizer:
    """Head and body get their own learning rates; biases and norm weights get no weight decay."""
    groups = []
    parts = [(model.head, phase.head_lr)] + ([] if phase.body_frozen else [(model.body, phase.body_lr)])
    for module, lr in parts:
        params = [p for p in module.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        groups += [{"params": decay, "lr": lr, "weight_decay": train.weight_decay},
                   {"params": no_decay, "lr": lr, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    optimizers = {  # one per name in config.OPTIMIZERS
        "adamw": lambda: torch.optim.AdamW(groups),
        "adam": lambda: torch.optim.Adam(groups),  # classic Adam: weight decay added to the gradient (L2)
        "sgd": lambda: torch.optim.SGD(groups, momentum=train.momentum, nesterov=train.momentum > 0),
        # smoothing 0.9 as in Keras, TensorFlow and timm (PyTorch's default: 0.99); momentum is --momentum
        # (Keras' default is 0, which --preset dlwp-vgg16 sets)
        "rmsprop": lambda: torch.optim.RMSprop(groups, alpha=0.9, momentum=train.momentum),
    }
    return optimizers[train.optimizer]()


def warmup_cosine(total_steps: int, warmup_steps: int, floor: float = 0.01) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up to 1, then cosine decay to ``floor``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def warmup_cosine_from(total_steps: int, warmup_steps: int, start: int) -> Callable[[int], float]:
    """:func:`warmup_cosine` entered at step ``start``: a training that is one slice of a longer schedule
    (a federated site's round, whose lr follows one schedule over the whole federation)."""
    factor = warmup_cosine(total_steps, warmup_steps)
    return factor if not start else (lambda step: factor(step + start))


def optimizer_steps(batches: int, accumulate: int = 1) -> int:
    """Optimizer steps in an epoch of ``batches`` batches, stepping every ``accumulate`` batches (and
    after the last)."""
    return max(1, -(-batches // max(1, accumulate)))
