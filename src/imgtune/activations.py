"""The frozen lower blocks' activations for ``--unfreeze top:K`` (imgtune.partial), computed once per
image and view and cached on disk as float16 (``imgtune.cache``, beside the features and keyed like
them), and the loaders the top blocks train and validate on.

Training images get :data:`partial.VIEWS` views (fewer when the split's activations would pass
:data:`partial.MAX_BYTES`); validation images one, the evaluation view.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms import v2 as T
from tqdm.auto import tqdm

from . import features, partial
from .body_runtime import Run, body_engine
from .cache import ArrayStore, activation_store
from .data.dataset import ImageDataset
from .data.sampler import EpochSampler, epoch_seed
from .data.scan import Sample
from .data.transforms import Preprocessing, eval_transform, train_transform
from .distributed import quiet_rank
from .errors import UsageError
from .models import BuiltModel

log = logging.getLogger(__name__)

STORAGE = "float16"
FEATURE_BATCH = 64  # evaluation views' activations gathered before the top blocks give their features


def view_transforms(pre: Preprocessing, views: int) -> tuple[list[T.Compose], T.Compose]:
    """The evaluation view, its mirror image, then ``--augment light``'s random crops (seeded by the caller),
    each up to its uint8 tensor; and the scaling and normalisation that follow, the same for every view,
    run once on the stacked views (the same numbers as per view, for a fraction of the calls)."""
    base, normalize = _split_normalization(eval_transform(pre))
    crop, _ = _split_normalization(train_transform(pre, "light"))
    mirror = T.Compose([T.RandomHorizontalFlip(p=1.0), *base.transforms])
    return [base, mirror, *[crop] * max(0, views - 2)][:views], normalize


def _split_normalization(transform: T.Compose) -> tuple[T.Compose, T.Compose]:
    steps = transform.transforms
    cut = next(i for i, step in enumerate(steps) if isinstance(step, T.ToDtype))
    return T.Compose(steps[:cut]), T.Compose(steps[cut:])


def image_views(image, transforms: list, digest: str) -> torch.Tensor:
    """(views, 3, S, S): the same for the same file content in every run, whatever else draws random numbers."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(digest[:15], 16) if digest else 0)
        return torch.stack([transform(image) for transform in transforms])


@dataclass
class ActivationSet:
    activations: torch.Tensor  # (n, views, ...) in the storage dtype
    targets: torch.Tensor  # (n,)
    positions: torch.Tensor  # (n,) index of each row in the split's sample list

    @property
    def views(self) -> int:
        return self.activations.shape[1]

    def __len__(self) -> int:
        return len(self.targets) * self.views

    def __getitem__(self, item: int):
        """Item ``i * views + v``: view ``v`` of image ``i``, as float32."""
        i, v = divmod(item, self.views)
        return self.activations[i, v].float(), self.targets[i], self.positions[i]


class ViewSampler(EpochSampler):
    """Each epoch, every image once (in :class:`EpochSampler`'s order; with ``base``'s weights, e.g. the
    class-balanced draws of ``--balance sampler``), with one of its views at random."""

    def __init__(self, images: int, views: int, seed: int, base: EpochSampler | None = None):
        super().__init__(images, seed, base.weights if base is not None else None)
        self.views = views

    def order(self) -> list[int]:
        images = super().order()
        generator = torch.Generator().manual_seed(epoch_seed(self.seed + 1, self.epoch))
        chosen = torch.randint(self.views, (len(images),), generator=generator).tolist()
        return [i * self.views + v for i, v in zip(images, chosen)]


def store_for(built: BuiltModel, body: str, found: partial.Split, views: int, cache_dir,
              ndim: int) -> ArrayStore | None:
    if cache_dir is None or built.weights is None:
        return None
    description = {**features.describe_model(built, body), "cut_after_block": found.cut, "blocks": len(found.blocks),
                   "views": views, "view_recipe": "eval, mirror, light crops seeded by digest", "dtype": STORAGE}
    return activation_store(cache_dir, description, ndim)


