"""Everything before training touches the run folder, shared by a new run and a resumed one.

:func:`prepare` checks the settings, opens and checks the data, builds the model (finding its
weights), picks the device, and :func:`finalize` fills every value still left to imgtune (input size,
loader workers, device, class balance, run folder) so that the config saved with the run is the one
that ran: ``imgtune train --config RUN/config.yaml`` repeats it. Any error here stops the run before
anything is written.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from . import artifact, balance, distributed, experiment_log, models, partial, semi_train, sizing
from .artifact import check_writable_folder, default_out_dir
from .cache import check_store, default_cache_dir
from .config import RunConfig, to_dict
from .config_checks import validate
from .data import content
from .data.sources import DataSource, LoaderOptions, ShardSource, open_source, total_images
from .data.unlabelled import Unlabelled
from .errors import DataError, UsageError
from .inference import select_device
from .rank import AUTO, Ranking, choose_model, reason

log = logging.getLogger(__name__)


@dataclass
class Setup:
    """A run ready to train: its final config, data, model and device."""

    config: RunConfig
    source: DataSource
    built: models.BuiltModel
    device: torch.device
    ranking: Ranking | None = None  # --model auto: the ranking the model was chosen from (rank.py)
    unlabelled: Unlabelled | None = None  # --unlabeled: the checked unlabelled images (semi_train.py)
    size: sizing.SizeChoice | None = None  # how the input size was chosen (sizing.py)
    unfreeze: partial.UnfreezeChoice | None = None  # what trains once the body is unfrozen, and why (partial.py)

    def loader_options(self) -> LoaderOptions:
        data = self.config.data
        cache_dir = cache_folder(self.config) if data.cache else None
        return LoaderOptions(data.batch_size // distributed.current().world, data.num_workers,
                             self.config.train.seed, self.config.train.balance == "sampler", cache_dir,
                             data.feature_engine, partial.top_blocks(self.config.train.unfreeze))


def cache_folder(config: RunConfig) -> Path:
    return Path(config.data.cache_dir) if config.data.cache_dir else default_cache_dir()


def prepare(config: RunConfig, progress: bool = True, started_with: dict | None = None) -> Setup:
    """From a resolved config (``config.resolve``) to a :class:`Setup`. ``started_with``: the data
    summary in a resumed run's meta.json, which the data must still match."""
    _check_batch(config)
    if config.data.cache:
        check_writable_folder(cache_folder(config), "cache folder (--cache-dir or $IMGTUNE_CACHE)")
    experiment_log.require(config.train.log)
    seed_everything(config.train.seed + distributed.current().rank)
    data = config.data
    checks = check_store(cache_folder(config)) if data.cache else None
    source = open_source(absolute_source(data.source), data.val_fraction, data.test_fraction, config.train.seed,
                         progress, data.allow_outside_paths, data.extra_labels, checks)
    log_data(source)
    if started_with is not None:
        check_same_data(started_with, data.source, source, Path(config.out) / artifact.DATA_FILES)
    config = _with_balance(config, source)
    source.check(config)
    unlabelled = semi_train.open_for(source, config, checks, progress)
    ranking = None
    if config.model.name == AUTO:  # rank the candidates on this data; the config then names the chosen one
        config, ranking = choose_model(config, source, progress)
        seed_everything(config.train.seed + distributed.current().rank)  # as if the model had been named
    built = models.create(config.model, len(source.classes), offline=config.offline)
    built, size = sizing.apply(config, source.image_sides(), built)
    device = distributed.device_for(distributed.current(), select_device(config.train.device))
    unfreeze = partial.choose(config.train, built.model.body, built.preprocessing.img_size, device,
                              isinstance(source, ShardSource), source.size("train"))
    if unfreeze.method == partial.AUTO and config.train.strategy != "linear-probe":  # the body never trains there
        log.info("fine-tuning: %s", unfreeze.reason)
    config = replace(config, train=replace(config.train, unfreeze=unfreeze.unfreeze))
    return Setup(finalize(config, source, built, device), source, built, device, ranking, unlabelled, size,
                 unfreeze)


def finalize(config: RunConfig, source: DataSource, built: models.BuiltModel, device: torch.device) -> RunConfig:
    """Fill what was left to imgtune with what will run: the data's absolute location, the model's input
    size, loader workers sized to the data and device, the device, the class balance (already chosen),
    and the run folder (the data and --extra-labels stored as absolute paths). Idempotent: a finalized config comes back unchanged."""
    data, model, train = config.data, config.model, config.train
    workers = data.num_workers if data.num_workers is not None else auto_workers(total_images(source), device)
    out = config.out if config.out is not None else distributed.broadcast(str(default_out_dir()))
    config = replace(config, out=out,
                     data=replace(data, source=absolute_source(data.source), num_workers=workers,
                                  extra_labels=data.extra_labels and absolute_source(data.extra_labels),
                                  unlabeled=data.unlabeled and absolute_source(data.unlabeled)),
                     model=replace(model, img_size=built.preprocessing.img_size),
                     train=replace(train, device=device.type))
    validate(config)
    return config


