"""``imgtune.train``: from a dataset and a config to a run folder, read top to bottom.

1. resolve the config; 2. find, check and split the data (errors stop here, before anything is
written); 3. build the model and find its weights (likewise); 4. create the run folder; 5. train the
strategy's phases, writing metrics.csv and a checkpoint after every epoch; 6. save weights and the
final metrics. :func:`resume` replaces 1 and 4 by reading the run folder's config.yaml and newest
usable checkpoint, and continues at 5 where the checkpoint left off.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from . import artifact, balance, calibration, checkpoint, distributed, experiment_log, features, models
from .config import RunConfig, load_yaml, resolve, save_yaml, to_dict
from .data import load_splits
from .data.dataset import ImageDataset, make_loader
from .data.duplicates import exact_groups, leaks_into
from .data.sampler import evaluation_sampler
from .data.scan import DataSplits, Sample
from .data.shards import ShardSplits, is_shards, load_manifest, refuse_for_streams, stream_loader
from .data.transforms import eval_transform, train_transform
from .cache import default_cache_dir, pixel_store
from .engine import Loaders, fit, predict_probs, select_device
from .errors import DataError, ImgtuneError, UsageError
from .evaluation import full_report
from .interrupt import StopRequest
from .strategies import plan

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict
    data: dict
    seconds: float


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def auto_workers(num_images: int, device: torch.device) -> int:
    """On a CPU the model's own threads use every core and cached pixels are cheap to read, so loading
    stays in the main process; a GPU is fed by worker processes (when there is enough data for them
    to pay for their start-up)."""
    if device.type == "cpu" or num_images < 256:
        return 0
    return min(8, os.cpu_count() or 1)


def train(config: RunConfig, progress: bool = True) -> TrainResult:
    """Train and write the run folder. Under torchrun (``WORLD_SIZE`` > 1) every rank calls this; they
    join one process group (``imgtune.distributed``) and rank 0 writes."""
    with distributed.session(config.train.device):
        return _train(config, progress)


def _train(config: RunConfig, progress: bool) -> TrainResult:
    start = time.perf_counter()
    config = resolve(config)
    # stored absolute, so that `imgtune evaluate RUN` finds the data from any working directory
    if not config.data.source.startswith(("http://", "https://")):
        config = replace(config, data=replace(config.data, source=str(Path(config.data.source).resolve())))
    _check_batch(config)
    experiment_log.require(config.train.log)
    seed_everything(config.train.seed + distributed.current().rank)
    splits = load_data(config, progress)
    _log_data(splits)
    if not isinstance(splits, ShardSplits):  # shards were checked when `imgtune shard` wrote them
        check_duplicates(splits, config.data.source, config.data.allow_leakage)
    config = _choose_balance(config, splits)
    if isinstance(splits, ShardSplits):
        refuse_for_streams(config.train.balance, config.train.checkpoint_every)
    built = models.create(config.model, len(splits.classes), offline=config.offline)
    device = distributed.device_for(distributed.current(), select_device(config.train.device))
    out = distributed.on_main(artifact.prepare_out_dir, config.out, config.overwrite)
    config = replace(config, out=str(out))
    distributed.on_main(_write_start, config, built, splits)
    return _train_and_save(config, splits, built, device, start)


def load_data(config: RunConfig, progress: bool = True) -> DataSplits | ShardSplits:
    """A folder or CSV (checked and split), or the manifest of WebDataset shards (streamed)."""
    source = config.data.source
    if is_shards(source):
        return load_manifest(source)
    return load_splits(source, config.data.val_fraction, config.data.test_fraction, config.train.seed, progress)


def _write_start(config: RunConfig, built: models.BuiltModel, splits: DataSplits) -> None:
    out = Path(config.out)
    save_yaml(config, out / artifact.CONFIG)
    artifact.write_json(out / artifact.META, _meta(config, built, splits))


def _check_batch(config: RunConfig) -> None:
    world = distributed.current().world
    if config.data.batch_size % world:
        raise UsageError(f"--batch-size {config.data.batch_size} is the global batch; with {world} processes it "
                         f"must be a multiple of {world}")


def resume(run_dir: str | Path, epochs: int | None = None, progress: bool = True) -> TrainResult:
    """Continue the run in ``run_dir`` from its newest usable checkpoint, with its saved config.
    ``epochs`` may only raise the run's epoch count (the extra epochs go to the last phase), which also
    trains a finished run further."""
    with distributed.session(_saved_device(Path(run_dir))):
        return _resume(Path(run_dir), epochs, progress)


def _saved_device(run_dir: Path) -> str:
    try:
        return load_yaml(run_dir / artifact.CONFIG).train.device
    except ImgtuneError:
        return "auto"  # _resumed_config says what is wrong


def _resume(run_dir: Path, epochs: int | None, progress: bool) -> TrainResult:
    start = time.perf_counter()
    run_dir = Path(run_dir)
    config = _resumed_config(run_dir, epochs)
    found = checkpoint.newest_usable(run_dir / checkpoint.FOLDER)
    _check_resumable(found, config, epochs)
    _check_batch(config)
    experiment_log.require(config.train.log)
    seed_everything(config.train.seed + distributed.current().rank)
    splits = load_data(config, progress)
    _log_data(splits)
    _check_same_data(run_dir, config.data.source, splits)
    built = models.create(config.model, len(splits.classes), offline=config.offline)
    device = distributed.device_for(distributed.current(), select_device(config.train.device))
    distributed.barrier()  # every rank has read its checkpoint before rank 0 moves unusable ones away
    distributed.on_main(_prepare_resume, run_dir, config, built, splits, found)
    log.info("resuming %s from %s", run_dir, found.path)
    return _train_and_save(config, splits, built, device, start, found.payload)


def _prepare_resume(run_dir: Path, config: RunConfig, built, splits: DataSplits, found) -> None:
    for path, _ in found.rejected:  # out of the way of the checkpoints the resumed run writes
        path.replace(path.with_name(path.name + ".unusable"))
    checkpoint.remove_partial(run_dir / checkpoint.FOLDER)
    save_yaml(config, run_dir / artifact.CONFIG)
    artifact.write_json(run_dir / artifact.META, _meta(config, built, splits))
    artifact.remove_final_results(run_dir)
    (run_dir / artifact.METRICS_CSV).unlink(missing_ok=True)  # rows after the checkpoint go
    artifact.write_metrics_csv(run_dir / artifact.METRICS_CSV, found.payload["rows"])


def _resumed_config(run_dir: Path, epochs: int | None) -> RunConfig:
    path = run_dir / artifact.CONFIG
    if not path.is_file():
        raise DataError(f"{run_dir} is not an imgtune run folder (no {artifact.CONFIG}); pass the --out folder "
                        "of the run to continue")
    config = replace(load_yaml(path), out=str(run_dir))
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
        raise UsageError(f"the run stopped early after epoch {done} (--early-stop): it is finished, and --epochs "
                         "does not continue it (--resume without --epochs writes its results again)")
    if done > config.train.epochs:
        raise DataError(f"{found.path} is past epoch {config.train.epochs}, the run's last: config.yaml does "
                        "not match the checkpoints")
    if payload["stopped_early"]:
        log.warning("the run stopped early after epoch %d (--early-stop); writing its results again", done)
    elif payload["epoch_done"] and done == config.train.epochs:
        log.warning("the run has trained all its %d epochs; writing its results again (pass a higher --epochs "
                    "to train it further)", done)


def _check_same_data(run_dir: Path, source: str, splits: DataSplits) -> None:
    """A checkpoint's position in an epoch means nothing if the images changed."""
    meta = json.loads((run_dir / artifact.META).read_text())
    then, now = (meta["classes"], meta["data"]["counts"]), (splits.classes, splits.counts())
    if then != now:
        raise DataError(f"the data in {source} changed since the run started (then {_sizes(*then)}; now "
                        f"{_sizes(*now)}); a run can only be resumed on the data it started on")


