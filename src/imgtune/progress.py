"""Where training stands, in plain values: the epoch in progress (:class:`Tally`), the rows of
metrics.csv, early stopping and its best weights (:class:`Progress`). With the model, optimizer,
scheduler and random generators' states it is what a checkpoint holds (``engine._Run.snapshot``)."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

from torch import nn


@dataclass
class EpochResult:
    epoch: int
    phase: str
    lr: float | None  # None: a phase fitted by L-BFGS (no learning rate)
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
    gave_up: bool = False  # the stop was the never-worse rule's (never_worse.Referee), not --early-stop's

    def state_dict(self) -> dict:
        mid = self.tally is not None
        return {"epoch": self.epochs_done + mid, "step": self.tally.batches if mid else 0, "epoch_done": not mid,
                "steps": self.steps, "tally": self.tally.state_dict() if mid else None,
                "rows": [dict(row) for row in self.rows], "stopped_early": self.stopped_early,
                "gave_up": self.gave_up, "stopper": self.stopper.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.epochs_done = state["epoch"] - (not state["epoch_done"])
        self.steps, self.stopped_early = state["steps"], state["stopped_early"]
        self.gave_up = state.get("gave_up", False)  # checkpoints from before the referee have none
        self.tally = Tally(**state["tally"]) if state["tally"] is not None else None
        self.rows = [dict(row) for row in state["rows"]]
        self.stopper.load_state_dict(state["stopper"])
