"""Never worse than the probe (``--never-worse``, on by default for ``gradual``).

Fine-tuning can end below the linear probe it started from (a tiny training split, a learning rate too
high, a body that forgets). So an inner hold-out is carved from the TRAINING split (stratified, never
val or test) before anything trains; both phases train without it. Its features through the pretrained
body are computed then, before any weight changes. The fine-tuned model and the linear probe (a linear
head fitted by L-BFGS on the same cached features of the same images, exactly what ``linear-probe``
fits: :mod:`imgtune.head_fit`) are scored on the hold-out. The fine-tuned model is kept only if it beats
the probe (higher accuracy, or the same accuracy and a lower log loss); otherwise the pretrained body
comes back and the probe is refitted on the whole training split, hold-out included. A kept fine-tuned
model is not refitted (that would repeat the fine-tuning): it has trained on the training split less
the hold-out. The decision and both figures go to the log and metrics.json (``selection``).

The same test runs after every fine-tuning epoch but the last (:class:`Referee`; the figures are
metrics.csv's ``inner_accuracy`` and ``inner_loss``): once fine-tuning has failed it
``--never-worse-patience`` epochs in a row, the rest of the fine-tuning is skipped and the probe is
kept, since the model that would go on training has just lost to it. A fine-tuned model that wins
trains to the end of its schedule and is judged there, as without the referee: the epochs are not
picked by their hold-out figures, so the final comparison stays a fair one.

The probe is refitted from cached features rather than kept from the frozen phase, so the decision
needs nothing from the checkpoints and a resumed run reaches the same one.

With ``--unfreeze top:K`` the lower blocks never change, so the fine-tuned model is scored on the
hold-out's activations at the cut, computed once before training and kept in float32 (not the cache's
float16): the same figures as on its images, to float tolerance, for the cost of the top blocks. A
kept probe's final metrics are those of the pretrained body, so they are computed on the cached
features (results.py), as linear-probe's are.
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
SKIP_MIN_IMAGES = 30  # a perfect probe skips fine-tuning only on this many held-out images: none wrong of 30
# puts the probe's error rate below 10% (the rule of three's 95% bound, 3/n); 9 of 9 right says little


@dataclass
class HoldOut:
    """The carved source (its ``train`` split without the hold-out, which is split ``inner``) and the
    pretrained body's weights, taken before training changes them."""

    source: object
    images: int
    per_class: dict[str, int]
    body_state: dict | None = None
    features: object = None  # the hold-out's features through the pretrained body (features.FeatureSet)
    activations: object = None  # with --unfreeze top:K, its lower blocks' float32 output (activations.ActivationSet)


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


def uncarved(source):
    """``source`` (carved, maybe with pseudo-labelled images appended) with the hold-out back in its training
    split: what a run that drops fine-tuning trains its probe on, as linear-probe would. The pseudo-labelled
    images come last in the training split, so the hold-out's images (weight 1) go before their weights."""
    samples = [replace(s, split="train") if s.split == INNER else s for s in source.splits.samples]
    whole = type(source)(replace(source.splits, samples=samples), source.source)
    if source.train_weights is not None:
        held = sum(s.split == INNER for s in source.splits.samples)
        whole.train_weights = torch.cat([torch.ones(held, dtype=source.train_weights.dtype), source.train_weights])
    return whole


def remember_body(hold: HoldOut | None, model: Classifier, built: BuiltModel, body: str, options,
                  device: torch.device, lower=None) -> None:
    """What the rule needs of the pretrained body before training changes it: its weights, to come back
    to if the probe wins, and the hold-out's features (which the feature cache keeps, if one is used).
    With ``--unfreeze top:K`` (``lower``, an :class:`activations.Lower`), also the hold-out's activations
    at the cut, kept in float32: fine-tuning never changes the lower blocks, so the fine-tuned model is
    scored on them as on the images (and computing them gives the features on the way)."""
    if hold is not None:
        hold.body_state = {k: v.detach().clone() for k, v in model.body.state_dict().items()}
        if lower is not None:
            from .activations import EXACT

            hold.activations = lower.extract(hold.source.splits.split(INNER), hold.source.classes, 1,
                                             f"{INNER} activations", stored=False, dtype=EXACT)
        hold.features = hold.source.features(INNER, built, body, options, device)


def beats(challenger: dict, holder: dict) -> bool:
    """The rule's test: higher hold-out accuracy, or the same and a lower log loss."""
    return challenger["accuracy"] > holder["accuracy"] or \
        (challenger["accuracy"] == holder["accuracy"] and challenger["loss"] < holder["loss"])


def lost_in_a_row(rows: list[dict], probe: dict, patience: int) -> bool:
    """Whether the last ``patience`` (at least 1) epoch rows were scored on the hold-out (``inner_*``) and
    none of them beat ``probe``."""
    recent = rows[-patience:] if patience > 0 else []
    return len(recent) == patience > 0 and all(
        "inner_accuracy" in row and not beats({"accuracy": row["inner_accuracy"], "loss": row["inner_loss"]}, probe)
        for row in recent)


