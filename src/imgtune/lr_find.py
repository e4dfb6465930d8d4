"""The learning-rate finder: ``imgtune lr-find DATA`` and ``imgtune train --lr auto``.

Method: Smith's learning-rate range test (L. N. Smith, "Cyclical Learning Rates for Training Neural
Networks", WACV 2017, section 3.3) run as fastai's ``Learner.lr_find`` runs it: from 1e-7 to 10 in 100
optimizer steps growing exponentially, the training loss smoothed by a debiased exponential moving
average (beta 0.98), stopped once the smoothed loss exceeds 4 times its minimum. The suggestion is
fastai's ``valley`` rule (fastai >= 2.5, ``fastai.callback.schedule.valley``): on the curve without
its first tenth and last five points, the longest subsequence over which the loss keeps falling, and
the learning rate half-way along it (fastai's index: its start + a third + a sixth of its length).

The test trains the strategy's first phase whose learning rate matters (a head fitted by L-BFGS has
none), with its optimizer and parameter groups: the head's rate is the one swept and the body's follows
at ``--backbone-lr-factor`` times it. The model's weights and the random generators are put back
afterwards, so ``train --lr auto`` then trains exactly as ``train --lr <the chosen rate>`` would.
torch-lr-finder (the PyPI package) was looked at: it sets one rate for every parameter group and has no
valley rule, so the few lines of the test are here.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from . import artifact, checkpoint, distributed, figures
from .config import RunConfig, TrainConfig
from .engine import Loaders, head_fit_asked
from .errors import TrainingDiverged, UsageError
from .head_fit import linear_layer
from .inference import autocast, to_channels_last
from .models import Classifier
from .optim import make_optimizer
from .strategies import Phase

log = logging.getLogger(__name__)

AUTO = "auto"  # --lr auto
START_LR, END_LR, ITERATIONS = 1e-7, 10.0, 100
STOP_FACTOR = 4.0  # stop once the smoothed loss exceeds this many times its minimum (fastai)
BETA = 0.98  # smoothing of the recorded loss (fastai's Recorder)
RULE = "valley (fastai)"
JSON, PNG = "lr_find.json", "lr_find.png"


@dataclass
class LrCurve:
    lrs: list[float]  # the head's learning rate at each step
    losses: list[float]  # smoothed training loss after each step
    raw_losses: list[float]
    suggestion: float
    phase: str  # the phase the test trained
    stopped: str  # why the test ended
    rule: str = RULE

    def to_dict(self) -> dict:
        return asdict(self) | {"method": "learning-rate range test (Smith 2017), as fastai's lr_find",
                               "start_lr": START_LR, "end_lr": END_LR}


def provisional(train: TrainConfig) -> TrainConfig:
    """``train`` with a learning rate that :func:`~imgtune.strategies.plan` can compute with (1, so that
    each phase's rates are the multipliers of the head's) while ``--lr auto`` is not chosen yet."""
    return replace(train, lr=1.0) if train.lr == AUTO else train


def swept_phase(train: TrainConfig, phases: list[Phase], model: Classifier, loaders: Loaders) -> Phase | None:
    """The first phase trained by SGD, whose learning rate the test chooses; None when none is."""
    for index, phase in enumerate(phases):
        fitted = head_fit_asked(train, phase, index == len(phases) - 1, loaders) and \
            linear_layer(model.head) is not None
        if not fitted:
            return phase
    return None


def range_test(model: Classifier, phase: Phase, loaders: Loaders, train: TrainConfig, loss_fn: nn.Module,
               device: torch.device, iterations: int = ITERATIONS) -> LrCurve:
    """The range test on ``phase`` (its rates are multipliers of the head's: :func:`provisional`); the
    model's weights, mode and the random generators are restored afterwards."""
    if iterations < 10:
        raise UsageError(f"the range test needs at least 10 steps; got {iterations}")
    saved, rng, frozen = copy.deepcopy(model.state_dict()), checkpoint.capture_rng(), model.body_frozen
    try:
        model.freeze_body(phase.body_frozen)
        net, loader, _ = loaders.for_phase(model, phase)
        optimizer = make_optimizer(model, phase, train)
        lrs, raw, losses, stopped = _sweep(net, loader, optimizer, loss_fn, device, iterations)
    finally:
        model.load_state_dict(saved)
        model.freeze_body(frozen)
        checkpoint.restore_rng(rng)
    if len(losses) < 10:
        raise TrainingDiverged(f"the learning-rate range test stopped after {len(losses)} step(s) ({stopped}): no "
                               "rate to suggest; pass --lr with a number (e.g. 1e-4), and check the data for broken "
                               "or mislabelled images (imgtune doctor)")
    return LrCurve(lrs, losses, raw, suggest(lrs, losses), phase.name, stopped)


def _sweep(net: nn.Module, loader, optimizer, loss_fn, device, iterations: int):
    """One optimizer step per rate, exponentially from START_LR to END_LR: the rates, the raw and the
    smoothed losses, and why it stopped."""
    scales = [group["lr"] for group in optimizer.param_groups]  # the head's is 1 (provisional)
    growth = (END_LR / START_LR) ** (1 / (iterations - 1))
    lrs, raw, losses, best, average = [], [], [], math.inf, 0.0
    net.train()
    batches = _endless(loader)
    for step in range(iterations):
        lr = START_LR * growth ** step
        for group, scale in zip(optimizer.param_groups, scales):
            group["lr"] = lr * scale
        images, targets, _ = next(batches)
        with autocast(device):
            loss = loss_fn(net(to_channels_last(images.to(device))), targets.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = loss.item()
        if not math.isfinite(value):
            return lrs, raw, losses, f"the loss became {value} at lr {lr:.2g}"
        lrs.append(lr)
        raw.append(value)
        average = BETA * average + (1 - BETA) * value
        losses.append(average / (1 - BETA ** (step + 1)))
        best = min(best, losses[-1])
        if losses[-1] > STOP_FACTOR * best:
            return lrs, raw, losses, f"the smoothed loss exceeded {STOP_FACTOR:g} times its minimum at lr {lr:.2g}"
    return lrs, raw, losses, f"the last rate ({END_LR:g})"


def _endless(loader):
    """Batches of ``loader`` over and over (a small training split is shorter than the test)."""
    while True:
        found = False
        for batch in loader:
            if batch is not None:
                found = True
                yield batch
        if not found:
            raise UsageError("the range test found no readable training image")


def suggest(lrs: list[float], losses: list[float]) -> float:
    """fastai's ``valley``: the longest decreasing subsequence of the loss (skipping the first tenth and
    the last five points, as fastai's ``lr_find`` does), and the rate half-way along it (start + len/3 +
    len/6, fastai's index)."""
    skip = len(lrs) // 10
    end = len(lrs) - 5 if len(lrs) - 5 > skip + 2 else len(lrs)
    lrs, losses = lrs[skip:end], losses[skip:end]
    n = len(losses)
    longest = [1] * n
    start = stop = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and longest[i] < longest[j] + 1:
                longest[i] = longest[j] + 1
        if longest[stop] < longest[i]:
            stop, start = i, i - longest[i]
    third = (stop - start) / 3
    return float(lrs[start + int(third) + int(third / 2)])


def write(curve: LrCurve, out: Path) -> dict[str, Path]:
    """``lr_find.json`` (the curve, the rule, the suggestion) and ``lr_find.png`` in ``out``, atomically."""
    files = {"json": out / JSON, "png": out / PNG}
    artifact.atomic_write_bytes(files["png"], figures.lr_find_png(curve.lrs, curve.losses, curve.suggestion,
                                                                  curve.rule))
    artifact.write_json(files["json"], curve.to_dict())
    return files


def _test(config: RunConfig, model: Classifier, phases: list[Phase], loaders: Loaders, device: torch.device,
          class_weights: torch.Tensor | None, iterations: int = ITERATIONS) -> LrCurve | None:
    """The range test on the first phase that uses a rate, with the loss training uses; None when no
    phase does."""
    phase = swept_phase(config.train, phases, model, loaders)
    if phase is None:
        return None
    weight = class_weights.to(device) if class_weights is not None else None
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=config.train.label_smoothing)
    curve = range_test(model, phase, loaders, config.train, loss_fn, device, iterations)
    log.info("learning-rate range test on the %s phase: %d steps, ended at %s; %s suggests lr %.3g",
             curve.phase, len(curve.lrs), curve.stopped, curve.rule, curve.suggestion)
    return curve


def choose(config: RunConfig, model: Classifier, phases: list[Phase], loaders: Loaders, device: torch.device,
           class_weights: torch.Tensor | None) -> tuple[RunConfig, LrCurve | None]:
    """``--lr auto``: the config with the suggested rate (the strategy's default where no phase uses a
    rate: a head fitted by L-BFGS), and the curve (None then)."""
    if distributed.current().enabled:
        raise UsageError("--lr auto under torchrun: run imgtune lr-find DATA first (one process) and pass the "
                         "rate it suggests as --lr")
    curve = _test(config, model, phases, loaders, device, class_weights)
    if curve is None:
        from .presets import STRATEGY_DEFAULTS

        lr = STRATEGY_DEFAULTS[config.train.strategy]["lr"]
        log.info("--lr auto: the head is fitted by L-BFGS, no phase uses a learning rate; recording %g", lr)
        return replace(config, train=replace(config.train, lr=lr)), None
    return replace(config, train=replace(config.train, lr=curve.suggestion)), curve


def run(config: RunConfig, iterations: int = ITERATIONS, progress: bool = True) -> tuple[LrCurve, dict[str, Path]]:
    """``imgtune lr-find``: the range test with the settings ``imgtune train`` would use (strategy, model,
    optimizer, batch size, augmentation), its files written into ``config.out`` (new or empty unless
    ``overwrite``); nothing is trained for good."""
    from .config import resolve
    from .prepare import prepare
    from .training import materials

    if iterations < 10:
        raise UsageError(f"--iterations {iterations}: the range test needs at least 10 steps")
    resolved = resolve(replace(config, train=replace(config.train, lr=AUTO)))  # swept: a given --lr does not apply
    artifact.check_out_dir(resolved.out, resolved.overwrite)  # before any work
    setup = prepare(resolved, progress)
    m = materials(setup)
    curve = _test(setup.config, m.model, m.phases, m.loaders, setup.device, m.weights, iterations)
    if curve is None:
        raise UsageError(f"--strategy {resolved.train.strategy} fits its linear head by L-BFGS (--head-fit "
                         f"{resolved.train.head_fit}): no learning rate is used, so there is none to find; pass "
                         "--head-fit sgd to find the rate of SGD epochs")
    out = artifact.prepare_out_dir(setup.config.out, setup.config.overwrite)
    return curve, write(curve, out)
