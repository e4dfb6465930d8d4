"""Never worse than the probe (``--never-worse``, on by default for ``gradual``).

Fine-tuning can end below the linear probe it started from (a tiny training split, a learning rate too
high, a body that forgets). So an inner hold-out is carved from the TRAINING split (stratified, never
val or test) before anything trains; both phases train without it. At the end, the fine-tuned model
and the linear probe (a linear head fitted by L-BFGS on the same cached features of the same images,
exactly what ``linear-probe`` fits: :mod:`imgtune.head_fit`) are scored on the hold-out. The fine-tuned
model is kept only if it beats the probe (higher accuracy, or the same accuracy and a lower log loss);
otherwise the pretrained body comes back and the probe is refitted on the whole training split, hold-out
included. A kept fine-tuned model is not refitted (that would repeat the fine-tuning): it has trained on
the training split less the hold-out. The decision and both figures go to the log and metrics.json
(``selection``).

The probe is refitted from cached features rather than kept from the frozen phase, so the decision
needs nothing from the checkpoints and a resumed run reaches the same one.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, replace

import numpy as np
import torch

from .config import TrainConfig
from .data.transforms import eval_transform
from .head_fit import fit_linear_head, linear_layer, sklearn_class_weight
from .inference import predict_probs
from .metrics import quick_metrics
from .models import BuiltModel, Classifier
from .strategies import Phase

log = logging.getLogger(__name__)

INNER = "inner"  # the hold-out's split name (the feature cache is keyed by file, so it is shared)
FRACTION = 0.15  # of each training class
MIN_PER_CLASS = 3  # a hold-out below this is too noisy to decide on; capped at a third of the class


@dataclass
class HoldOut:
    """The carved source (its ``train`` split without the hold-out, which is split ``inner``) and the
    pretrained body's weights, taken before training changes them."""

    source: object
    images: int
    per_class: dict[str, int]
    body_state: dict | None = None