class Referee:
    """The rule's test after each fine-tuning epoch (``engine.fit`` calls it): :meth:`score` puts the model's
    hold-out figures into the epoch's row, :meth:`gives_up` says when fine-tuning has lost to the probe
    ``patience`` epochs in a row. The probe is fitted once: before the time plan (its fit is the plan's
    head-fit cost), else when first needed."""

    def __init__(self, hold: HoldOut, head: torch.nn.Module, built: BuiltModel, fit: tuple, options,
                 train: TrainConfig, device: torch.device, weight, cut=None):
        self.hold, self.built, self.fit, self.options, self.cut = hold, built, fit, options, cut
        self.template = copy.deepcopy(head).cpu()  # the probe's layout (the fit replaces its weights)
        self.patience, self.seed, self.device, self.weight = train.never_worse_patience, train.seed, device, weight
        self.num_classes = len(hold.source.classes)
        self.probe: dict | None = None  # {"accuracy", "loss", "C"} of the probe on the hold-out
        self.fit_seconds: float | None = None  # the probe's fit (the time plan's head-fit cost)
        self.scored: tuple[int, dict] | None = None  # (epoch, figures) of the last epoch scored

    def probe_figures(self) -> dict:
        if self.probe is None:
            head = copy.deepcopy(self.template)
            fitted = fit_linear_head(linear_layer(head), self.fit[0], self.fit[1], self.num_classes, self.weight,
                                     self.seed, self.fit[2])
            self.fit_seconds = fitted["seconds"]  # the fit's own time: not the first import of scikit-learn (1 s)
            loader = self.hold.features.loader(self.options.batch_size, False, self.seed)
            self.probe = _score(head.to(self.device), loader, self.device, self.num_classes,
                                "inner hold-out, probe") | {"C": fitted["C"]}
        return self.probe

    def nothing_to_win(self) -> str | None:
        """Why fine-tuning is skipped before it starts, or None: the probe classifies every held-out image
        correctly, so a fine-tuned model could at best tie it on accuracy and win on log loss alone (a
        tie the referee's figures never saw turn into a better model: docs/benchmarks.md). Only on a
        hold-out of at least :data:`SKIP_MIN_IMAGES`; off with ``--never-worse-patience 0``, as giving up is."""
        if not self.patience or self.hold.images < SKIP_MIN_IMAGES:
            return None
        probe = self.probe_figures()
        if probe["accuracy"] < 1.0:
            return None
        return (f"the linear probe classifies all {self.hold.images} held-out training images correctly (log loss "
                f"{probe['loss']:.4f}), so fine-tuning could at best tie it on accuracy")

    def figures(self, model: Classifier) -> dict:
        """``model`` (fine-tuning) on the hold-out's images (with ``cut``, the lower blocks' frozen output on
        them, :attr:`HoldOut.activations`): accuracy and log loss."""
        if self.cut is not None:
            from .activations import evaluation_loader
            from .partial import PartialNet

            loader = evaluation_loader(self.hold.activations, self.options)
            return _score(PartialNet(model, self.cut), loader, self.device, self.num_classes,
                          "inner hold-out, fine-tuned")
        pre = self.built.preprocessing
        images = self.hold.source.images(INNER, eval_transform(pre), False, self.options, pre, True)
        return _score(model, images, self.device, self.num_classes, "inner hold-out, fine-tuned")

    def score(self, model: Classifier, epoch: int) -> dict:
        """The row's extra columns: :meth:`figures` of ``model`` after ``epoch``."""
        figures = self.figures(model)
        self.probe_figures()
        self.scored = (epoch, figures)
        return {"inner_accuracy": figures["accuracy"], "inner_loss": figures["loss"]}

    def gives_up(self, rows: list[dict]) -> bool:
        """Whether the last ``patience`` rows are all fine-tuning epochs that lost to the probe."""
        lost = self.probe is not None and lost_in_a_row(rows, self.probe, self.patience)
        if lost:
            log.warning("never-worse rule: fine-tuning has not beaten the linear probe on the inner hold-out for %d "
                        "epoch%s in a row (probe: accuracy %.4f, log loss %.4f); the rest of it is skipped "
                        "(--never-worse-patience)", self.patience, "s" * (self.patience > 1), self.probe["accuracy"],
                        self.probe["loss"])
        return lost


def referee(hold: HoldOut | None, model: Classifier, built: BuiltModel, loaders, options, train: TrainConfig,
            device: torch.device, class_weights: torch.Tensor | None) -> Referee | None:
    """The rule's judge for this run, or None where the rule is off. The probe is fitted on the cached
    features of the training split less the hold-out (the frozen phase's), with their sample weights
    (pseudo-labels weigh less: semi.py)."""
    if hold is None:
        return None
    fit_x, fit_y = loaders.frozen_train.dataset.tensors[:2]
    cut = loaders.partial.found if loaders.partial is not None and hold.activations is not None else None
    return Referee(hold, model.head, built, (fit_x, fit_y, loaders.frozen_train_weights), options, train, device,
                   sklearn_class_weight(train.balance, class_weights), cut)