def _sizes(classes: list[str], counts: dict[str, dict[str, int]]) -> str:
    return f"{len(classes)} classes, " + ", ".join(f"{name} {sum(c.values())}" for name, c in counts.items())


def _train_and_save(config: RunConfig, splits: DataSplits, built: models.BuiltModel, device, start: float,
                    resume: dict | None = None) -> TrainResult:
    out = Path(config.out)
    model = distributed.sync_batchnorm(built.model).to(device, memory_format=torch.channels_last)
    phases = plan(config.train)
    loaders = _loaders(config, splits, built, phases, device)
    rows: list[dict] = list(resume["rows"]) if resume else []
    main = distributed.current().is_main

    log.info("training %s with strategy %s on %s (run folder %s)", built.spec, config.train.strategy, device, out)
    weights = balance.class_weights(loaders.train.dataset.targets(), len(splits.classes)) \
        if config.train.balance == "weights" else None
    with StopRequest() as stop, experiment_log.epoch_logger(config.train.log, out, len(rows) + 1, main) as extra:
        def on_epoch(result) -> None:
            rows.append(result.row())
            if main:
                artifact.write_metrics_csv(out / artifact.METRICS_CSV, rows)
                extra(result.epoch, result.row())

        hooks = checkpoint.Checkpointer(out, config.train.checkpoint_every, stop)
        stopper = fit(model, phases, loaders, config.train, device, len(splits.classes), on_epoch, weights,
                      hooks, resume).stopper
    if config.train.keep == "best" and stopper.best_state is not None:
        log.warning("keeping the weights of epoch %d, chosen on val %s: the val metrics below are optimistic; "
                    "trust the test split (--test-fraction) for an unbiased figure", stopper.best_epoch,
                    config.train.monitor)
        model.load_state_dict(stopper.best_state)
    final_frozen = phases[-1].body_frozen and loaders.frozen_val is not None
    model.freeze_body(False)
    if main:
        artifact.save_weights(model.cpu(), out / artifact.WEIGHTS)
    model.to(device)

    metrics = _final_metrics(model, loaders, splits, device, config, stopper, final_frozen)
    if main:
        if metrics["calibration"] is not None:
            artifact.write_json(out / artifact.CALIBRATION, metrics["calibration"])
        artifact.write_json(out / artifact.METRICS_JSON, metrics)
    distributed.barrier()
    return TrainResult(out, metrics, splits.summary(), time.perf_counter() - start)


