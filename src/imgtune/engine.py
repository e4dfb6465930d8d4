"""How training runs: devices, precision, optimisers, schedules, the epoch loops and early stopping.

*What* is trained (model, data, strategy) is decided by the caller (``training.py``); this module
only runs it.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .config import TrainConfig
from .errors import UsageError
from .metrics import quick_metrics
from .models import Classifier
from .strategies import Phase

log = logging.getLogger(__name__)


def select_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA, then Apple MPS, then CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available; use --device auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("--device mps: Apple MPS is not available; use --device auto or cpu")
    return torch.device(name)


def autocast(device: torch.device):
    """Mixed precision on CUDA (bfloat16 where supported, else float16); full precision elsewhere."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def to_channels_last(images: torch.Tensor) -> torch.Tensor:
    """Convolutions run faster in channels-last layout on CPU (oneDNN) and on recent GPUs."""
    return images.contiguous(memory_format=torch.channels_last) if images.dim() == 4 else images


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
    if train.optimizer == "adamw":
        return torch.optim.AdamW(groups)
    if train.optimizer == "adam":  # classic Adam: weight decay added to the gradient (L2)
        return torch.optim.Adam(groups)
    return torch.optim.SGD(groups, momentum=train.momentum, nesterov=train.momentum > 0)


def warmup_cosine(total_steps: int, warmup_steps: int, floor: float = 0.01) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up to 1, then cosine decay to ``floor``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


@dataclass
class EpochResult:
    epoch: int
    phase: str
    lr: float
    train_loss: float
    train_accuracy: float
    val: dict
    seconds: float

    def row(self) -> dict:
        return {"epoch": self.epoch, "phase": self.phase, "lr": self.lr, "train_loss": self.train_loss,
                "train_accuracy": self.train_accuracy, **{f"val_{k}": v for k, v in self.val.items()},
                "seconds": round(self.seconds, 2)}


def train_one_epoch(model: nn.Module, loader, optimizer, scheduler, loss_fn, device: torch.device,
                    scaler: torch.amp.GradScaler | None, description: str) -> tuple[float, float]:
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(loader, desc=description, unit="batch", leave=False, disable=None)
    for batch in bar:
        if batch is None:
            continue
        images, targets, _ = batch
        images, targets = to_channels_last(images.to(device, non_blocking=True)), targets.to(device, non_blocking=True)
        with autocast(device):
            logits = model(images)
            loss = loss_fn(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        total_loss += loss.item() * len(targets)
        correct += (logits.argmax(1) == targets).sum().item()
        seen += len(targets)
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
    return total_loss / max(seen, 1), correct / max(seen, 1)


@torch.inference_mode()
def predict_probs(model: nn.Module, loader, device: torch.device, description: str = "predicting"):
    """Softmax probabilities, targets and dataset indices for every item the loader yields."""
    model.eval()
    probs, targets, indices = [], [], []
    for batch in tqdm(loader, desc=description, unit="batch", leave=False, disable=None):
        if batch is None:
            continue
        images, target, index = batch
        with autocast(device):
            logits = model(to_channels_last(images.to(device, non_blocking=True)))
        probs.append(torch.softmax(logits.float(), dim=1).cpu())
        targets.append(target)
        indices.append(index)
    if not probs:
        return np.zeros((0, 0)), np.zeros(0, dtype=int), np.zeros(0, dtype=int)
    return torch.cat(probs).numpy(), torch.cat(targets).numpy(), torch.cat(indices).numpy()


@dataclass
class EarlyStopping:
    """Stop after ``patience`` epochs without improvement of ``monitor``; remember the best weights."""

    monitor: str
    patience: int | None
    keep_best: bool
    best_value: float | None = None
    best_epoch: int | None = None
    best_state: dict | None = field(default=None, repr=False)
    stale: int = 0

    def update(self, epoch: int, value: float, model: nn.Module) -> bool:
        """Record this epoch; returns True when training should stop."""
        better = self.best_value is None or (value < self.best_value if self.monitor == "loss"
                                             else value > self.best_value)
        if better:
            self.best_value, self.best_epoch, self.stale = value, epoch, 0
            if self.keep_best:
                self.best_state = copy.deepcopy(model.state_dict())
        else:
            self.stale += 1
        return self.patience is not None and self.stale >= self.patience


@dataclass
class Loaders:
    """Batches for training and validation; ``frozen_*`` (optional) hold cached backbone features,
    used instead of images while the body is frozen."""

    train: object
    val: object
    test: object = None
    frozen_train: object = None
    frozen_val: object = None
    frozen_test: object = None

    def for_phase(self, model: Classifier, phase: Phase) -> tuple[nn.Module, object, object]:
        if phase.body_frozen and self.frozen_train is not None:
            return model.head, self.frozen_train, self.frozen_val
        return model, self.train, self.val


def fit(model: Classifier, phases: list[Phase], loaders: Loaders, train: TrainConfig,
        device: torch.device, num_classes: int, on_epoch: Callable[[EpochResult], None] = lambda r: None,
        class_weights: torch.Tensor | None = None) -> EarlyStopping:
    """Run every phase; calls ``on_epoch`` after each epoch (to write the metrics CSV).
    ``class_weights`` weight the training loss (``--balance weights``); validation is never weighted."""
    weight = class_weights.to(device) if class_weights is not None else None
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=train.label_smoothing)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and not torch.cuda.is_bf16_supported() \
        else None
    stopper = EarlyStopping(train.monitor, train.early_stop, train.keep == "best")
    epoch = 0
    for phase in phases:
        model.freeze_body(phase.body_frozen)
        net, train_loader, val_loader = loaders.for_phase(model, phase)
        optimizer = make_optimizer(model, phase, train)
        steps = phase.epochs * max(1, len(train_loader))
        warmup = round(train.warmup_epochs * len(train_loader)) if phase is phases[0] else 0
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, warmup))
        for _ in range(phase.epochs):
            epoch += 1
            start = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            loss, acc = train_one_epoch(net, train_loader, optimizer, scheduler, loss_fn, device, scaler,
                                        f"epoch {epoch} ({phase.name})")
            probs, targets, _ = predict_probs(net, val_loader, device, "validating")
            val = quick_metrics(targets, probs, num_classes)
            result = EpochResult(epoch, phase.name, lr, loss, acc, val, time.perf_counter() - start)
            log.info("epoch %d (%s): train loss %.4f acc %.4f | val loss %.4f acc %.4f macro-F1 %.4f | %.1fs",
                     epoch, phase.name, loss, acc, val["loss"], val["accuracy"], val["macro_f1"], result.seconds)
            on_epoch(result)
            if stopper.update(epoch, val[train.monitor], model):
                log.info("early stopping: val %s has not improved for %d epochs (best %.4f at epoch %d)",
                         train.monitor, stopper.stale, stopper.best_value, stopper.best_epoch)
                return stopper
    return stopper