def finish(judge: Referee | None, model: Classifier, phases: list[Phase], epochs_done: int, gave_up: bool = False,
           diverged: str | None = None, lr: float | None = None, skipped: str | None = None) -> dict | None:
    """At the end of training: the rule's decision (``model`` changed in place when the probe wins), or
    None where the rule is off. Where training diverged (``diverged``: where and what), the probe is
    refitted on the whole training split, hold-out included; where no phase trained the body (the skip,
    ``--time-budget``'s floor), the run has fitted it there already (the loaders of :func:`uncarved`).
    ``gave_up``: the referee ended fine-tuning after epoch ``epochs_done``; ``lr``: the run's learning
    rate, for the advice after a divergence; ``skipped``: why fine-tuning was skipped before it started
    (:meth:`Referee.nothing_to_win`)."""
    if judge is None:
        return None
    hold = judge.hold
    record = {"rule": "keep the fine-tuned model only if it beats the linear probe on an inner hold-out of the "
                      "training split (accuracy, then log loss)",
              "holdout_images": hold.images, "holdout_per_class": hold.per_class}
    if diverged is not None:
        _restore_probe(model, judge)
        log.warning("training diverged in %s. The never-worse rule keeps the linear probe (the pretrained body and a "
                    "head fitted on the whole training split), which does not depend on the diverged training. To "
                    "fine-tune, try a lower --lr (%g now) or --warmup-epochs 1, and check the data (imgtune doctor)",
                    diverged, lr)
        return record | {"kept": "probe", "reason": f"training diverged in {diverged}",
                         "refitted_on_whole_training_split": True}
    if phases[-1].body_frozen:  # the run became linear-probe on the whole training split (training.py)
        log.info("never-worse rule: %s; the probe was fitted on the whole training split",
                 "fine-tuning skipped" if skipped else "no phase fine-tuned the body")
        record |= {"kept": "probe", "reason": f"fine-tuning skipped: {skipped}" if skipped else "no fine-tuning ran",
                   "refitted_on_whole_training_split": True}
        return record | ({"probe": judge.probe, "fine_tuning_skipped": True} if skipped else {})
    if gave_up:
        record |= {"gave_up_after_epoch": epochs_done, "patience": judge.patience}
    return record | _choose(judge, model, epochs_done, gave_up)


def _choose(judge: Referee, model: Classifier, epochs_done: int, gave_up: bool) -> dict:
    """Score the fine-tuned ``model`` (unless the referee just did) and the probe on the hold-out; keep the
    better."""
    hold = judge.hold
    tuned = judge.scored[1] if judge.scored is not None and judge.scored[0] == epochs_done else judge.figures(model)
    probed = judge.probe_figures()
    wins = beats(tuned, probed)
    record = {"fine_tuned": tuned, "probe": probed, "kept": "fine-tuned" if wins else "probe",
              "refitted_on_whole_training_split": not wins}
    figures = (f"inner hold-out of {hold.images}: fine-tuned accuracy {tuned['accuracy']:.4f}, log loss "
               f"{tuned['loss']:.4f}; probe {probed['accuracy']:.4f}, {probed['loss']:.4f}")
    if wins:
        log.info("never-worse rule: the fine-tuned model is kept (%s); it is not refitted with the hold-out", figures)
        return record
    _restore_probe(model, judge)
    ended = f"fine-tuning given up after epoch {epochs_done}, " if gave_up else ""
    log.warning("never-worse rule: the linear probe is kept, not the fine-tuned model (%s%s); the probe is refitted "
                "on the whole training split", ended, figures)
    return record


def _score(net, loader, device: torch.device, num_classes: int, description: str) -> dict:
    probs, targets, _ = predict_probs(net, loader, device, description)
    found = quick_metrics(targets, probs, num_classes)
    return {"accuracy": found["accuracy"], "loss": found["loss"]}  # a loss that is not finite never wins


def _restore_probe(model: Classifier, judge: Referee) -> None:
    """The pretrained body back, and the head fitted on every training image (fit part and hold-out; the
    fit part's sample weights, the hold-out's labelled images weigh 1)."""
    model.body.load_state_dict(judge.hold.body_state)
    fit_x, fit_y, fit_w = judge.fit
    inner = judge.hold.features
    x, y = torch.cat([fit_x, inner.features]), torch.cat([fit_y, inner.targets])
    w = None if fit_w is None else torch.cat([fit_w, torch.ones(len(inner.targets), dtype=fit_w.dtype)])
    layer = linear_layer(model.head)
    fit_linear_head(layer, x, y, layer.out_features, judge.weight, judge.seed, w)