def _loaders(config: RunConfig, splits: DataSplits, built: models.BuiltModel, phases: list, device) -> Loaders:
    """Image loaders (reading cached pixels when the backbone trains), plus loaders of cached features
    for the phases where the backbone is frozen."""
    workers = config.data.num_workers
    if workers is None:
        total = sum(map(splits.size, splits.urls)) if isinstance(splits, ShardSplits) else len(splits.samples)
        workers = auto_workers(total, device)
    bs = config.data.batch_size // distributed.current().world  # the global batch, split across ranks
    seed, classes, pre = config.train.seed, splits.classes, built.preprocessing
    cache_dir = Path(config.data.cache_dir) if config.data.cache_dir else default_cache_dir()
    use_disk = config.data.cache
    pixels = pixel_store(cache_dir, pre.resize_size, pre.interpolation) \
        if use_disk and not all(p.body_frozen for p in phases) else None

    balanced = config.train.balance == "sampler"
    if isinstance(splits, ShardSplits):
        return _stream_loaders(config, splits, built, phases, device, bs, workers)

    def images(name: str, transform, shuffle: bool):
        members = splits.split(name)
        dataset = ImageDataset(members, classes, transform, draft_size=pre.resize_size, pixels=pixels,
                               preprocessing=pre)
        sampler = balance.balanced_sampler(dataset.targets(), len(classes), seed) if shuffle and balanced else \
            None if shuffle else evaluation_sampler(len(dataset))
        return make_loader(dataset, bs, shuffle, workers, seed, drop_last=shuffle and _drop_last(len(members), bs),
                           sampler=sampler)

    loaders = Loaders(images("train", train_transform(pre, config.data.augment), True),
                      images("val", eval_transform(pre), False))
    loaders.test = images("test", eval_transform(pre), False) if splits.split("test") else None
    if any(p.body_frozen for p in phases):
        store = features.store_for(built, config.model.body, cache_dir) if use_disk and built.weights else None
        names = ("train", "val", "test") if phases[-1].body_frozen else ("train", "val")  # test: final metrics
        sets = {name: _shared_features(built, splits.split(name), classes, store, device, bs, workers, name)
                for name in names if splits.split(name)}
        targets = sets["train"].targets
        sampler = balance.balanced_sampler(targets, len(classes), seed) if balanced else None
        loaders.frozen_train = sets["train"].loader(bs, True, seed, _drop_last(len(targets), bs), sampler)
        loaders.frozen_val = _frozen_eval(sets["val"], bs, seed)
        loaders.frozen_test = _frozen_eval(sets["test"], bs, seed) if "test" in sets else None
    return loaders


