"""A site of a federation: its own folder, trained and measured locally under the coordinator's classes.

A site opens its folder (train/ and val/) with the same file checks as ``imgtune train``, but under the
class list the coordinator fixed, so a site lacking a class still trains (its loss simply has no
examples of it). Local training is imgtune's own engine (:func:`imgtune.engine.fit`) for one phase: the
head on cached backbone features while the body is frozen, the whole model once it is not. What it
returns are parameter arrays of the travelling part and a few documented scalars; nothing here knows
about Flower.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace

import numpy as np
import torch

from .. import balance, models, partial
from ..cache import check_store
from ..config import RunConfig, from_dict, resolve
from ..data.scan import DataSplits, check_files, find_samples, split_readable
from ..data.sources import FolderSource, build_loaders
from ..engine import fit
from ..errors import DataError
from ..inference import predict_probs, select_device
from ..metrics import confusion_matrix
from ..prepare import Setup, cache_folder, finalize, seed_everything
from ..strategies import Phase

log = logging.getLogger(__name__)

FROZEN, UNFROZEN = "frozen", "unfrozen"


def class_names(data: str) -> list[str]:
    """The class folder names found in ``data`` (what a site tells the coordinator; no file names)."""
    samples, _ = find_samples(data)
    return sorted({s.label for s in samples})


def train_images(data: str) -> int:
    """The site's training images as found in train/ (before the file checks): what a SecAgg+ federation
    sizes its weights by. The same count travels in plain as ``num-examples`` with every update."""
    samples, _ = find_samples(data)
    return sum(1 for s in samples if s.split == "train") or len(samples)


def open_splits(data: str, classes: list[str], seed: int, checks=None) -> DataSplits:
    """The site's checked train and val images, labelled by the coordinator's ``classes``."""
    samples, layout = find_samples(data)
    unknown = sorted({s.label for s in samples} - set(classes))
    if unknown:
        raise DataError(f"{data}: class folder(s) {unknown} are not among the federation's classes {classes}; "
                        "rename them, remove them, or ask the coordinator to add them (--classes)")
    good, skipped, formats = check_files(samples, False, checks)
    assigned = split_readable(good, layout, 0.2, 0.0, seed, data, samples)
    for split in ("train", "val"):
        if not any(s.split == split for s in assigned):
            raise DataError(f"{data}: no readable {split} images; a site needs {split}/ with images of at least "
                            "one class")
    return DataSplits(classes, sorted(assigned, key=lambda s: (s.split, s.label, str(s.path))), layout, skipped,
                      formats)


def open_site(data: str, options: dict, classes: list[str]) -> Setup:
    """The coordinator's training options applied to this site's folder, model built and device chosen."""
    config = resolve(replace(from_dict(options, origin="the coordinator's options"), out=None))
    config = whole_model(replace(config, data=replace(config.data, source=data)))
    seed_everything(config.train.seed)
    checks = check_store(cache_folder(config)) if config.data.cache else None
    source = FolderSource(open_splits(data, classes, config.train.seed, checks), data)
    counts = {c: n for c, n in source.counts()["train"].items() if n}
    chosen, reason = balance.choose(config.train.balance, counts)
    log.info("site %s: class balance: %s", data, reason)
    config = replace(config, train=replace(config.train, balance=chosen))
    built = models.create(config.model, len(classes), offline=config.offline)
    device = select_device(config.train.device)
    return Setup(finalize(replace(config, out=""), source, built, device), source, built, device)


def whole_model(config: RunConfig) -> RunConfig:
    """``--unfreeze auto`` in a federation: every block fine-tunes (a round averages the whole model)."""
    return replace(config, train=replace(config.train, unfreeze="all")) if config.train.unfreeze == partial.AUTO \
        else config


def travelling(model: models.Classifier, phase: str) -> dict[str, torch.Tensor]:
    """What leaves a site in ``phase``: the head's parameters while the body is frozen, else every
    floating-point tensor of the model (integer counters such as ``num_batches_tracked`` stay home)."""
    state = {f"head.{k}": v for k, v in model.head.state_dict().items()} if phase == FROZEN \
        else model.state_dict()
    return {k: v for k, v in state.items() if v.is_floating_point()}


def to_arrays(model: models.Classifier, phase: str) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().float().numpy().copy() for k, v in travelling(model, phase).items()}


def load_arrays(model: models.Classifier, arrays: dict[str, np.ndarray], phase: str) -> None:
    """The global arrays into ``model``; refuses arrays that are not exactly the travelling part."""
    expected = travelling(model, phase)
    shapes = {k: tuple(v.shape) for k, v in expected.items()}
    if {k: tuple(a.shape) for k, a in arrays.items()} != shapes:
        raise DataError("the coordinator sent parameters that do not fit this site's model (different --model, "
                        "--head or classes): use the same imgtune version and options at every party")
    with torch.no_grad():
        for name, tensor in expected.items():
            tensor.copy_(torch.from_numpy(arrays[name]).to(tensor))


def body_digest(model: models.Classifier) -> str:
    """SHA-256 of the frozen body's weights: every party must start from the same backbone, since it
    never travels while frozen."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.body.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class RoundPlan:
    """What the coordinator asks of a site in one round."""

    phase: str  # FROZEN or UNFROZEN
    local_epochs: int
    proximal_mu: float = 0.0  # FedProx: the weight of ||w - w_global||^2 / 2 in the local loss
    round: int = 1  # this round's number in its phase (from 1)
    phase_rounds: int = 0  # the phase's rounds: the lr follows one cosine over all of them; 0: this round's own

    def span(self) -> tuple[int, int] | None:
        """(local epochs before this round, local epochs of the whole phase) of the learning-rate schedule.
        A cosine restarted every round sends each site back to the full lr late in the federation, where
        it drifts towards its own skewed optimum; one schedule over the federation anneals as centralised
        training does (bench/federated.py, docs/benchmarks.md)."""
        if self.phase_rounds < 1:
            return None
        return (self.round - 1) * self.local_epochs, self.phase_rounds * self.local_epochs


