"""A time plan: before training, a few real batches of each phase are timed through the run's own
loaders and model (``--plan``, on by default), the plan is logged (phases, epochs, estimated minutes
each, total) and stored in the run folder (``plan.json``, with the measured wall time at the end); the
progress bar says how long the run has left. ``--time-budget 10m`` picks the best plan that fits:
fewer fine-tuning epochs first, ``linear-probe`` (the head fitted on cached features) at the least.

Why measured, not modelled: the cost of an epoch depends on the machine, its load, the input size, the
loaders and what each phase runs; timing the real training step (``engine.train_one_epoch`` itself,
on a copy of the model) stays right whatever the phases do. The random generators are restored after
the timing, so a planned run trains exactly as an unplanned one.
"""

from __future__ import annotations

import copy
import logging
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from . import artifact, checkpoint, distributed
from .config import RunConfig, TrainConfig, save_yaml
from .engine import Loaders, train_one_epoch
from .errors import TrainingDiverged, UsageError
from .head_fit import fit_linear_head, fitted_by_lbfgs, linear_layer
from .inference import batched_outputs
from .optim import make_optimizer
from .partial import PartialNet
from .strategies import Phase, plan, probe_only

log = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
TIMED_BATCHES = 2  # after one that also starts the loader's workers
LBFGS_SAMPLE = 256  # the head fit is timed on at most this many training images and extrapolated to all
UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """``90s``, ``10m``, ``1.5h`` (a bare number is minutes) as seconds."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text).lower())
    if not found or float(found[1]) <= 0:
        raise UsageError(f"--time-budget {text!r}: give a positive duration such as 90s, 10m or 1.5h (a bare "
                         "number is minutes)")
    return float(found[1]) * UNITS[found[2] or "m"]


class _Few:
    """The first ``count`` batches of a loader, as a loader (``len`` included)."""

    def __init__(self, loader, count: int):
        self.loader, self.count = loader, min(count, len(loader))

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        for index, batch in enumerate(self.loader):
            if index >= self.count:
                return
            yield batch


def _per_batch(stamps: list[float]) -> float:
    """Seconds a batch from timestamps taken after each (the first batch, which also starts workers and
    warms the caches, is only counted when it is the only one)."""
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return sum(gaps) / len(gaps) if gaps else stamps[0]


def _time_training(loader, phase: Phase, model, on_features: bool, train: TrainConfig, device, loss_fn,
                   found=None) -> tuple[float, float]:
    """Seconds per batch of the real training step (``engine.train_one_epoch``) on a copy of ``model``
    (its head alone on cached features; with ``found``, ``--unfreeze top:K``'s cut, the top blocks and
    head on stored activations; else the whole model on images): on the first pass over the batches
    (images decoded, the pixel cache filled, kernels chosen) and on a second over the same ones. Where the
    batches are activations whose views are made when first drawn (``ActivationSet.fill``), one pass
    does: the time its batches spent making views is timed apart, and the rest is the second pass's."""
    model, found = copy.deepcopy((model, found))  # one copy: the cut's blocks are the copied model's
    model.freeze_body(phase.body_frozen)
    net = model.head if on_features else PartialNet(model, found) if found is not None else model
    optimizer = make_optimizer(model, phase, train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    views = loader.dataset if getattr(loader.dataset, "missing", None) is not None else None
    making: list[float] = [0.0]  # seconds spent making views, so far in this pass

    def one_pass() -> tuple[float, float]:
        start, stamps, made = time.perf_counter(), [], []
        try:
            train_one_epoch(net, _Few(loader, TIMED_BATCHES + 1), optimizer,
                            scheduler, loss_fn, device, None, f"timing {phase.name}",
                            after_step=lambda: (stamps.append(time.perf_counter() - start), made.append(making[0])))
        except TrainingDiverged:  # the copy diverged (--lr 1e30): training itself will say where, not the timing
            stamps, made = (stamps, made) if stamps else ([time.perf_counter() - start], [making[0]])
        return _per_batch(stamps), _per_batch(made)

    if views is None:
        return one_pass()[0], one_pass()[0]
    fill = views.fill

    def timed_fill(target, pairs) -> None:
        began = time.perf_counter()
        try:
            fill(target, pairs)
        finally:
            making[0] += time.perf_counter() - began

    views.fill = timed_fill
    try:
        per_batch, per_batch_making = one_pass()
    finally:
        views.fill = fill
    return per_batch, per_batch - per_batch_making


def _time_eval(net: torch.nn.Module, loader, device, passes: int = 2) -> tuple[float, float]:
    """Seconds per validation batch, first pass and second (as :func:`_time_training`); with ``passes=1``
    (the images were read before), the one pass stands for both."""
    def one_pass() -> float:
        start, stamps = time.perf_counter(), []
        for _ in batched_outputs(net, _Few(loader, TIMED_BATCHES + 1), device, "timing validation"):
            stamps.append(time.perf_counter() - start)
        return _per_batch(stamps) if stamps else 0.0

    first = one_pass()
    return first, one_pass() if passes > 1 else first


def _time_lbfgs(model, loaders: Loaders, num_classes: int, seed: int) -> float:
    """The head fit timed on all the training features when they are at most :data:`LBFGS_SAMPLE`, else
    on samples of half and all of that many (after one untimed fit), and extrapolated to all of them
    as a fixed part (the cross-validation's folds and starts) plus a part per image, never below the
    larger sample's time.
    (Scaling one sample's time in proportion to the images counted the fixed part again for each
    sample's worth: 12.4 s planned for a 1.8 s fit of 2,000 images.)"""
    features, targets = loaders.frozen_train.dataset.tensors[:2]
    n = len(targets)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))

    def timed(count: int) -> float:
        pick, head = order[:count], copy.deepcopy(model.head)  # the fit's own seconds: not its first imports
        return fit_linear_head(linear_layer(head), features[pick], targets[pick], num_classes, None, seed)["seconds"]

    if n <= LBFGS_SAMPLE:
        return timed(n)
    timed(LBFGS_SAMPLE // 2)  # a first fit pays first calls, which the real fit does not pay again
    half, whole = timed(LBFGS_SAMPLE // 2), timed(LBFGS_SAMPLE)
    per_image = max(0.0, (whole - half) / (LBFGS_SAMPLE - LBFGS_SAMPLE // 2))
    return whole + per_image * (n - LBFGS_SAMPLE)


@dataclass
class Costs:
    """Seconds measured on this machine: an epoch of each kind, the head fit, an image through the model."""

    body_epoch: float = 0.0  # training batches with the body training, images (pixels cached) or activations
    body_val: float = 0.0  # the validation pass of such an epoch (on stored activations with --unfreeze top:K)
    first_extra: float = 0.0  # more in the first epoch that reads the images (decoding, filling the caches)
    head_epoch: float = 0.0  # training batches of the head on cached features (SGD)
    val_images: float = 0.0  # a validation pass through the whole model (pixels cached)
    val_features: float = 0.0  # a validation pass of the head on cached features
    val_first_read: float = 0.0  # a validation pass through the whole model, images read the first time
    test_images: float = 0.0  # a pass over the test split, first read
    per_image: float = 0.0  # one image of the never-worse hold-out: through the whole model, first read (with a
    # cut, the top blocks and head on its activations)
    lbfgs: float = 0.0
    view_decay: float = 0.0  # with views computed when first drawn: each later epoch's share of first_extra
    final_on_activations: float = 0.0  # 1: a fine-tuned model's final metrics run on the val activations


def measure(model, phases: list[Phase], loaders: Loaders, train: TrainConfig, device, loss_fn,
            num_classes: int, lbfgs: float | None = None) -> Costs:
    """Time a few batches of what each phase runs, through the real loaders; the random generators (global
    and the loaders' own) are as before afterwards. Under torchrun, the mean over the ranks. ``lbfgs``: the
    head fit's seconds where a fit on the frozen phase's features already ran (the never-worse probe's),
    else it is timed."""
    rng = checkpoint.capture_rng()
    partial_train = loaders.partial.train if loaders.partial is not None else None
    generators = [(g, g.get_state()) for g in (getattr(x, "generator", None) for x in (loaders.train,
                  loaders.frozen_train, partial_train)) if g is not None]
    costs = Costs()
    try:
        _measure_into(costs, model, phases, loaders, train, device, loss_fn, num_classes, lbfgs)
    finally:
        checkpoint.restore_rng(rng)
        for generator, state in generators:
            generator.set_state(state)
    world = distributed.current().world  # every rank plans from the same (mean) costs, so all choose alike
    return Costs(*(v / world for v in distributed.sum_across(list(vars(costs).values()))))


def _measure_into(costs: Costs, model, phases, loaders: Loaders, train, device, loss_fn, num_classes,
                  lbfgs: float | None) -> None:
    body = next((p for p in phases if not p.body_frozen), None)
    cut = loaders.partial.found if body is not None and loaders.partial is not None else None
    if body is not None:  # first: under glibc's default malloc, inference ran twice as fast after the
        # process's first backward pass (imgtune.allocator; in-process users of imgtune.train get no tuning)
        batches = loaders.partial.train if cut is not None else loaders.train
        views = batches.dataset if cut is not None and batches.dataset.missing is not None else None
        before = int(views.missing.sum()) if views is not None else 0
        first, again = _time_training(batches, body, model, False, train, device, loss_fn, cut)
        costs.body_epoch = again * len(batches)
        costs.first_extra += max(0.0, first - again) * len(batches)
        if views is not None and before:  # views made when first drawn: an epoch draws one of V per image, so a
            # view not made yet is drawn first in epoch k with probability (1/V)((V-1)/V)^(k-1); the timing's
            # first pass made some, which the epochs will not make again
            costs.view_decay = (views.views - 1) / views.views
            costs.first_extra *= int(views.missing.sum()) / before
    on_activations = cut is not None and loaders.partial.exact_val  # the final metrics too (results.py)
    if (body is not None or loaders.frozen_val is None) and not (on_activations and loaders.test is None):
        first, again = _time_eval(model, loaders.val, device, 1 if cut is not None else 2)  # a cut: read before
        costs.val_images = again * len(loaders.val)
        costs.first_extra += max(0.0, first - again) * len(loaders.val) if cut is None else 0.0
        costs.val_first_read = first * len(loaders.val)
        costs.per_image = first / max(1, loaders.val.batch_size or 1)
        costs.test_images = first * len(loaders.test) if loaders.test is not None else 0.0
        costs.body_val = costs.val_images
    if cut is not None:  # the epochs validate on the stored activations of the validation images, and the
        # never-worse rule scores its hold-out on their activations too
        copied, copied_cut = copy.deepcopy((model, cut))
        per_batch = _time_eval(PartialNet(copied, copied_cut), loaders.partial.val, device)[1]
        costs.body_val = per_batch * len(loaders.partial.val)
        costs.per_image = per_batch / max(1, loaders.partial.val.batch_size or 1)
        costs.final_on_activations = float(on_activations)
    if loaders.frozen_train is not None:
        costs.val_features = _time_eval(model.head, loaders.frozen_val, device)[1] * len(loaders.frozen_val)
        costs.head_epoch = _time_training(loaders.frozen_train, phases[0], model, True, train, device,
                                          loss_fn)[1] * len(loaders.frozen_train)
        if linear_layer(model.head) is not None:
            costs.lbfgs = lbfgs if lbfgs is not None else _time_lbfgs(model, loaders, num_classes, train.seed)


@dataclass
class Estimate:
    """Seconds per line of the plan, and per epoch (for the time left)."""

    lines: list[tuple[str, int, float]] = field(default_factory=list)  # (what, epochs, seconds)
    epoch_seconds: dict[int, float] = field(default_factory=dict)
    tail: float = 0.0  # after the last epoch: final metrics, the never-worse check
    probe_saves: float = 0.0  # less in the final metrics when the never-worse rule keeps the probe (features)

    @property
    def total(self) -> float:
        return sum(seconds for _, _, seconds in self.lines)


def estimate(phases: list[Phase], costs: Costs, train: TrainConfig, head_linear: bool,
             holdout_images: int, test: bool, probe_fitted: bool = False) -> Estimate:
    """What each phase will cost from the measured costs; the final metrics and the never-worse check (its
    hold-out features were computed before the plan; with ``--never-worse-patience``, the fine-tuned model
    is scored on the hold-out after each epoch but the last, which the check scores)."""
    out, epoch, first_read = Estimate(), 0, False
    total_epochs = sum(p.epochs for p in phases)
    refereed = holdout_images * costs.per_image if train.never_worse_patience else 0.0
    for index, phase in enumerate(phases):
        last = index == len(phases) - 1
        if phase.body_frozen and head_linear and fitted_by_lbfgs(train.head_fit, last):
            seconds, per_epoch = costs.lbfgs + costs.val_features, [0.0] * phase.epochs
        elif phase.body_frozen:
            per_epoch = [costs.head_epoch + costs.val_features] * phase.epochs
            seconds = sum(per_epoch)
        else:
            per_epoch = [costs.body_epoch + costs.body_val + (refereed if epoch + e < total_epochs else 0.0)
                         for e in range(1, phase.epochs + 1)]
            if not first_read:  # the first epoch reads the images; views computed when first drawn cost
                for e in range(phase.epochs):  # each later epoch less (view_decay 0: the first epoch only)
                    per_epoch[e] += costs.first_extra * costs.view_decay ** e
            first_read, seconds = True, sum(per_epoch)
        for offset, value in enumerate(per_epoch):
            out.epoch_seconds[epoch + offset + 1] = value
        epoch += phase.epochs
        out.lines.append((f"{phase.name} ({'head fitted by L-BFGS' if not any(per_epoch) else 'epochs'})",
                          phase.epochs, seconds))
    images = not phases[-1].body_frozen or holdout_images  # the final model runs on images (or activations)
    on_images = costs.val_images if first_read else costs.val_first_read
    final = (costs.body_val if costs.final_on_activations else on_images) if images else costs.val_features
    final += costs.test_images if test and images else 0.0
    out.lines.append(("final metrics", 0, final))
    out.tail = final
    if holdout_images and images:  # a kept probe is scored on the val features (the test split's images)
        out.probe_saves = max(0.0, final - costs.val_features - (costs.test_images if test else 0.0))
    if holdout_images:
        check = costs.lbfgs  # the probe refitted on the whole training split
        if first_read:  # the fine-tuned model scored, and the probe fitted unless that ran before the plan
            check += holdout_images * costs.per_image + (0.0 if probe_fitted else costs.lbfgs)
        out.lines.append((f"never-worse check ({holdout_images} held-out images)", 0, check))
        out.tail += check
    return out


def candidates(train: TrainConfig) -> list[tuple[str, TrainConfig]]:
    """Plans from the best to the cheapest, each a config that runs it: the one asked for, then fewer
    epochs with the body training, then (for a strategy with a frozen phase) linear-probe as the floor.
    (Other ways to save time, e.g. fewer unfrozen blocks or a smaller input size, go in here.)"""
    found = [("as configured", train)]
    if train.strategy == "gradual":
        for unfrozen in range(train.epochs - train.freeze_epochs - 1, 0, -1):
            found.append((f"{unfrozen} fine-tuning epoch{'s' * (unfrozen > 1)} instead of "
                          f"{train.epochs - train.freeze_epochs}", replace(train, epochs=train.freeze_epochs + unfrozen)))
        found.append(("linear-probe only (no fine-tuning)", probe_only(train)))
    elif train.strategy in ("finetune", "scratch"):
        found += [(f"{e} epoch{'s' * (e > 1)} instead of {train.epochs}", replace(train, epochs=e))
                  for e in range(train.epochs - 1, 0, -1)]
    return found


@dataclass
class Plan:
    """The plan that runs: its config, phases and estimate, and the record for plan.json."""

    config: RunConfig
    phases: list[Phase]
    estimate: Estimate
    record: dict


def make(config: RunConfig, costs: Costs, spent: float, head_linear: bool, holdout_images: int,
         test: bool, probe_fitted: bool = False) -> Plan:
    """The plan asked for, or under ``--time-budget`` the best candidate whose estimated total (with the
    ``spent`` seconds so far) fits; the cheapest when none does."""
    budget = parse_duration(config.train.time_budget) if config.train.time_budget else None
    tried = []
    for reason, train in candidates(config.train):
        phases = plan(train)
        found = estimate(phases, costs, train, head_linear, holdout_images, test, probe_fitted)
        tried.append({"plan": reason, "estimated_seconds": round(spent + found.total, 1)})
        if budget is None or spent + found.total <= budget:
            break
    else:
        log.warning("time budget %s: even the cheapest plan (%s) is estimated at %.1f min; it runs anyway",
                    config.train.time_budget, reason, (spent + found.total) / 60)
    if budget is not None:
        log.info("time budget %s: chose %s", config.train.time_budget, reason)
    chosen = replace(config, train=replace(train, time_budget=None) if budget is not None else train)
    record = {"budget_seconds": budget, "chosen": reason, "tried": tried if budget is not None else [],
              "seconds_before_plan": round(spent, 1), "costs": {k: round(v, 3) for k, v in vars(costs).items()},
              "lines": [{"what": w, "epochs": e, "seconds": round(s, 1)} for w, e, s in found.lines],
              "estimated_total_seconds": round(spent + found.total, 1)}
    earliest = _earliest_give_up(phases, train, holdout_images)
    if earliest is not None:  # the never-worse rule may end fine-tuning after this epoch
        record["estimated_if_given_up_seconds"] = round(spent + found.total - found.probe_saves - sum(
            s for e, s in found.epoch_seconds.items() if e > earliest), 1)  # given up: the probe is kept
        record["earliest_give_up_epoch"] = earliest
    return Plan(chosen, phases, found, record)


def _earliest_give_up(phases: list[Phase], train: TrainConfig, holdout_images: int) -> int | None:
    """The first epoch after which the never-worse rule can end fine-tuning (``--never-worse-patience``
    scored epochs in a row, the run's last not among them), or None where it cannot."""
    if not (holdout_images and train.never_worse_patience) or phases[-1].body_frozen:
        return None
    first = sum(p.epochs for p in phases[:-1]) + 1  # the last phase trains the body (gradual)
    earliest = first + train.never_worse_patience - 1
    return earliest if earliest < sum(p.epochs for p in phases) else None


def describe(chosen: Plan) -> str:
    """The plan as the log shows it: one line per phase and the total, in minutes."""
    lines = [f"  {'so far (checks, model, features)':44s} {chosen.record['seconds_before_plan'] / 60:6.1f} min"]
    for what, epochs, seconds in chosen.estimate.lines:
        label = f"{what}, {epochs} epoch{'s' * (epochs != 1)}" if epochs else what
        lines.append(f"  {label:44s} {seconds / 60:6.1f} min")
    lines.append(f"  {'total (estimated)':44s} {chosen.record['estimated_total_seconds'] / 60:6.1f} min")
    if "estimated_if_given_up_seconds" in chosen.record:
        patience = chosen.config.train.never_worse_patience
        lines.append(f"  {'or, fine-tuning given up after epoch ' + str(chosen.record['earliest_give_up_epoch']):44s} "
                     f"{chosen.record['estimated_if_given_up_seconds'] / 60:6.1f} min  (if it has not beaten the "
                     f"linear probe on the inner hold-out for {patience} epoch{'s' * (patience > 1)} in a row)")
    return "time plan (a few batches of each phase timed on this machine):\n" + "\n".join(lines)


class TimeLeft:
    """The time left, for the progress bar: the estimate of the epochs still to come, scaled by how the
    epochs so far compared with their estimate."""

    def __init__(self, estimate: Estimate):
        self.estimate, self.started = estimate, time.perf_counter()
        self.done_estimate = 0.0
        self.first_epoch: int | None = None

    def __call__(self, epoch: int) -> str:
        if self.first_epoch is None:
            self.first_epoch, self.started = epoch, time.perf_counter()
        passed = sum(self.estimate.epoch_seconds.get(e, 0.0) for e in range(self.first_epoch, epoch))
        elapsed = time.perf_counter() - self.started
        pace = elapsed / passed if passed > 0 and elapsed > 0 else 1.0
        left = sum(s for e, s in self.estimate.epoch_seconds.items() if e >= epoch) + self.estimate.tail
        return f", about {_clock(left * pace)} left in the run"


def _clock(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def finish(chosen: Plan, measured: float, epochs_done: int | None = None, kept_probe: bool = False) -> dict:
    """The plan's record with the measured wall time and its ratio to the estimate. A run that ended before
    its last epoch (``epochs_done``: the never-worse rule gave up on fine-tuning, or ``--early-stop``) or
    whose never-worse rule kept the probe (``kept_probe``) also gets the estimate of what ran: the plan's
    total less the epochs that did not run and the final metrics' saving on features."""
    record, estimated = chosen.record, chosen.record["estimated_total_seconds"]
    done = record | {"measured_total_seconds": round(measured, 1),
                     "estimate_over_measured": round(estimated / measured, 3) if measured > 0 else None}
    planned_epochs = max(chosen.estimate.epoch_seconds, default=0)
    saved = chosen.estimate.probe_saves if kept_probe else 0.0
    if epochs_done is not None and (epochs_done < planned_epochs or saved):
        as_run = estimated - saved - sum(s for e, s in chosen.estimate.epoch_seconds.items() if e > epochs_done)
        done |= {"epochs_done": epochs_done, "estimated_as_run_seconds": round(as_run, 1),
                 "estimate_as_run_over_measured": round(as_run / measured, 3) if measured > 0 else None}
    # of the totals the plan printed before training, the one for what happened: every epoch ran, or
    # fine-tuning was given up at its first chance (a later end, e.g. --early-stop, has no printed line)
    printed = estimated if epochs_done is None or epochs_done >= planned_epochs else \
        record.get("estimated_if_given_up_seconds") if epochs_done == record.get("earliest_give_up_epoch") else None
    if printed is not None:
        done |= {"printed_estimate_seconds": printed,
                 "printed_estimate_over_measured": round(printed / measured, 3) if measured > 0 else None}
    return done


def plan_run(setup, model, phases: list[Phase], loaders: Loaders, holdout_images: int, start: float,
             probe_seconds: float | None = None) -> Plan:
    """Measure, choose (under ``--time-budget``), log the plan and store it (plan.json; config.yaml again
    when the budget changed what runs, so that it still repeats the run). ``probe_seconds``: the
    never-worse probe's fit, where it ran before the plan (it then times the head fit)."""
    config = setup.config
    costs = measure(model, phases, loaders, config.train, setup.device, nn.CrossEntropyLoss(),
                    len(setup.source.classes), probe_seconds)
    chosen = make(config, costs, time.perf_counter() - start, linear_layer(model.head) is not None, holdout_images,
                  loaders.test is not None, probe_seconds is not None)
    log.info(describe(chosen))
    if distributed.current().is_main:
        out = Path(config.out)
        if chosen.config != config:
            save_yaml(chosen.config, out / artifact.CONFIG)
        artifact.write_json(out / PLAN_FILE, chosen.record)
    return chosen


def record_measured(out: Path, chosen: Plan | None, measured: float, epochs_done: int | None = None,
                    kept_probe: bool = False) -> None:
    """plan.json again, with the run's measured wall time beside the estimate."""
    if chosen is not None and distributed.current().is_main:
        done = finish(chosen, measured, epochs_done, kept_probe)
        artifact.write_json(out / PLAN_FILE, done)
        as_run = f" ({done['estimated_as_run_seconds'] / 60:.1f} min as it ran: {done['epochs_done']} epochs" \
            f"{', the probe kept' if kept_probe else ''})" if "estimated_as_run_seconds" in done else ""
        log.info("time plan: estimated %.1f min%s, took %.1f min", done["estimated_total_seconds"] / 60, as_run,
                 done["measured_total_seconds"] / 60)