def holdout_size(count: int) -> int:
    """Images of a class of ``count`` held out: 15%, at least 3, at most a third of the class (none
    below 3 images: a class that small cannot spare one)."""
    return min(max(round(FRACTION * count), MIN_PER_CLASS), count // 3)


def carve(source, train: TrainConfig, phases: list[Phase], head) -> HoldOut | None:
    """The hold-out where the rule applies: ``--never-worse``, a frozen phase before the body trains, a
    linear head, and a source with random access (shards are a stream)."""
    if not (train.never_worse and phases[0].body_frozen and not phases[-1].body_frozen):
        return None
    why = None if linear_layer(head) is not None else "the head is not linear (the probe is a linear head)"
    samples = getattr(source.splits, "samples", None)
    if why is None and samples is None:
        why = "the data are streamed from shards (an inner hold-out needs random access)"
    if why:
        log.info("never-worse rule off: %s; the fine-tuned model is kept", why)
        return None
    rng = np.random.default_rng(train.seed)
    held, per_class = set(), {}
    for label in source.classes:
        members = [i for i, s in enumerate(samples) if s.split == "train" and s.label == label]
        chosen = rng.permutation(len(members))[:holdout_size(len(members))]
        held.update(members[i] for i in chosen)
        per_class[label] = len(chosen)
    if not held:
        log.info("never-worse rule off: no training class has 3 images to spare for an inner hold-out")
        return None
    carved = [replace(s, split=INNER) if i in held else s for i, s in enumerate(samples)]
    log.info("never-worse rule: %d training images held out (stratified, %s) to choose between the fine-tuned "
             "model and the linear probe", len(held), ", ".join(f"{c} {n}" for c, n in per_class.items()))
    return HoldOut(type(source)(replace(source.splits, samples=carved), source.source), len(held), per_class)


def remember_body(hold: HoldOut | None, model: Classifier) -> None:
    """The pretrained body's weights, to come back to if the probe wins."""
    if hold is not None:
        hold.body_state = {k: v.detach().clone() for k, v in model.body.state_dict().items()}


def finish(hold: HoldOut | None, model: Classifier, phases: list[Phase], built: BuiltModel, loaders, options,
           body: str, train: TrainConfig, device: torch.device, class_weights: torch.Tensor | None,
           diverged: str | None = None) -> dict | None:
    """At the end of training: the rule's decision (``model`` changed in place when the probe wins), or
    None where the rule is off. Where no phase trained the body (``--time-budget`` chose linear-probe) or
    training diverged (``diverged``: where and what), the probe is refitted on the whole training split,
    hold-out included."""
    if hold is None:
        return None
    inner = hold.source.features(INNER, built, body, options, device)
    weight = sklearn_class_weight(train.balance, class_weights)
    fit_x, fit_y = loaders.frozen_train.dataset.tensors[:2]
    fit = (fit_x, fit_y, loaders.frozen_train_weights)  # pseudo-labels weigh less (semi.py)
    record = {"rule": "keep the fine-tuned model only if it beats the linear probe on an inner hold-out of the "
                      "training split (accuracy, then log loss)",
              "holdout_images": hold.images, "holdout_per_class": hold.per_class}
    if diverged is not None:
        _restore_probe(model, hold.body_state, *fit, inner, train.seed, weight)
        log.warning("training diverged in %s. The never-worse rule keeps the linear probe (the pretrained body and a "
                    "head fitted on the whole training split), which does not depend on the diverged training. To "
                    "fine-tune, try a lower --lr (%g now) or --warmup-epochs 1, and check the data (imgtune doctor)",
                    diverged, train.lr)
        return record | {"kept": "probe", "reason": f"training diverged in {diverged}",
                         "refitted_on_whole_training_split": True}
    if phases[-1].body_frozen:
        _restore_probe(model, hold.body_state, *fit, inner, train.seed, weight)
        log.info("never-worse rule: no phase fine-tuned the body; the probe is refitted on the whole training split")
        return record | {"kept": "probe", "reason": "no fine-tuning ran", "refitted_on_whole_training_split": True}
    return record | _choose(hold, model, built, inner, fit, options, train.seed, device, weight)


def _choose(hold: HoldOut, model: Classifier, built: BuiltModel, inner, fit: tuple, options, seed: int,
            device: torch.device, weight) -> dict:
    """Score the fine-tuned ``model`` and the probe (fitted on ``fit``: features, targets and sample
    weights of the training split less the hold-out) on the hold-out; keep the better."""
    num_classes, pre = len(hold.source.classes), built.preprocessing
    images = hold.source.images(INNER, eval_transform(pre), False, options, pre, True)
    tuned = _score(model, images, device, num_classes, "inner hold-out, fine-tuned")
    probe = copy.deepcopy(model.head)
    fitted = fit_linear_head(linear_layer(probe), fit[0], fit[1], num_classes, weight, seed, fit[2])
    probed = _score(probe.to(device), inner.loader(options.batch_size, False, seed), device, num_classes,
                    "inner hold-out, probe")
    wins = tuned["accuracy"] > probed["accuracy"] or \
        (tuned["accuracy"] == probed["accuracy"] and tuned["loss"] < probed["loss"])
    record = {"fine_tuned": tuned, "probe": probed | {"C": fitted["C"]}, "kept": "fine-tuned" if wins else "probe",
              "refitted_on_whole_training_split": not wins}
    figures = (f"inner hold-out of {hold.images}: fine-tuned accuracy {tuned['accuracy']:.4f}, log loss "
               f"{tuned['loss']:.4f}; probe {probed['accuracy']:.4f}, {probed['loss']:.4f}")
    if wins:
        log.info("never-worse rule: the fine-tuned model is kept (%s); it is not refitted with the hold-out", figures)
        return record
    _restore_probe(model, hold.body_state, *fit, inner, seed, weight)
    log.warning("never-worse rule: the linear probe is kept, not the fine-tuned model (%s); the probe is refitted "
                "on the whole training split", figures)
    return record


def _score(net, loader, device: torch.device, num_classes: int, description: str) -> dict:
    probs, targets, _ = predict_probs(net, loader, device, description)
    found = quick_metrics(targets, probs, num_classes)
    return {"accuracy": found["accuracy"], "loss": found["loss"]}  # a loss that is not finite never wins


def _restore_probe(model: Classifier, body_state: dict, fit_x: torch.Tensor, fit_y: torch.Tensor,
                   fit_w: torch.Tensor | None, inner, seed: int, weight) -> None:
    """The pretrained body back, and the head fitted on every training image (fit part and hold-out;
    ``fit_w``: the fit part's sample weights, the hold-out's labelled images weigh 1)."""
    model.body.load_state_dict(body_state)
    x, y = torch.cat([fit_x, inner.features]), torch.cat([fit_y, inner.targets])
    w = None if fit_w is None else torch.cat([fit_w, torch.ones(len(inner.targets), dtype=fit_w.dtype)])
    layer = linear_layer(model.head)
    fit_linear_head(layer, x, y, layer.out_features, weight, seed, w)