def train_round(setup: Setup, arrays: dict[str, np.ndarray], plan: RoundPlan) -> tuple[dict[str, np.ndarray], dict]:
    """Local epochs from the global ``arrays``; returns the updated travelling arrays and the scalars
    that go with them (example count, training loss and accuracy of the last local epoch)."""
    model, train = setup.built.model, setup.config.train
    load_arrays(model, arrays, plan.phase)
    frozen = plan.phase == FROZEN
    body_lr = 0.0 if frozen else train.lr * train.backbone_lr_factor
    phase = Phase(plan.phase, plan.local_epochs, frozen, train.lr, body_lr)
    loaders = build_loaders(setup.source, setup.built, [phase], setup.config.data.augment, setup.config.model.body,
                            setup.loader_options(), setup.device)
    weights = balance.class_weights(loaders.train.dataset.targets(), len(setup.source.classes)) \
        if train.balance == "weights" else None
    local = replace(train, epochs=plan.local_epochs, head_fit="sgd", early_stop=None, keep="final",
                    checkpoint_every=None)
    model.to(setup.device)
    with _proximal(model, plan):
        progress = fit(model, [phase], loaders, local, setup.device, len(setup.source.classes), class_weights=weights,
                       span=plan.span())
    row = progress.rows[-1]
    scalars = {"num-examples": setup.source.size("train"), "train-loss": float(row["train_loss"]),
               "train-accuracy": float(row["train_accuracy"])}
    return to_arrays(model.cpu(), plan.phase), scalars


class _proximal:
    """FedProx's proximal term as a gradient hook: d/dw of mu/2 ||w - w_global||^2 is mu (w - w_global),
    added to every trainable parameter's gradient while the local epochs run."""

    def __init__(self, model: models.Classifier, plan: RoundPlan):
        self.model, self.mu, self.handles = model, plan.proximal_mu, []

    def __enter__(self):
        if self.mu > 0:
            for param in self.model.parameters():
                start = param.detach().clone()
                self.handles.append(param.register_hook(lambda g, p=param, s=start: g + self.mu * (p.detach() - s)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


def evaluate_round(setup: Setup, arrays: dict[str, np.ndarray], phase: str) -> dict:
    """The global model on this site's val split: the confusion matrix (rows true, columns predicted),
    the summed log loss and the example count; the coordinator sums them over sites (pooled figures)."""
    model = setup.built.model
    load_arrays(model, arrays, phase)
    frozen = phase == FROZEN
    step = Phase(phase, 1, frozen, 0.0, 0.0)
    loaders = build_loaders(setup.source, setup.built, [step], "none", setup.config.model.body,
                            setup.loader_options(), setup.device)
    net, loader = (model.head, loaders.frozen_val) if frozen else (model, loaders.val)
    probs, targets, _ = predict_probs(net.to(setup.device), loader, setup.device, "site val")
    probs, targets = np.asarray(probs), np.asarray(targets)
    k = len(setup.source.classes)
    matrix = confusion_matrix(targets, probs.argmax(axis=1), k)
    picked = probs[np.arange(len(targets)), targets]
    return {"num-examples": int(len(targets)), "loss-sum": float(-np.log(np.clip(picked, 1e-12, 1.0)).sum()),
            "matrix": matrix}


def site_counts(setup: Setup) -> dict[str, int]:
    """Images per split (totals only): what the coordinator records about a site's data."""
    return {f"{split}-images": setup.source.size(split) for split in ("train", "val")}
