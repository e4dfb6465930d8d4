"""Features of a frozen backbone, computed once per image and cached (``imgtune.cache``).

While the body is frozen (``linear-probe``, and the first phase of ``gradual``) it is a fixed function
of the image, so the head can train on stored features: an epoch then takes milliseconds instead of
a full forward pass of the backbone. The features are those of the evaluation view (resize and
centre crop); augmentation applies only where the backbone trains.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from .cache import ArrayStore, file_sha256, feature_store
from .body_runtime import body_engine
from .data.dataset import ImageDataset, ReadAhead, make_loader
from .data.sampler import training_sampler
from .data.scan import Sample
from .data.transforms import eval_transform
from .inference import batched_calls
from .models import BuiltModel

log = logging.getLogger(__name__)


def describe_model(built: BuiltModel, body: str) -> dict:
    """Everything the features depend on."""
    weights = built.weights
    return {"library": built.spec.library, "name": built.spec.name, "body": body,
            "weights_sha256": file_sha256(weights.path) if weights else None,
            "weights_converted": bool(weights and weights.convert),
            "preprocessing": built.preprocessing.to_dict(), "torch": torch.__version__.split("+")[0]}


@dataclass
class FeatureSet:
    features: torch.Tensor  # (n, num_features) float32
    targets: torch.Tensor  # (n,) class indices
    positions: torch.Tensor  # (n,) index of each row in the split's sample list

    def loader(self, batch_size: int, shuffle: bool, seed: int, drop_last: bool = False, sampler=None):
        """``shuffle``: a resumable :class:`EpochSampler`; ``sampler`` (e.g. a class-balanced one) replaces it."""
        dataset = torch.utils.data.TensorDataset(self.features, self.targets, self.positions)
        if shuffle and sampler is None:
            sampler = training_sampler(len(dataset), seed)
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                                           generator=torch.Generator().manual_seed(seed))


def extract(built: BuiltModel, samples: list[Sample], classes: list[str], store: ArrayStore | None,
            device: torch.device, batch_size: int, workers: int, pixels: ArrayStore | None = None,
            description: str = "features", engine: str = "auto") -> FeatureSet:
    """Features of ``samples``: read from ``store`` where present, computed (and stored) otherwise, the
    body run by ``engine`` (``--feature-engine``, see :mod:`imgtune.body_runtime`). Samples whose file
    fails to load are left out (``positions`` says which rows exist)."""
    rows: dict[int, np.ndarray] = {}
    todo = []
    for i, sample in enumerate(samples):
        cached = store.get(sample.digest) if store is not None and sample.digest else None
        if cached is not None:
            rows[i] = cached
        else:
            todo.append(i)
    if todo:
        log.info("computing %s of %d image(s) (%d cached)", description, len(todo), len(samples) - len(todo))
        run = _body(built, device, engine, store, description)
        rows.update(_compute(built, run, [samples[i] for i in todo], todo, classes, store, batch_size, workers,
                             pixels, description))
    positions = sorted(rows)
    index = {c: i for i, c in enumerate(classes)}
    features = torch.from_numpy(np.stack([rows[i] for i in positions])) if positions else torch.zeros(0, 0)
    targets = torch.tensor([index.get(samples[i].label, -1) for i in positions], dtype=torch.long)
    return FeatureSet(features.float(), targets, torch.tensor(positions, dtype=torch.long))


def _body(built: BuiltModel, device: torch.device, engine: str, store: ArrayStore | None, description: str):
    name, run = body_engine(built.model.body, built.preprocessing.img_size, device, engine, store)
    log.info("%s: the body runs on %s", description, name)
    return run


def _compute(built, run, samples, positions, classes, store, batch_size, workers, pixels, description):
    dataset = ImageDataset(samples, classes, eval_transform(built.preprocessing),
                           draft_size=built.preprocessing.resize_size, pixels=pixels,
                           preprocessing=built.preprocessing)
    loader = ReadAhead(dataset, batch_size) if workers == 0 else make_loader(dataset, batch_size, False, workers)
    out: dict[int, np.ndarray] = {}
    for vectors, _, index in batched_calls(run, loader, description):
        for i, vector in zip(index.tolist(), vectors.numpy()):
            out[positions[i]] = vector
            if store is not None and samples[i].digest:
                store.put(samples[i].digest, vector)
    return out


def store_for(built: BuiltModel, body: str, cache_dir) -> ArrayStore:
    return feature_store(cache_dir, describe_model(built, body), built.model.num_features)


def from_stream(built: BuiltModel, loader, device: torch.device, description: str = "features",
                engine: str = "auto") -> FeatureSet:
    """Features of every item a (non-shuffling) stream loader yields, in its order."""
    vectors, targets = [], []
    for batch, target, _ in batched_calls(_body(built, device, engine, None, description), loader, description):
        vectors.append(batch)
        targets.append(target)
    features = torch.cat(vectors) if vectors else torch.zeros(0, 0)
    labels = torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long)
    return FeatureSet(features, labels, torch.arange(len(labels)))
