"""How training runs: the epoch loop, phases, validation after every epoch, hooks for checkpoints.

*What* is trained (model, data, strategy) is decided by the caller (``training.py``); devices,
precision and the forward pass are in ``inference.py``, optimisers and schedules in ``optim.py``,
the state of a run in ``progress.py``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from . import checkpoint, distributed
from .config import TrainConfig
from .distributed import quiet_rank
from .errors import DataError, TrainingDiverged
from .extras import Mixer, WeightAverage, batch_mixer, weight_average
from .finite import nonfinite_tensors
from .head_fit import fit_linear_head, fitted_by_lbfgs, linear_layer, sklearn_class_weight
from .inference import autocast, predict_probs, to_channels_last
from .metrics import quick_metrics
from .models import Classifier
from .optim import make_optimizer, optimizer_steps, warmup_cosine_from
from .progress import EarlyStopping, EpochResult, Progress, Tally
from .strategies import Phase

log = logging.getLogger(__name__)


def train_one_epoch(model: nn.Module, loader, optimizer, scheduler, loss_fn, device: torch.device,
                    scaler: torch.amp.GradScaler | None, description: str, tally: Tally | None = None,
                    after_step: Callable[[], None] = lambda: None, accumulate: int = 1,
                    mix: Mixer | None = None, note: str = "") -> tuple[float, float]:
    """Train on what ``loader`` yields, adding to ``tally`` (a resumed epoch's sums); ``after_step`` runs
    after every optimizer step. With ``accumulate`` N, gradients of N batches are summed (each loss
    divided by N) before one optimizer step, as one batch N times larger would give; a short last group
    of k < N batches is divided by k (timm's ``last_accum_steps``), as its one larger batch would be.
    Under DDP the gradients are only averaged across ranks on the step's last batch (``no_sync``).
    ``mix`` (mixup/cutmix, :mod:`imgtune.extras`) turns each batch into mixed images and soft targets
    for the loss; the accuracy shown is against the images' own labels.
    ``note`` follows the description on the progress bar (the run's time left).
    A loss that is not a finite number stops training before its optimizer step
    (:class:`~imgtune.errors.TrainingDiverged`). Returns the epoch's mean loss and accuracy."""
    tally = tally or Tally(optimizer.param_groups[0]["lr"])
    model.train()
    total = len(loader)
    bar = tqdm(loader, desc=description + note, unit="batch", leave=False, disable=quiet_rank(), initial=tally.batches)
    optimizer.zero_grad(set_to_none=True)
    diverged = None  # the first non-finite loss of the optimizer step in progress
    for batch in bar:
        tally.batches += 1
        boundary = tally.batches % accumulate == 0 or tally.batches >= total
        if batch is not None:
            images, targets, _ = batch
            images = to_channels_last(images.to(device, non_blocking=True))
            targets = targets.to(device, non_blocking=True)
            defer = model.no_sync() if not boundary and hasattr(model, "no_sync") else contextlib.nullcontext()
            inputs, wanted = mix(images, targets) if mix is not None else (images, targets)
            with defer:
                with autocast(device):
                    logits = model(inputs)
                    loss = loss_fn(logits, wanted)
                group = min(accumulate, total - (tally.batches - 1) // accumulate * accumulate)
                scaled = loss / group if group > 1 else loss
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            value = loss.item()
            if not math.isfinite(value):
                diverged = diverged or f"{description}, batch {tally.batches} of {total}: the training loss is {value}"
            tally.loss_sum += value * len(targets)
            tally.correct += (logits.argmax(1) == targets).sum().item()
            tally.seen += len(targets)
            bar.set_postfix(loss=f"{tally.loss_sum / tally.seen:.3f}", acc=f"{tally.correct / tally.seen:.3f}")
        if boundary:
            if distributed.any_rank(diverged is not None):  # before the step spreads NaN to every weight
                raise TrainingDiverged(diverged or f"{description}, batch {tally.batches} of {total}: the training "
                                       "loss of another rank is NaN or infinite")
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
    frozen_train_weights: torch.Tensor | None = None  # per row of frozen_train (pseudo-labels count less)
    partial: object = None  # --unfreeze top:K: activations of the frozen lower blocks (activations.PartialLoaders)

    def for_phase(self, model: Classifier, phase: Phase) -> tuple[nn.Module, object, object]:
        if phase.body_frozen and self.frozen_train is not None:
            return model.head, self.frozen_train, self.frozen_val
        if not phase.body_frozen and self.partial is not None:
            return self.partial.net(model), self.partial.train, self.partial.val
        return model, self.train, self.val


def head_fit_asked(train: TrainConfig, phase: Phase, last: bool, loaders: Loaders) -> bool:
    """Whether ``--head-fit`` asks for the (frozen) ``phase`` to be fitted by L-BFGS on cached features
    rather than trained by SGD (``last``: it is the strategy's last phase); the head must also be linear."""
    return phase.body_frozen and loaders.frozen_train is not None and fitted_by_lbfgs(train.head_fit, last)


def fit(model: Classifier, phases: list[Phase], loaders: Loaders, train: TrainConfig, device: torch.device,
        num_classes: int, on_epoch: Callable[[EpochResult, list[dict]], None] = lambda result, rows: None,
        class_weights: torch.Tensor | None = None, hooks: Hooks | None = None,
        resume: dict | None = None, time_left: Callable[[int], str] | None = None,
        span: tuple[int, int] | None = None, referee=None) -> Progress:
    """Run every phase, or what is left of them after ``resume`` (a checkpoint's payload); calls
    ``on_epoch(result, rows)`` after each epoch with every row so far (to write the metrics CSV), and
    ``hooks`` after each step and epoch.
    ``class_weights`` weight the training loss (``--balance weights``); validation is never weighted.
    ``time_left(epoch)`` adds the run's time left to the progress bar (``timeplan.TimeLeft``).
    ``span`` (epochs before, total epochs): the first phase is a slice of a longer learning-rate schedule
    (a federated site's round: its lr follows one schedule over the federation, not a restart per round).
    ``referee`` (``never_worse.Referee``): after each epoch that trained the body, but the run's last, the
    model is scored on the never-worse rule's hold-out (the row's ``inner_*`` columns), and training ends
    when the referee gives up on fine-tuning (``Progress.gave_up``)."""
    weight = class_weights.to(device) if class_weights is not None else None
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=train.label_smoothing)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and not torch.cuda.is_bf16_supported() \
        else None
    run = _Run(model, loaders, train, device, num_classes, loss_fn, scaler, on_epoch, hooks or Hooks(),
               Progress(EarlyStopping(train.monitor, train.early_stop, train.keep == "best")),
               ema=weight_average(model, train.ema), mix=batch_mixer(train.mixup, train.cutmix, num_classes),
               time_left=time_left or (lambda epoch: ""), span=span, referee=referee,
               last_epoch=sum(p.epochs for p in phases))
    if resume is not None:
        model.load_state_dict(resume["model"])
        run.progress.load_state_dict(resume)
        if run.ema is not None and resume.get("ema"):  # a finished run resumed to write its results keeps it
            run.ema.load_state_dict(resume["ema"])
        elif run.ema is not None:
            run.ema.restart(model)
    for index, phase in enumerate(phases):
        end = sum(p.epochs for p in phases[:index + 1])
        if run.progress.stopped_early or run.progress.epochs_done >= end:
            continue
        run.start_phase(index, phase, train.warmup_epochs if index == 0 else 0.0)
        if resume is not None:
            run.restore(resume)
            resume = None
        if run.head_is_fitted(phase, last=index == len(phases) - 1):
            run.fit_head(end)
        while run.progress.epochs_done < end and not run.progress.stopped_early:
            run.epoch()
    if run.ema is not None:  # the averaged weights are the model from here on (saved, measured)
        model.load_state_dict(run.ema.module.state_dict())
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
    on_epoch: Callable[[EpochResult, list[dict]], None]
    hooks: Hooks
    progress: Progress
    time_left: Callable[[int], str] = lambda epoch: ""
    phase_index: int = 0
    phase: Phase | None = None
    net: nn.Module | None = None
    train_loader: object = None
    val_loader: object = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
    schedule_steps: int = 0
    ema: WeightAverage | None = None  # --ema: validated and kept instead of the raw weights
    mix: Mixer | None = None  # --mixup/--cutmix, while the body trains
    span: tuple[int, int] | None = None  # (epochs before, total epochs) of the first phase's schedule
    referee: object = None  # never_worse.Referee: scores fine-tuning on the hold-out, may end it
    last_epoch: int = 0  # the run's last epoch (the never-worse rule judges it after fit returns)

    def start_phase(self, index: int, phase: Phase, warmup_epochs: float) -> None:
        self.phase_index, self.phase = index, phase
        self.model.freeze_body(phase.body_frozen)
        self._check_weights(everything=True)
        net, self.train_loader, self.val_loader = self.loaders.for_phase(self.model, phase)
        self.net = distributed.wrap(net, self.device)
        self.optimizer = make_optimizer(self.model, phase, self.train)
        per_epoch = optimizer_steps(len(self.train_loader), self.train.accumulate)  # a full epoch's
        self.schedule_steps = phase.epochs * per_epoch
        before, total = self.span if self.span and index == 0 else (0, phase.epochs)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            warmup_cosine_from(total * per_epoch, round(warmup_epochs * per_epoch), before * per_epoch))
        if self.ema is not None:
            self.ema.restart(self.model)

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
        if self.ema is not None and saved.get("ema") is not None and saved["phase"] == self.phase_index:
            self.ema.load_state_dict(saved["ema"])
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
                                    progress.tally, self._after_step, self.train.accumulate,
                                    None if self.phase.body_frozen else self.mix, self.time_left(epoch))
        if distributed.current().enabled:  # the epoch's figures over every rank's images
            loss_sum, correct, seen = distributed.sum_across([progress.tally.loss_sum, progress.tally.correct,
                                                              progress.tally.seen])
            loss, acc = loss_sum / max(seen, 1), correct / max(seen, 1)
        self._finish(epoch, progress.tally.lr, loss, acc, progress.tally.elapsed())

    def head_is_fitted(self, phase: Phase, last: bool) -> bool:
        """``--head-fit lbfgs``: a linear head on cached features is fitted to convergence instead of
        trained for the phase's epochs (imgtune.head_fit); ``auto``: where the frozen phase is the last
        (linear-probe), not yet before fine-tuning (gradual), where it has not been measured to help."""
        if not head_fit_asked(self.train, phase, last, self.loaders):
            return False
        if linear_layer(self.model.head) is None:
            log.info("head fit: the %s head is trained by SGD for the phase's epochs (only a linear head is fitted "
                     "by L-BFGS)", type(self.model.head).__name__)
            return False
        return True

    def fit_head(self, end: int) -> None:
        """The whole frozen phase at once: the head fitted on every cached training feature, then one row
        (numbered as the phase's last epoch) with its training and validation figures."""
        since = time.perf_counter()
        if self.train.label_smoothing:
            log.info("head fit: --label-smoothing applies to SGD epochs, not to the fitted head (its "
                     "regularisation is chosen by cross-validation instead)")
        features, targets = self.train_loader.dataset.tensors[:2]
        class_weight = sklearn_class_weight(self.train.balance, self.loss_fn.weight)
        info = fit_linear_head(linear_layer(self.model.head), features, targets, self.num_classes, class_weight,
                               self.train.seed, self.loaders.frozen_train_weights)
        self.model.head.eval()
        with torch.inference_mode():
            logits, labels = self.model.head(features.to(self.device)), targets.to(self.device)
            loss, acc = float(self.loss_fn(logits, labels)), float((logits.argmax(1) == labels).float().mean())
        log.info("epochs %d-%d (%s): head fitted to convergence by L-BFGS, C %.3g chosen by %d-fold cross-validation "
                 "on the training split (%d iterations, %.1fs)", self.progress.epochs_done + 1, end, self.phase.name,
                 info["C"], info["folds"], info["iterations"], info["seconds"])
        if self.ema is not None:
            self.ema.restart(self.model)  # the fitted head is the phase's result: nothing to average
        self._finish(end, None, loss, acc, time.perf_counter() - since, {"head_fit": "lbfgs", "C": info["C"]})

    def _finish(self, epoch: int, lr: float | None, loss: float, acc: float, seconds: float,
                extra: dict | None = None) -> None:
        """Validate, record the row and tell the hooks: the end of an epoch (or of a fitted phase)."""
        progress = self.progress
        self._check_weights()
        judged = self.ema.counterpart(self.model, self.net) if self.ema is not None else self.net
        probs, targets, _ = predict_probs(judged, self.val_loader, self.device, "validating")
        val = quick_metrics(targets, probs, self.num_classes)
        if not math.isfinite(val["loss"]):  # finite weights whose outputs overflow
            raise TrainingDiverged(f"{self._where()}: the validation loss is {val['loss']}, although the weights "
                                   "are finite numbers (their outputs overflow)")
        result = EpochResult(epoch, self.phase.name, lr, loss, acc, val, seconds)
        refereed = self.referee is not None and not self.phase.body_frozen and epoch < self.last_epoch
        if refereed:
            extra = {**(extra or {}), **self.referee.score(self.ema.module if self.ema is not None else self.model,
                                                           epoch)}
        log.info("epoch %d (%s): train loss %.4f acc %.4f | val loss %.4f acc %.4f macro-F1 %.4f%s | %.1fs",
                 epoch, self.phase.name, loss, acc, val["loss"], val["accuracy"], val["macro_f1"],
                 f" | inner hold-out loss {extra['inner_loss']:.4f} acc {extra['inner_accuracy']:.4f}"
                 if refereed else "", result.seconds)
        progress.rows.append({**result.row(), **(extra or {})})
        progress.tally, progress.epochs_done = None, epoch
        self.on_epoch(result, progress.rows)
        progress.stopped_early = progress.stopper.update(epoch, val[self.train.monitor],
                                                         self.ema.module if self.ema is not None else self.model)
        if progress.stopped_early:
            stopper = progress.stopper
            log.info("early stopping: val %s has not improved for %d epochs (best %.4f at epoch %d)",
                     self.train.monitor, stopper.stale, stopper.best_value, stopper.best_epoch)
        elif refereed and self.referee.gives_up(progress.rows):
            progress.stopped_early = progress.gave_up = True
        self.hooks.after_epoch(self.snapshot)

    def _where(self) -> str:
        """The epoch and batch reached, for a message."""
        tally = self.progress.tally
        if tally is None:
            return f"epoch {self.progress.epochs_done} ({self.phase.name}), at its end"
        return f"epoch {self.progress.epochs_done + 1} ({self.phase.name}), batch {tally.batches} of " \
               f"{len(self.train_loader)}"

    def _check_weights(self, everything: bool = False) -> None:
        """After each epoch and before every checkpoint: a checkpoint with NaN weights must never replace
        the good ones (in training mode, batch norm can keep the loss finite while its running
        statistics, used by validation and prediction, are already NaN). While the body is frozen (eval
        mode, no gradients) only the head can change: the whole model is checked when a phase starts."""
        frozen = self.model.body_frozen and not everything
        bad = nonfinite_tensors(self.model.head.state_dict(prefix="head.") if frozen else self.model.state_dict())
        if bad:
            names = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise TrainingDiverged(f"{self._where()}: the weights are NaN or infinite ({names})")

    def _after_step(self) -> None:
        if self.ema is not None:
            self.ema.update(self.model)
        self.progress.steps += 1
        self.hooks.after_step(self.progress.steps, self.snapshot)

    def snapshot(self) -> dict:
        """The checkpoint payload of this moment: plain containers and tensors only. (Distributed: every
        rank calls it at the same step; the epoch's running sums are those of all ranks.) Weights that
        are not finite are refused (:class:`~imgtune.errors.TrainingDiverged`)."""
        if self.progress.tally is not None:  # mid-epoch; at an epoch's end epoch() has just checked them
            self._check_weights()
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
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "sampler": {"epoch": progress["epoch"], "start": progress["step"] * batch_size}, **progress}


def _position(loader, epoch: int, batches_done: int) -> None:
    """Point the training sampler at ``epoch``, past the batches already trained on."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch, batches_done * (loader.batch_size or 1))
    elif hasattr(getattr(loader, "dataset", None), "set_epoch"):  # a stream (data.shards)
        loader.dataset.set_epoch(epoch)
