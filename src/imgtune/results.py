"""The final metrics of a trained model, written to metrics.json: validation (and test) reports with
95% bootstrap intervals, and the temperature fitted on val with its measured effect on calibration."""

from __future__ import annotations

import logging

from . import calibration
from .config import RunConfig
from .engine import Loaders
from .evaluation import full_report
from .inference import predict_probs

log = logging.getLogger(__name__)


def final_metrics(model, loaders: Loaders, classes: list[str], device, config: RunConfig, stopper,
                  final_frozen: bool) -> dict:
    """Validation (and test) metrics of the saved model; from cached features when the backbone
    was frozen throughout the last phase (the same numbers, without running the backbone again), and
    with ``--unfreeze top:K`` from the validation images' float32 activations at the cut (the lower
    blocks never train: the same numbers, to float tolerance, without running them again).
    Also the temperature fitted on val and its effect on calibration (``metrics["calibration"]``)."""
    metrics: dict = {}
    predictions: dict[str, tuple] = {}
    sources = {"val": (loaders.frozen_val, loaders.val), "test": (loaders.frozen_test, loaders.test)}
    for name, (frozen, images) in sources.items():
        net, loader = (model.head, frozen) if final_frozen and frozen is not None else (model, images)
        if name == "val" and not final_frozen and loaders.partial is not None and loaders.partial.exact_val:
            net, loader = loaders.partial.net(model), loaders.partial.val
        if loader is None:
            continue
        probs, targets, _ = predict_probs(net, loader, device, f"evaluating {name}")
        predictions[name] = (probs, targets)
        report = full_report(targets, probs, classes, seed=config.train.seed)
        if name == "val":
            metrics.update(report)
        else:
            metrics["test"] = report
    metrics["calibration"] = _calibrate(predictions, config.train.seed)
    metrics["kept"] = config.train.keep
    if config.train.keep == "best":
        metrics["best_epoch"] = stopper.best_epoch if stopper is not None else None  # None: training diverged
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
