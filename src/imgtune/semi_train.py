"""``imgtune train DATA --unlabeled DIR``: the unlabelled images in a training run.

:func:`open_for` checks the folder while the run is prepared (before anything is written:
:mod:`imgtune.data.unlabelled`). :func:`with_pseudo_labels` runs the pretrained (frozen) body over the
labelled training images and the unlabelled ones (features from the same disk cache), lets
:mod:`imgtune.semi` choose the pseudo-labels on an inner hold-out of the labelled training images, and
returns the data source to train on: the labelled training images plus the pseudo-labelled ones, each
of those weighted ``--pseudo-weight`` (in the head's fit, and in how often it is drawn for SGD epochs
and for the epochs where the whole model trains). Its report goes to the log and ``metrics.json``
(``semi``), and from there into ``imgtune report``.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from . import features, semi
from .cache import ArrayStore
from .config import RunConfig
from .data.sources import DataSource, FolderSource, LoaderOptions
from .data.unlabelled import Unlabelled, open_unlabelled
from .errors import UsageError
from .models import BuiltModel

log = logging.getLogger(__name__)


def open_for(source: DataSource, config: RunConfig, checks: ArrayStore | None = None,
             progress: bool = True) -> Unlabelled | None:
    """The checked unlabelled images of ``--unlabeled`` (None without it)."""
    if not config.data.unlabeled:
        return None
    if not isinstance(source, FolderSource):
        raise UsageError("--unlabeled needs a folder or CSV dataset; shards are read as a stream (convert them "
                         "back to a folder, or train without --unlabeled)")
    return open_unlabelled(config.data.unlabeled, source.splits, checks, progress)


def with_pseudo_labels(source: DataSource, unlabelled: Unlabelled | None, config: RunConfig, built: BuiltModel,
                       options: LoaderOptions, device: torch.device) -> tuple[DataSource, dict | None]:
    """The source to train on and the report for ``metrics.json`` (None without ``--unlabeled``)."""
    if unlabelled is None:
        return source, None
    train = config.train
    if train.semi == "none":
        log.info("semi-supervised: %s", semi.NOT_ASKED)
        return source, _report(semi.unused(0, semi.NOT_ASKED), unlabelled, source.classes, config, 0,
                               torch.zeros(0))
    labelled = source.features("train", built, config.model.body, options, device)
    found = _unlabelled_features(unlabelled, source.classes, built, config, options, device)
    samples = [unlabelled.samples[i] for i in found.positions.tolist()]
    choice = semi.choose(labelled.features.numpy(), labelled.targets.numpy(), found.features.numpy(),
                         len(source.classes), train.semi, train.pseudo_weight, train.seed)
    report = _report(choice, unlabelled, source.classes, config, len(samples), labelled.targets)
    _log(report)
    if choice.method == "none":
        return source, report
    return _add(source, samples, choice, report["weight"]), report


def _unlabelled_features(unlabelled: Unlabelled, classes: list[str], built: BuiltModel, config: RunConfig,
                         options: LoaderOptions, device: torch.device) -> features.FeatureSet:
    store = features.store_for(built, config.model.body, options.cache_dir) \
        if options.cache_dir is not None and built.weights else None
    return features.extract(built, unlabelled.samples, classes, store, device, options.batch_size, options.workers,
                            description="unlabelled features", engine=options.feature_engine)


def _add(source: FolderSource, samples: list, choice: semi.Choice, weight: float) -> FolderSource:
    """``source`` with the pseudo-labelled images appended to its training split, and each training
    image's weight (1 for a labelled one)."""
    pseudo = [replace(s, label=source.classes[label], split="train")
              for s, label in zip(samples, choice.labels.tolist()) if label >= 0]
    splits = replace(source.splits, samples=source.splits.samples + pseudo)
    added = FolderSource(splits, source.source)
    real = len(source.splits.split("train"))
    added.train_weights = torch.cat([torch.ones(real), torch.full((len(pseudo),), float(weight))]).double()
    return added


def _report(choice: semi.Choice, unlabelled: Unlabelled, classes: list[str], config: RunConfig,
            with_features: int, labelled: torch.Tensor) -> dict:
    """``labelled``: the labelled training images' targets."""
    counts = choice.counts(len(classes))
    report = {"requested": config.train.semi, "used": choice.method, "reason": choice.reason,
              "unlabelled": {**unlabelled.summary(), "with_features": with_features},
              "weight": semi.pseudo_weight(config.train.pseudo_weight, len(labelled), int(counts.sum()))
              if counts.sum() else config.train.pseudo_weight,
              "threshold": choice.threshold, "rounds": choice.rounds,
              "pseudo_labels": {c: int(n) for c, n in zip(classes, counts)}, "pseudo_labels_total": int(counts.sum()),
              "estimated_precision": _precision(choice, classes), "inner_holdout": choice.holdout}
    return report


def _precision(choice: semi.Choice, classes: list[str]) -> dict | None:
    """Of the hidden labelled images the chosen setting would have pseudo-labelled, the share it got right."""
    found = choice.precision
    if found is None:
        return None
    per_class = {c: (round(int(r) / int(t), 4) if t else None) for c, r, t in zip(classes, found.right, found.taken)}
    total = int(found.taken.sum())
    return {"overall": round(int(found.right.sum()) / total, 4) if total else None, "per_class": per_class,
            "hidden_images_labelled": total // choice.holdout["repeats"]}  # each image is hidden once per repeat


def _log(report: dict) -> None:
    if report["used"] == "none":
        log.warning("semi-supervised: %s", report["reason"])
        return
    counts = ", ".join(f"{c} {n}" for c, n in report["pseudo_labels"].items())
    precision = report["estimated_precision"]
    rounds = f", {report['rounds']} round(s)" if report["rounds"] else ""
    log.info("semi-supervised: %s; %d pseudo-labels of %d unlabelled images (%s), confidence >= %.2f%s, weight %.2f; "
             "estimated precision %s (on %d hidden labelled images)", report["reason"], report["pseudo_labels_total"],
             report["unlabelled"]["with_features"], counts, report["threshold"], rounds, report["weight"],
             f"{precision['overall']:.3f}" if precision["overall"] is not None else "unknown",
             precision["hidden_images_labelled"])