def _stream_loaders(config: RunConfig, splits: ShardSplits, built, phases, device, bs: int, workers: int) -> Loaders:
    """Loaders reading WebDataset shards; while the backbone is frozen, its features of each split are
    computed once by streaming the split (kept in memory: the disk feature cache is keyed by files)."""
    pre, seed = built.preprocessing, config.train.seed

    def stream(name: str, transform, shuffle: bool):
        return stream_loader(splits, name, transform, bs, shuffle, workers, seed, pre.resize_size)

    loaders = Loaders(stream("train", train_transform(pre, config.data.augment), True),
                      stream("val", eval_transform(pre), False))
    loaders.test = stream("test", eval_transform(pre), False) if "test" in splits.urls else None
    if any(p.body_frozen for p in phases):
        names = [n for n in ("train", "val", "test") if n in splits.urls]
        sets = {n: features.from_stream(built, stream(n, eval_transform(pre), False), device, f"{n} features")
                for n in names}
        loaders.frozen_train = sets["train"].loader(bs, True, seed, _drop_last(len(sets["train"].targets), bs))
        loaders.frozen_val = _frozen_eval(sets["val"], bs, seed)
        loaders.frozen_test = _frozen_eval(sets["test"], bs, seed) if "test" in sets else None
    return loaders


def _frozen_eval(found: features.FeatureSet, batch_size: int, seed: int):
    return found.loader(batch_size, False, seed, sampler=evaluation_sampler(len(found.targets)))


def _shared_features(built, samples, classes, store, device, batch_size, workers, name) -> features.FeatureSet:
    """Features of a split. In distributed training with the disk cache, each rank first computes its
    share into the cache, so the work is split and nobody waits for one rank computing everything."""
    ctx = distributed.current()
    if ctx.enabled and store is not None:
        features.extract(built, samples[ctx.rank::ctx.world], classes, store, device, batch_size, workers,
                         description=f"{name} features (share of rank {ctx.rank})")
        distributed.barrier()
    return features.extract(built, samples, classes, store, device, batch_size, workers,
                            description=f"{name} features")


def check_duplicates(splits: DataSplits, source: str = "DATA", allow_leakage: bool = False) -> None:
    """The cheap checks before training: the same file in two splits (leakage) or under two classes (a
    label conflict) stops training unless ``allow_leakage``; near-duplicates across splits are warned
    about. (``imgtune doctor`` runs every check.)"""
    groups = exact_groups(splits.samples)
    bad = [g for g in groups if g.kinds() != ["within-class"]]
    within = len(groups) - len(bad)
    if within:
        log.info("%d file(s) have exact copies in the same class and split (harmless; imgtune doctor lists them)",
                 within)
    if bad:
        listed = "; ".join(f"{' + '.join(g.kinds())}: {_where_all(g.members)}" for g in bad[:5])
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        message = (f"{len(bad)} image(s) are stored more than once, in different splits or classes: {listed}{more}. The "
                   "same image in train and val/test inflates every metric; under two classes one label "
                   "is wrong")
        if not allow_leakage:
            raise DataError(f"{message}. Remove the copies (imgtune doctor {source} lists them "
                            "all) or pass --allow-leakage to train anyway")
        log.warning("%s; training anyway (--allow-leakage)", message)
    train = splits.split("train")
    held_out = [s for s in splits.samples if s.split != "train"]
    near = leaks_into(train, held_out)
    for other, original, bits in near[:10]:
        log.warning("near-duplicate across splits: %s looks like %s (%d of 256 bits differ); metrics may "
                    "be optimistic", _where(other), _where(original), bits)
    if len(near) > 10:
        log.warning("... and %d more near-duplicate pair(s) across splits (imgtune doctor lists them all)",
                    len(near) - 10)