def absolute_source(source: str) -> str:
    """Stored absolute, so that ``imgtune evaluate RUN`` finds the data from any working directory."""
    return source if source.startswith(("http://", "https://")) else str(Path(source).resolve())


def auto_workers(num_images: int, device: torch.device) -> int:
    """On a CPU the model's own threads use every core and cached pixels are cheap to read, so loading
    stays in the main process; a GPU is fed by worker processes (when there is enough data for them
    to pay for their start-up)."""
    if device.type == "cpu" or num_images < 256:
        return 0
    return min(8, os.cpu_count() or 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _check_batch(config: RunConfig) -> None:
    world = distributed.current().world
    if config.data.batch_size % world:
        raise UsageError(f"--batch-size {config.data.batch_size} is the global batch; with {world} processes it "
                         f"must be a multiple of {world}")


def _with_balance(config: RunConfig, source: DataSource) -> RunConfig:
    """``--balance`` from the training split's class counts; the choice is logged and saved."""
    choice, reason = balance.choose(config.train.balance, source.counts()["train"])
    log.info("class balance: %s", reason)
    return replace(config, train=replace(config.train, balance=choice))


def check_same_data(started_with: dict, location: str, source: DataSource, files_then: Path) -> None:
    """A checkpoint's position in an epoch means nothing if the images changed: the classes and counts,
    then the content (``started_with["content"]``, the split digests recorded when the run started, and
    ``files_then``, its per-file list, which names the changed files; see ``data/content.py``)."""
    then, now = (started_with["classes"], started_with["counts"]), (source.classes, source.counts())
    if then != now:
        raise DataError(f"the data in {location} changed since the run started (then {_sizes(*then)}; now "
                        f"{_sizes(*now)}); a run can only be resumed on the data it started on")
    content.check_same(started_with.get("content"), source.content(), location, files_then, source.files())


def _sizes(classes: list[str], counts: dict[str, dict[str, int]]) -> str:
    return f"{len(classes)} classes, " + ", ".join(f"{name} {sum(c.values())}" for name, c in counts.items())


def run_meta(setup: Setup, requested: RunConfig | None = None) -> dict:
    """meta.json: what a run folder's readers need besides config.yaml; ``requested``, the config as
    the user gave it (before :func:`finalize`), when it differs."""
    config, built = setup.config, setup.built
    meta = {
        "classes": setup.source.classes,
        "model": {"name": built.spec.name, "library": built.spec.library, "requested": config.model.name,
                  "num_features": built.model.num_features, "body": config.model.body,
                  "head": config.model.head},
        "weights": built.weights.describe() if built.weights else None,
        "preprocessing": built.preprocessing.to_dict(),
        "strategy": config.train.strategy,
        "data": setup.source.summary(),
        "content": setup.source.content(),
        "config": to_dict(config),
        "versions": artifact.versions(),
    }
    if requested is not None and requested != config:
        meta["requested_config"] = to_dict(requested)
    if setup.size is not None:
        meta["input_size"] = setup.size.to_dict()
    if setup.unfreeze is not None:
        meta["unfreeze"] = setup.unfreeze.to_dict()
    if setup.ranking is not None:
        meta["model"].update(requested=AUTO, chosen_by=chosen_by(setup.ranking))
    return meta


def chosen_by(ranking: Ranking) -> dict:
    """meta.json's record of a ``--model auto`` choice; the whole ranking is the run's rank.json."""
    return {"method": AUTO, "reason": reason(ranking), "ranking": artifact.RANK,
            "budget_ms": ranking.settings["budget_ms"], "candidates": ranking.settings["candidates"],
            "ranked": [r.model for r in ranking.ranked], "skipped": [s.model for s in ranking.skipped]}


def log_data(source: DataSource) -> None:
    counts = source.counts()
    sizes = ", ".join(f"{name} {sum(c.values())}" for name, c in counts.items())
    log.info("data (%s): %d classes (%s); %s; formats: %s; skipped %d unreadable file(s)", source.layout,
             len(source.classes), ", ".join(source.classes[:10]) + (" ..." if len(source.classes) > 10 else ""),
             sizes, source.summary()["formats_text"], len(source.skipped))
