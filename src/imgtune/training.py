"""``imgtune.train``: from a config to a trained run folder, read top to bottom.

1. resolve the config; 2. prepare (``prepare.py``: check the data and the settings, build the model,
pick the device, finalize the config; errors stop here, before anything is written); 3. create the
run folder, held against other writers until the run ends (``runlock``), and write config.yaml,
meta.json and the list of data files; 4. train the strategy's phases, writing metrics.csv and a
checkpoint after every epoch; 5. save the weights (their SHA-256 into meta.json) and the final
metrics. :func:`resume` holds the run folder, reads the config from it and the newest usable
checkpoint instead of 1 and 3, and continues at 4 where the checkpoint left off.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import (activations, artifact, balance, checkpoint, distributed, experiment_log, lr_find, never_worse, partial,
               runlock, timeplan)
from .config import RunConfig, load_yaml, resolve, save_yaml, to_dict
from .data import content
from .data.sources import build_loaders
from .engine import Loaders, fit
from .errors import DataError, ImgtuneError, TrainingDiverged, UsageError
from .interrupt import StopRequest
from .models import Classifier
from .prepare import Setup, prepare, run_meta
from .results import final_metrics
from .semi_train import with_pseudo_labels
from .strategies import Phase, plan, probe_only

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict
    data: dict
    seconds: float


def train(config: RunConfig, progress: bool = True) -> TrainResult:
    """Train and write the run folder. Under torchrun (``WORLD_SIZE`` > 1) every rank calls this; they
    join one process group (``imgtune.distributed``) and rank 0 writes."""
    with distributed.session(config.train.device):
        start = time.perf_counter()
        resolved = resolve(config)
        distributed.on_main(artifact.check_out_dir, resolved.out, resolved.overwrite)  # before any work
        setup = prepare(resolved, progress)
        with contextlib.ExitStack() as lock:  # rank 0 holds the run folder until the run ends
            distributed.on_main(_start_run_folder, setup, config, lock)
            return _train_and_save(setup, start)


def _start_run_folder(setup: Setup, requested: RunConfig, lock: contextlib.ExitStack) -> None:
    out = artifact.prepare_out_dir(setup.config.out, setup.config.overwrite, lock)
    save_yaml(setup.config, out / artifact.CONFIG)
    if setup.ranking is not None:  # --model auto: the ranking it chose from, before meta.json points to it
        artifact.write_json(out / artifact.RANK, setup.ranking.to_dict())
    artifact.write_json(out / artifact.META, run_meta(setup, requested))
    _write_data_files(out, setup)


def _write_data_files(out: Path, setup: Setup) -> None:
    """The per-file list a resume names changed images from (``data/content.py``)."""
    files = setup.source.files()
    if files is not None:
        artifact.atomic_write_bytes(out / artifact.DATA_FILES, content.encode_files(files))


def resume(run_dir: str | Path, epochs: int | None = None, progress: bool = True) -> TrainResult:
    """Continue the run in ``run_dir`` from its newest usable checkpoint, with its saved config.
    ``epochs`` may only raise the run's epoch count (the extra epochs go to the last phase), which also
    trains a finished run further."""
    run_dir = Path(run_dir)
    with distributed.session(_saved_device(run_dir)), contextlib.ExitStack() as lock:
        start = time.perf_counter()
        config = _resumed_config(run_dir, epochs)
        distributed.on_main(lambda: lock.enter_context(runlock.hold(run_dir, "resume")))
        found = checkpoint.newest_usable(run_dir / checkpoint.FOLDER)
        _check_resumable(found, config, epochs)
        meta = json.loads((run_dir / artifact.META).read_text())
        setup = prepare(config, progress, started_with=meta["data"] | {"classes": meta["classes"],
                                                                       "content": meta.get("content")})
        distributed.barrier()  # every rank has read its checkpoint before rank 0 moves unusable ones away
        distributed.on_main(_prepare_resume, run_dir, setup, found, meta)
        log.info("resuming %s from %s", run_dir, found.path)
        return _train_and_save(setup, start, found.payload)


def _saved_device(run_dir: Path) -> str:
    try:
        return load_yaml(run_dir / artifact.CONFIG).train.device
    except ImgtuneError:
        return "auto"  # _resumed_config says what is wrong


def _prepare_resume(run_dir: Path, setup: Setup, found: checkpoint.Found, previous: dict) -> None:
    for path, _ in found.rejected:  # out of the way of the checkpoints the resumed run writes
        path.replace(path.with_name(path.name + ".unusable"))
    checkpoint.remove_partial(run_dir / checkpoint.FOLDER)
    save_yaml(setup.config, run_dir / artifact.CONFIG)
    meta = run_meta(setup)
    if previous.get("requested_config") is not None:
        meta["requested_config"] = previous["requested_config"]
    if "input_size" in previous:  # the size the run started with was chosen then (sizing.py)
        meta["input_size"] = previous["input_size"]
    if "chosen_by" in previous.get("model", {}):  # a --model auto run keeps the record of its choice
        meta["model"].update(requested=previous["model"]["requested"], chosen_by=previous["model"]["chosen_by"])
    artifact.write_json(run_dir / artifact.META, meta)
    _write_data_files(run_dir, setup)
    artifact.remove_final_results(run_dir)
    (run_dir / artifact.METRICS_CSV).unlink(missing_ok=True)  # rows after the checkpoint go
    artifact.write_metrics_csv(run_dir / artifact.METRICS_CSV, found.payload["rows"])


def _resumed_config(run_dir: Path, epochs: int | None) -> RunConfig:
    path = run_dir / artifact.CONFIG
    if not path.is_file() or not (run_dir / artifact.META).is_file():
        raise DataError(f"{run_dir} is not an imgtune run folder (no {artifact.CONFIG} or {artifact.META}); pass "
                        "the --out folder of the run to continue")
    config = replace(load_yaml(path), out=str(run_dir))
    if config.train.unfreeze == partial.AUTO:  # saved before --unfreeze existed (a run saves what ran): the whole body
        config = replace(config, train=replace(config.train, unfreeze="all"))
    if epochs is not None:
        if epochs < config.train.epochs:
            raise UsageError(f"--epochs {epochs}: {run_dir} was set to train {config.train.epochs} epochs; with "
                             "--resume, --epochs may only raise that number")
        config = replace(config, train=replace(config.train, epochs=epochs))
    return resolve(config)


def _check_resumable(found: checkpoint.Found, config: RunConfig, epochs: int | None) -> None:
    payload = found.payload
    done = payload["epoch"] - (not payload["epoch_done"])
    if payload["stopped_early"] and epochs is not None:
        why = "the never-worse rule gave up on fine-tuning" if payload.get("gave_up") else "--early-stop"
        raise UsageError(f"the run stopped early after epoch {done} ({why}): it is finished, and --epochs "
                         "does not continue it (--resume without --epochs writes its results again)")
    if done > config.train.epochs:
        raise DataError(f"{found.path} is past epoch {config.train.epochs}, the run's last: config.yaml does "
                        "not match the checkpoints")
    if payload["stopped_early"]:
        log.warning("the run stopped early after epoch %d (%s); writing its results again", done,
                    "the never-worse rule gave up on fine-tuning" if payload.get("gave_up") else "--early-stop")
    elif payload["epoch_done"] and done == config.train.epochs:
        log.warning("the run has trained all its %d epochs; writing its results again (pass a higher --epochs "
                    "to train it further)", done)


def _auto_lr(setup: Setup, model, phases, loaders, weights) -> tuple[RunConfig, list]:
    """``--lr auto``: the range test's rate, saved in config.yaml (what runs; meta.json's requested_config
    keeps "auto"), with lr_find.json and lr_find.png beside it."""
    config, curve = lr_find.choose(setup.config, model, phases, loaders, setup.device, weights)
    out = Path(config.out)
    if curve is not None:
        lr_find.write(curve, out)
    save_yaml(config, out / artifact.CONFIG)
    meta = json.loads((out / artifact.META).read_text())
    meta["config"] = to_dict(config)
    meta["lr_find"] = {"requested": lr_find.AUTO, "chosen": config.train.lr,
                       "rule": curve.rule if curve else "no phase uses a rate: the strategy's default",
                       "curve": lr_find.JSON if curve else None}
    artifact.write_json(out / artifact.META, meta)
    return config, plan(config.train)


def _whole_training_split(setup: Setup, m: Materials, phases: list[Phase]) -> Loaders:
    """The loaders of a run that dropped its fine-tuning before it started (the never-worse rule's skip,
    ``--time-budget``'s floor): the probe trains on the whole training split, hold-out included, as
    linear-probe's does (the features of the hold-out come from the cache), so config.yaml's linear-probe
    resumes as what ran."""
    c = setup.config
    return build_loaders(never_worse.uncarved(m.source), setup.built, phases, c.data.augment, c.model.body,
                         setup.loader_options(), setup.device)


def _without_fine_tuning(config: RunConfig, why: str, main: bool) -> tuple[RunConfig, list[Phase]]:
    """The never-worse rule's skip (``Referee.nothing_to_win``): the run becomes ``linear-probe`` for the
    frozen phase's epochs, as ``--time-budget`` makes it when fine-tuning does not fit, and config.yaml
    says so (a resume then repeats what ran)."""
    train = probe_only(config.train)
    config = replace(config, train=train)
    log.warning("never-worse rule: %s; fine-tuning is skipped and the probe kept (--never-worse-patience 0 "
                "fine-tunes anyway)", why)
    if main:
        save_yaml(config, Path(config.out) / artifact.CONFIG)
    return config, plan(train)


def _diverged(exc: TrainingDiverged, out: Path, config: RunConfig) -> TrainingDiverged:
    """The engine's finding (epoch, batch, what is not finite) with what was kept and what to try."""
    kept = checkpoint.listed(out / checkpoint.FOLDER)
    last = f"the newest checkpoint, {kept[-1]}, is kept (no checkpoint with NaN or infinite weights was written)" \
        if kept else "no checkpoint had been written yet"
    return TrainingDiverged(
        f"training diverged in {exc}; {artifact.WEIGHTS} was not written and {last}. Try a lower learning rate "
        f"(--lr {config.train.lr:g} now: 3 to 10 times lower, or --warmup-epochs 1), and check the data for "
        "broken or mislabelled images (imgtune doctor)")


@dataclass
class Materials:
    """What training (and the learning-rate range test) starts from."""

    model: Classifier  # on its device
    phases: list[Phase]  # the strategy's
    loaders: Loaders  # with the pseudo-labelled images of --unlabeled, without the inner hold-out
    weights: torch.Tensor | None  # class weights of the loss (--balance weights)
    semi: dict | None  # the semi-supervised report for metrics.json (None without --unlabeled)
    judge: never_worse.Referee | None  # the never-worse rule, with its inner hold-out of the training split
    source: object = None  # what the loaders read (the hold-out carved, pseudo-labelled images added)


def materials(setup: Setup) -> Materials:
    """The model, phases and loaders: the inner hold-out of the never-worse rule is carved from the
    labelled training images first, so that pseudo-labels (chosen without it) never enter it."""
    config, device = setup.config, setup.device
    model = distributed.sync_batchnorm(setup.built.model).to(device, memory_format=torch.channels_last)
    phases = plan(lr_find.provisional(config.train))
    options = setup.loader_options()
    lower = activations.Lower(setup.built, config.model.body, options) \
        if options.unfreeze_top is not None and not all(p.body_frozen for p in phases) else None
    hold = never_worse.carve(setup.source, config.train, phases, model.head)
    never_worse.remember_body(hold, model, setup.built, config.model.body, options, device, lower)
    source, semi_report = with_pseudo_labels(hold.source if hold else setup.source, setup.unlabelled, config,
                                             setup.built, options, device)
    loaders = build_loaders(source, setup.built, phases, config.data.augment, config.model.body, options, device,
                            lower)
    weights = balance.class_weights(loaders.train.dataset.targets(), len(setup.source.classes)) \
        if config.train.balance == "weights" else None
    judge = never_worse.referee(hold, model, setup.built, loaders, options, config.train, device, weights)
    return Materials(model, phases, loaders, weights, semi_report, judge, source)


def _train_and_save(setup: Setup, start: float, resume: dict | None = None) -> TrainResult:
    config, built, device = setup.config, setup.built, setup.device
    out, main = Path(config.out), distributed.current().is_main
    m = materials(setup)
    model, phases, loaders, weights, judge = m.model, m.phases, m.loaders, m.weights, m.judge
    skipped = judge.nothing_to_win() if judge is not None else None  # fits the probe (it times the head fit)
    if skipped is not None:  # before --lr auto, which would range-test a fine-tuning that will not run
        config, phases = _without_fine_tuning(config, skipped, main)
        loaders = _whole_training_split(setup, m, phases)
    if config.train.lr == lr_find.AUTO:
        config, phases = _auto_lr(replace(setup, config=config), model, phases, loaders, weights)
    log.info("training %s with strategy %s on %s (run folder %s)", built.spec, config.train.strategy, device, out)
    held_out = judge.hold.images if judge else 0
    planned = None
    if config.train.plan and resume is None:
        if judge is not None:  # the probe fitted now times the head fit for the plan
            judge.probe_figures()
        planned = timeplan.plan_run(replace(setup, config=config), model, phases, loaders, held_out, start,
                                    judge.fit_seconds if judge is not None else None)
    if planned is not None:  # --time-budget may have chosen fewer epochs or linear-probe
        if judge is not None and skipped is None and planned.phases[-1].body_frozen:
            loaders = _whole_training_split(setup, m, planned.phases)
        config, phases = planned.config, planned.phases
    first_epoch = len(resume["rows"]) + 1 if resume else 1
    with StopRequest() as stop, experiment_log.epoch_logger(config.train.log, out, first_epoch, main) as extra:
        def on_epoch(result, rows: list[dict]) -> None:
            if main:
                artifact.write_metrics_csv(out / artifact.METRICS_CSV, rows)
                extra(result.epoch, result.row())

        hooks = checkpoint.Checkpointer(out, config.train.checkpoint_every, stop)
        progress, diverged = None, None
        try:
            progress = fit(model, phases, loaders, config.train, device, len(setup.source.classes), on_epoch,
                           weights, hooks, resume, timeplan.TimeLeft(planned.estimate) if planned else None,
                           referee=judge if judge is not None and judge.patience else None)
        except TrainingDiverged as exc:
            if judge is None:  # nothing to fall back on
                raise _diverged(exc, out, config) from exc
            diverged = str(exc)  # the never-worse rule keeps the probe, which does not depend on this training
    stopper = progress.stopper if progress is not None else None
    if stopper is not None and config.train.keep == "best" and stopper.best_state is not None:
        log.warning("keeping the weights of epoch %d, chosen on val %s: the val metrics below are optimistic; "
                    "trust the test split (--test-fraction) for an unbiased figure", stopper.best_epoch,
                    config.train.monitor)
        model.load_state_dict(stopper.best_state)
    selection = never_worse.finish(judge, model, phases, progress.epochs_done if progress else 0,
                                   progress is not None and progress.gave_up, diverged, config.train.lr, skipped)
    kept_probe = selection is not None and selection["kept"] == "probe"  # the pretrained body, a refitted head
    final_frozen = (phases[-1].body_frozen or kept_probe) and loaders.frozen_val is not None
    model.freeze_body(False)
    if main:
        artifact.save_weights(model.cpu(), out / artifact.WEIGHTS)
    model.to(device)
    metrics = final_metrics(model, loaders, setup.source.classes, device, config, stopper, final_frozen)
    if m.semi is not None:
        metrics["semi"] = m.semi
    if selection is not None:
        metrics["selection"] = selection
    if main:
        if metrics["calibration"] is not None:
            artifact.write_json(out / artifact.CALIBRATION, metrics["calibration"])
        artifact.write_json(out / artifact.METRICS_JSON, metrics)
    timeplan.record_measured(out, planned, time.perf_counter() - start, progress.epochs_done if progress else None,
                             kept_probe)
    distributed.barrier()
    return TrainResult(out, metrics, setup.source.summary(), time.perf_counter() - start)