@torch.no_grad()
def extract(found: partial.Split, pre: Preprocessing, samples: list[Sample], classes: list[str], views: int,
            store: ArrayStore | None, batch_size: int, pixels: ArrayStore | None = None,
            description: str = "activations", lower: Callable[[], Run] | None = None,
            feature_store: ArrayStore | None = None, dtype: str = STORAGE) -> ActivationSet:
    """The lower blocks' output for ``views`` views of each sample: from ``store`` where present,
    computed (and stored) otherwise, by ``lower()``'s function (default: torch). ``feature_store``: the
    feature store, given the evaluation view's features of each computed sample on the way (the top
    blocks run on its activation; :mod:`imgtune.features` then finds them cached). ``dtype``: of the
    computed activations in memory (the store keeps :data:`STORAGE`). Files that fail to load are left
    out."""
    rows = {i: a for i, s in enumerate(samples) if store is not None and s.digest
            and (a := store.get(s.digest)) is not None and a.shape[0] == views}
    todo = [i for i in range(len(samples)) if i not in rows]
    if todo:
        log.info("computing %s of %d image(s), %d view(s) each (%d cached)", description, len(todo), views,
                 len(samples) - len(todo))
        rows.update(_compute(found, lower, pre, samples, todo, classes, views, store, batch_size, pixels,
                             description, feature_store, dtype))
    positions = sorted(rows)
    index = {c: i for i, c in enumerate(classes)}
    stacked = torch.from_numpy(np.stack([rows[i] for i in positions]))
    targets = torch.tensor([index.get(samples[i].label, -1) for i in positions], dtype=torch.long)
    return ActivationSet(stacked, targets, torch.tensor(positions, dtype=torch.long))