def _where(sample: Sample) -> str:
    return f"{sample.path} ({sample.split}/{sample.label})"


def _where_all(samples) -> str:
    return ", ".join(_where(s) for s in samples)


def _choose_balance(config: RunConfig, splits: DataSplits) -> RunConfig:
    """Resolve ``--balance`` from the training split's class counts; the choice is logged and saved."""
    choice, reason = balance.choose(config.train.balance, splits.counts()["train"])
    log.info("class balance: %s", reason)
    return replace(config, train=replace(config.train, balance=choice))


def _drop_last(n: int, batch_size: int) -> bool:
    """Drop a last batch of one image: batch norm cannot train on it."""
    return n % batch_size == 1


def _final_metrics(model, loaders: Loaders, splits: DataSplits, device, config: RunConfig, stopper,
                   final_frozen: bool) -> dict:
    """Validation (and test) metrics of the saved model; from cached features when the backbone
    was frozen throughout the last phase (the same numbers, without running the backbone again).
    Also the temperature fitted on val and its effect on calibration (``metrics["calibration"]``)."""
    metrics: dict = {}
    predictions: dict[str, tuple] = {}
    sources = {"val": (loaders.frozen_val, loaders.val), "test": (loaders.frozen_test, loaders.test)}
    for name, (frozen, images) in sources.items():
        net, loader = (model.head, frozen) if final_frozen and frozen is not None else (model, images)
        if loader is None:
            continue
        probs, targets, _ = predict_probs(net, loader, device, f"evaluating {name}")
        predictions[name] = (probs, targets)
        report = full_report(targets, probs, splits.classes, seed=config.train.seed)
        if name == "val":
            metrics.update(report)
        else:
            metrics["test"] = report
    metrics["calibration"] = _calibrate(predictions, config.train.seed)
    metrics["kept"] = config.train.keep
    if config.train.keep == "best":
        metrics["best_epoch"] = stopper.best_epoch
        metrics["note"] = "weights chosen on val: val metrics are optimistic"
    return metrics


def _calibrate(predictions: dict[str, tuple], seed: int) -> dict | None:
    """T fitted on val; ECE before and after it on test, else by 2-fold cross-fitting on val."""
    if "val" not in predictions:
        return None
    val_probs, val_y = predictions["val"]
    test_probs, test_y = predictions.get("test", (None, None))
    found = calibration.assess(val_probs, val_y, test_probs, test_y, seed=seed)
    if found is not None and "ece_before" in found:
        log.info("calibration: temperature %.3f (fitted on %d val images); ECE on %s: %.4f before, %.4f after",
                 found["temperature"], found["n_fit"], found["assessed_on"].split(",")[0], found["ece_before"],
                 found["ece_after"])
    if found is not None and found["at_bound"]:
        log.warning("calibration: the temperature stopped at the end of its range (%g); the validation split "
                    "(%d images) is too easy or too small to fit it well", found["temperature"], found["n_fit"])
    return found


def _meta(config: RunConfig, built: models.BuiltModel, splits: DataSplits) -> dict:
    return {
        "classes": splits.classes,
        "model": {"name": built.spec.name, "library": built.spec.library, "requested": config.model.name,
                  "num_features": built.model.num_features, "body": config.model.body,
                  "head": config.model.head},
        "weights": built.weights.describe() if built.weights else None,
        "preprocessing": built.preprocessing.to_dict(),
        "strategy": config.train.strategy,
        "data": splits.summary(),
        "config": to_dict(config),
        "versions": artifact.versions(),
    }


def _log_data(splits: DataSplits) -> None:
    counts = splits.counts()
    sizes = ", ".join(f"{name} {sum(c.values())}" for name, c in counts.items())
    log.info("data (%s): %d classes (%s); %s; formats: %s; skipped %d unreadable file(s)", splits.layout,
             len(splits.classes), ", ".join(splits.classes[:10]) + (" ..." if len(splits.classes) > 10 else ""),
             sizes, splits.summary()["formats_text"], len(splits.skipped))

