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

from . import checkpoint, distributed
from .data.sampler import ShardSampler
from .distributed import quiet_rank
from .config import TrainConfig
from .errors import DataError, UsageError
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


@dataclass
class Tally:
    """Running sums of the epoch in progress; a mid-epoch checkpoint keeps them."""

    lr: float  # at the epoch's start (the metrics row reports it)
    batches: int = 0  # taken from the loader, a batch whose files all failed included
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0  # spent before the current session (a resumed epoch)
    since: float = field(default_factory=time.perf_counter, repr=False)

    def elapsed(self) -> float:
        return self.seconds + time.perf_counter() - self.since

    def state_dict(self) -> dict:
        return {"lr": self.lr, "batches": self.batches, "loss_sum": self.loss_sum, "correct": self.correct,
                "seen": self.seen, "seconds": self.elapsed()}


def optimizer_steps(batches: int, accumulate: int = 1) -> int:
    """Optimizer steps in an epoch of ``batches`` batches, stepping every ``accumulate`` batches (and
    after the last)."""
    return max(1, -(-batches // max(1, accumulate)))


def train_one_epoch(model: nn.Module, loader, optimizer, scheduler, loss_fn, device: torch.device,
                    scaler: torch.amp.GradScaler | None, description: str, tally: Tally | None = None,
                    after_step: Callable[[], None] = lambda: None, accumulate: int = 1) -> tuple[float, float]:
    """Train on what ``loader`` yields, adding to ``tally`` (a resumed epoch's sums); ``after_step`` runs
    after every optimizer step. With ``accumulate`` N, gradients of N batches are summed (each loss
    divided by N) before one optimizer step, as one batch N times larger would give; under DDP the
    gradients are only averaged across ranks on the step's last batch (``no_sync``). Returns the
    epoch's mean loss and accuracy."""
    tally = tally or Tally(optimizer.param_groups[0]["lr"])
    model.train()
    total = len(loader)
    bar = tqdm(loader, desc=description, unit="batch", leave=False, disable=quiet_rank(), initial=tally.batches)
    optimizer.zero_grad(set_to_none=True)
    for batch in bar:
        tally.batches += 1
        boundary = tally.batches % accumulate == 0 or tally.batches >= total
        if batch is not None:
            images, targets, _ = batch
            images = to_channels_last(images.to(device, non_blocking=True))
            targets = targets.to(device, non_blocking=True)
            defer = model.no_sync() if not boundary and hasattr(model, "no_sync") else contextlib.nullcontext()
            with defer:
                with autocast(device):
                    logits = model(images)
                    loss = loss_fn(logits, targets)
                scaled = loss / accumulate if accumulate > 1 else loss
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            tally.loss_sum += loss.item() * len(targets)
            tally.correct += (logits.argmax(1) == targets).sum().item()
            tally.seen += len(targets)
            bar.set_postfix(loss=f"{tally.loss_sum / tally.seen:.3f}", acc=f"{tally.correct / tally.seen:.3f}")
        if boundary:
            _step(optimizer, scaler)
            scheduler.step()
            after_step()
    return tally.loss_sum / max(tally.seen, 1), tally.correct / max(tally.seen, 1)


def _step(optimizer, scaler) -> None:
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@torch.inference_mode()
def predict_probs(model: nn.Module, loader, device: torch.device, description: str = "predicting"):
    """Softmax probabilities, targets and dataset indices for every item the loader yields."""
    model.eval()
    probs, targets, indices = [], [], []
    for batch in tqdm(loader, desc=description, unit="batch", leave=False, disable=quiet_rank()):
        if batch is None:
            continue
        images, target, index = batch
        with autocast(device):
            logits = model(to_channels_last(images.to(device, non_blocking=True)))
        probs.append(torch.softmax(logits.float(), dim=1).cpu())
        targets.append(target)
        indices.append(index)
    local = (torch.cat(probs).numpy(), torch.cat(targets).numpy(), torch.cat(indices).numpy()) if probs else \
        (np.zeros((0, 0)), np.zeros(0, dtype=int), np.zeros(0, dtype=int))
    if isinstance(getattr(loader, "sampler", None), ShardSampler):  # distributed: every rank's share
        return _merge(distributed.gather(local))
    return local


def _merge(shares: list[tuple[np.ndarray, np.ndarray, np.ndarray]]):
    """Every rank's predictions in dataset order (each image once: evaluation shards are unpadded)."""
    shares = [share for share in shares if len(share[1])]
    if not shares:
        return np.zeros((0, 0)), np.zeros(0, dtype=int), np.zeros(0, dtype=int)
    probs, targets, indices = (np.concatenate(parts) for parts in zip(*shares))
    order = np.argsort(indices, kind="stable")
    return probs[order], targets[order], indices[order]


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

    def state_dict(self) -> dict:
        return {"best_value": self.best_value, "best_epoch": self.best_epoch, "stale": self.stale,
                "best_state": self.best_state}

    def load_state_dict(self, state: dict) -> None:
        self.best_value, self.best_epoch = state["best_value"], state["best_epoch"]
        self.stale, self.best_state = state["stale"], state["best_state"]


@dataclass
class Progress:
    """Where training stands, in plain values. With the model, optimizer, scheduler and scaler states
    and the random generators' states it is what a checkpoint holds."""

    stopper: EarlyStopping
    epochs_done: int = 0
    steps: int = 0  # optimizer steps over all phases (``checkpoint_every`` counts them)
    tally: Tally | None = None  # the epoch in progress, if any
    rows: list[dict] = field(default_factory=list)  # metrics.csv
    stopped_early: bool = False

    def state_dict(self) -> dict:
        mid = self.tally is not None
        return {"epoch": self.epochs_done + mid, "step": self.tally.batches if mid else 0, "epoch_done": not mid,
                "steps": self.steps, "tally": self.tally.state_dict() if mid else None,
                "rows": [dict(row) for row in self.rows], "stopped_early": self.stopped_early,
                "stopper": self.stopper.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.epochs_done = state["epoch"] - (not state["epoch_done"])
        self.steps, self.stopped_early = state["steps"], state["stopped_early"]
        self.tally = Tally(**state["tally"]) if state["tally"] is not None else None
        self.rows = [dict(row) for row in state["rows"]]
        self.stopper.load_state_dict(state["stopper"])


class Hooks:
    """What runs beside training (``checkpoint.Checkpointer`` writes checkpoints); no-op defaults.
    ``snapshot()`` returns the checkpoint payload of this moment."""

    def after_step(self, steps: int, snapshot: Callable[[], dict]) -> None:
        pass

    def after_epoch(self, snapshot: Callable[[], dict]) -> None:
        pass


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
        class_weights: torch.Tensor | None = None, hooks: Hooks | None = None,
        resume: dict | None = None) -> Progress:
    """Run every phase, or what is left of them after ``resume`` (a checkpoint's payload); calls
    ``on_epoch`` after each epoch (to write the metrics CSV) and ``hooks`` after each step and epoch.
    ``class_weights`` weight the training loss (``--balance weights``); validation is never weighted."""
    weight = class_weights.to(device) if class_weights is not None else None
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=train.label_smoothing)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and not torch.cuda.is_bf16_supported() \
        else None
    run = _Run(model, loaders, train, device, num_classes, loss_fn, scaler, on_epoch, hooks or Hooks(),
               Progress(EarlyStopping(train.monitor, train.early_stop, train.keep == "best")))
    if resume is not None:
        model.load_state_dict(resume["model"])
        run.progress.load_state_dict(resume)
    for index, phase in enumerate(phases):
        end = sum(p.epochs for p in phases[:index + 1])
        if run.progress.stopped_early or run.progress.epochs_done >= end:
            continue
        run.start_phase(index, phase, train.warmup_epochs if index == 0 else 0.0)
        if resume is not None:
            run.restore(resume)
            resume = None
        while run.progress.epochs_done < end and not run.progress.stopped_early:
            run.epoch()
    return run.progress


@dataclass
class _Run:
    """One call of :func:`fit`: what every epoch needs, and the current phase's optimizer and schedule."""

    model: Classifier
    loaders: Loaders
    train: TrainConfig
    device: torch.device
    num_classes: int
    loss_fn: nn.Module
    scaler: torch.amp.GradScaler | None
    on_epoch: Callable[[EpochResult], None]
    hooks: Hooks
    progress: Progress
    phase_index: int = 0
    phase: Phase | None = None
    net: nn.Module | None = None
    train_loader: object = None
    val_loader: object = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
    schedule_steps: int = 0

    def start_phase(self, index: int, phase: Phase, warmup_epochs: float) -> None:
        self.phase_index, self.phase = index, phase
        self.model.freeze_body(phase.body_frozen)
        net, self.train_loader, self.val_loader = self.loaders.for_phase(self.model, phase)
        self.net = distributed.wrap(net, self.device)
        self.optimizer = make_optimizer(self.model, phase, self.train)
        per_epoch = optimizer_steps(len(self.train_loader), self.train.accumulate)  # a full epoch's
        self.schedule_steps = phase.epochs * per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(self.schedule_steps, round(warmup_epochs * per_epoch)))

    def restore(self, saved: dict) -> None:
        """Continue from a checkpoint: the optimizer and schedule if it was taken in this phase (not
        at the end of the one before), then the random generators, as they were when it was taken."""
        if saved["phase"] > self.phase_index:
            raise DataError(f"the checkpoint was taken in phase {saved['phase'] + 1} but its epoch belongs to phase "
                            f"{self.phase_index + 1}: the run's config.yaml no longer matches its checkpoints")
        if saved["phase"] == self.phase_index:
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
            if saved["schedule_steps"] != self.schedule_steps:  # --epochs raised: follow the longer schedule
                self._apply_schedule()
        if self.scaler is not None and saved["scaler"] is not None:
            self.scaler.load_state_dict(saved["scaler"])
        checkpoint.restore_rng(saved["rng"])
        rank = distributed.current().rank
        if rank:  # rank 0's generators and running sums were saved; the others start afresh
            torch.manual_seed(self.train.seed + rank * 1_000_003 + saved["steps"])
            if self.progress.tally is not None:
                self.progress.tally.loss_sum, self.progress.tally.correct, self.progress.tally.seen = 0.0, 0, 0

    def _apply_schedule(self) -> None:
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * factor

    def epoch(self) -> None:
        progress, epoch = self.progress, self.progress.epochs_done + 1
        if progress.tally is None:
            progress.tally = Tally(self.optimizer.param_groups[0]["lr"])
        progress.tally.since = time.perf_counter()
        _position(self.train_loader, epoch, progress.tally.batches)
        loss, acc = train_one_epoch(self.net, self.train_loader, self.optimizer, self.scheduler, self.loss_fn,
                                    self.device, self.scaler, f"epoch {epoch} ({self.phase.name})",
                                    progress.tally, self._after_step, self.train.accumulate)
        if distributed.current().enabled:  # the epoch's figures over every rank's images
            loss_sum, correct, seen = distributed.sum_across([progress.tally.loss_sum, progress.tally.correct,
                                                              progress.tally.seen])
            loss, acc = loss_sum / max(seen, 1), correct / max(seen, 1)
        probs, targets, _ = predict_probs(self.net, self.val_loader, self.device, "validating")
        val = quick_metrics(targets, probs, self.num_classes)
        result = EpochResult(epoch, self.phase.name, progress.tally.lr, loss, acc, val, progress.tally.elapsed())
        log.info("epoch %d (%s): train loss %.4f acc %.4f | val loss %.4f acc %.4f macro-F1 %.4f | %.1fs",
                 epoch, self.phase.name, loss, acc, val["loss"], val["accuracy"], val["macro_f1"], result.seconds)
        progress.rows.append(result.row())
        progress.tally, progress.epochs_done = None, epoch
        self.on_epoch(result)
        progress.stopped_early = progress.stopper.update(epoch, val[self.train.monitor], self.model)
        if progress.stopped_early:
            stopper = progress.stopper
            log.info("early stopping: val %s has not improved for %d epochs (best %.4f at epoch %d)",
                     self.train.monitor, stopper.stale, stopper.best_value, stopper.best_epoch)
        self.hooks.after_epoch(self.snapshot)

    def _after_step(self) -> None:
        self.progress.steps += 1
        self.hooks.after_step(self.progress.steps, self.snapshot)

    def snapshot(self) -> dict:
        """The checkpoint payload of this moment: plain containers and tensors only. (Distributed: every
        rank calls it at the same step; the epoch's running sums are those of all ranks.)"""
        progress = self.progress.state_dict()
        tally = progress["tally"]
        if distributed.current().enabled and tally is not None:
            sums = distributed.sum_across([tally["loss_sum"], tally["correct"], tally["seen"]])
            tally["loss_sum"], tally["correct"], tally["seen"] = sums[0], int(sums[1]), int(sums[2])
        batch_size = getattr(self.train_loader, "batch_size", None) or 1
        return {"format": checkpoint.FORMAT, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "schedule_steps": self.schedule_steps,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "phase": self.phase_index, "rng": checkpoint.capture_rng(),
                "sampler": {"epoch": progress["epoch"], "start": progress["step"] * batch_size}, **progress}


def _position(loader, epoch: int, batches_done: int) -> None:
    """Point the training sampler at ``epoch``, past the batches already trained on."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch, batches_done * (loader.batch_size or 1))
    elif hasattr(getattr(loader, "dataset", None), "set_epoch"):  # a stream (data.shards)
        loader.dataset.set_epoch(epoch)