def _compute(found, lower, pre, samples, todo, classes, views, store, batch_size, pixels, description,
             feature_store, dtype):
    """Files are decoded by threads a few batches ahead (Pillow releases the GIL); the views are drawn in
    this thread (their seeded draws use the global generator, which threads must not share)."""
    from .predictions import read_ahead

    dataset = ImageDataset([samples[i] for i in todo], classes, lambda image: image,
                           draft_size=pre.resize_size, pixels=pixels, preprocessing=pre)
    transforms, normalize = view_transforms(pre, views)
    was, device = found.body.training, next(found.body.parameters()).device
    run = lower() if lower is not None else found.lower
    found.body.eval()
    out: dict[int, np.ndarray] = {}
    pending: list[tuple[str, torch.Tensor]] = []  # (digest, evaluation view's activation) awaiting features
    bar = tqdm(total=len(todo), desc=description, unit="img", leave=False, disable=quiet_rank())
    for start, loaded in read_ahead(range(len(todo)), dataset.__getitem__, max(1, batch_size // views), 2):
        items = [(start + j, item[0]) for j, item in enumerate(loaded) if item is not None]
        if items:
            images = torch.cat([image_views(image, transforms, samples[todo[k]].digest) for k, image in items])
            acts = run(normalize(images).to(device)).float().cpu()
            acts = acts.reshape(len(items), views, *acts.shape[1:])
            if feature_store is not None:  # view 0 is the evaluation view: the features' own input
                pending += [(samples[todo[k]].digest, act) for (k, _), act in zip(items, acts[:, 0])
                            if samples[todo[k]].digest]
                if len(pending) >= FEATURE_BATCH:
                    _put_features(found, pending, feature_store, device)
            values = acts.to(getattr(torch, STORAGE)).numpy()
            kept = values if dtype == STORAGE else acts.to(getattr(torch, dtype)).numpy()
            for (k, _), value, in_memory in zip(items, values, kept):
                out[todo[k]] = in_memory
                if store is not None and samples[todo[k]].digest:
                    store.put(samples[todo[k]].digest, value)
        bar.update(len(loaded))
    if pending:
        _put_features(found, pending, feature_store, device)
    bar.close()
    found.body.train(was)
    return out


def _put_features(found: partial.Split, pending: list, feature_store: ArrayStore, device) -> None:
    """The top blocks on the evaluation views' activations, in batches (each call of ``upper`` also runs
    a stand-in), stored as those images' features; ``pending`` is emptied."""
    vectors = found.upper(torch.stack([act for _, act in pending]).to(device)).float().cpu().numpy()
    for (digest, _), vector in zip(pending, vectors):
        feature_store.put(digest, vector)
    pending.clear()


def views_within(samples: int, shape: tuple[int, ...], wanted: int, limit: int) -> int:
    """The views per image whose activations stay within ``limit`` bytes (0 when not even one does)."""
    per_view = math.prod(shape) * np.dtype(STORAGE).itemsize
    return min(wanted, limit // max(1, samples * per_view))


@dataclass
class PartialLoaders:
    """What the engine's partial phase trains and validates on (``engine.Loaders.partial``)."""

    found: partial.Split
    train: torch.utils.data.DataLoader
    val: torch.utils.data.DataLoader

    def net(self, model) -> partial.PartialNet:
        return partial.PartialNet(model, self.found)


class Lower:
    """A run's frozen lower blocks (``--unfreeze top:K``): the cut, the engine that runs them (ONNX Runtime
    on a CPU, as the features' body, ``--feature-engine``; made on first use, the exported part kept in
    the activation store's folder) and the stores. Computing a sample's activations also gives its
    features (the top blocks on the evaluation view), stored in the feature store: the features of the
    splits whose activations are computed cost no second pass of the body."""

    def __init__(self, built: BuiltModel, body: str, options):
        from .cache import pixel_store

        pre = built.preprocessing
        self.built, self.body, self.options = built, body, options
        self.found = partial.split(built.model.body, options.unfreeze_top, pre.img_size)
        self.shape = activation_shape(self.found)
        cache = options.cache_dir
        self.pixels = pixel_store(cache, pre.resize_size, pre.interpolation) if cache else None
        self.features = features.store_for(built, body, cache) if cache is not None and built.weights else None
        self._run: Run | None = None

    def store(self, views: int) -> ArrayStore | None:
        return store_for(self.built, self.body, self.found, views, self.options.cache_dir, len(self.shape) + 1)

    def run(self) -> Run:
        if self._run is None:
            device = next(self.found.body.parameters()).device
            name, self._run = body_engine(self.found.lower_module(), self.found.img_size, device,
                                          self.options.feature_engine, self.store(1))
            log.info("activations: the lower blocks run on %s", name)
        return self._run

    def extract(self, samples: list[Sample], classes: list[str], views: int, description: str,
                stored: bool = True) -> ActivationSet:
        """:func:`extract` of ``samples``; ``stored=False``: computed every time and kept in float32 (the
        never-worse hold-out, scored as exactly as on its images)."""
        return extract(self.found, self.built.preprocessing, samples, classes, views,
                       self.store(views) if stored else None, self.options.batch_size, self.pixels, description,
                       self.run, self.features, STORAGE if stored else "float32")


def partial_loaders(source, built: BuiltModel, body: str, options, limit: int = partial.MAX_BYTES,
                    lower: Lower | None = None) -> PartialLoaders:
    """Activations of the training split (several views) and of the validation split (one), as loaders."""
    from .balance import balanced_sampler
    from .data.sources import drop_last_batch

    lower = lower if lower is not None else Lower(built, body, options)
    train, val = source.splits.split("train"), source.splits.split("val")
    views = views_within(len(train), lower.shape, partial.VIEWS, limit)
    if views < 1:
        raise UsageError(f"--unfreeze top:{options.unfreeze_top}: one view of each training image's activations "
                         f"needs more than {limit / 2**30:.1f} GiB; use a higher K (a smaller activation) or "
                         "--unfreeze all")
    if views < partial.VIEWS:
        log.warning("--unfreeze top:%d: %d view(s) per training image (not %d) keep the cached activations within "
                    "%.1f GiB", options.unfreeze_top, views, partial.VIEWS, limit / 2**30)
    sets = {name: lower.extract(samples, source.classes, count, f"{name} activations")
            for name, samples, count in (("train", train, views), ("val", val, 1))}
    n, targets = len(sets["train"].targets), sets["train"].targets
    balanced = balanced_sampler(targets, len(source.classes), options.seed) if options.balanced else None
    # private generators: iterating a loader then never draws from the global torch RNG, which a resumed
    # epoch restores to where it stopped (dropout's draws would shift by one otherwise)
    train_loader = torch.utils.data.DataLoader(sets["train"], batch_size=options.batch_size,
                                               sampler=ViewSampler(n, views, options.seed, balanced),
                                               drop_last=drop_last_batch(n, options.batch_size),
                                               generator=torch.Generator().manual_seed(options.seed))
    return PartialLoaders(lower.found, train_loader, evaluation_loader(sets["val"], options))


def evaluation_loader(found: ActivationSet, options) -> torch.utils.data.DataLoader:
    from .data.sampler import evaluation_sampler

    return torch.utils.data.DataLoader(found, batch_size=options.batch_size, sampler=evaluation_sampler(len(found)),
                                       generator=torch.Generator().manual_seed(options.seed))


@torch.no_grad()
def activation_shape(found: partial.Split) -> tuple[int, ...]:
    was, device = found.body.training, next(found.body.parameters()).device
    found.body.eval()
    shape = tuple(found.lower(torch.zeros(1, 3, found.img_size, found.img_size, device=device)).shape[1:])
    found.body.train(was)
    return shape
