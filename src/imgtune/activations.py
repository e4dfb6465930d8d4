"""The frozen lower blocks' activations for ``--unfreeze top:K`` (imgtune.partial), computed once per
image and view and cached on disk (``imgtune.cache``, beside the features and keyed like them), and the
loaders the top blocks train and validate on.

Training images get :data:`partial.VIEWS` views (fewer when the split's activations would pass
:data:`partial.MAX_BYTES`), stored as float16; validation images one, the evaluation view, in float32
(up to :data:`EXACT_MAX_BYTES`), so that a fine-tuned model's final metrics run on them as on the
images (results.py). A training image's evaluation
view is computed before training (it also gives the image's features); its other views when an epoch
first draws them (:class:`ActivationSet`): each epoch draws one view per image, so a view that no epoch
draws is never computed (with 4 views, 4 fine-tuning epochs compute about 2 of the other 3, and a
fine-tuning given up after 2 epochs about 1.3). Each view is seeded by the file's content digest and
its number, so it is the same whenever it is computed.
"""

from __future__ import annotations

import contextlib
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

STORAGE = "float16"  # the training views' (bounded by partial.MAX_BYTES)
EXACT = "float32"  # the validation images', up to EXACT_MAX_BYTES: the final metrics of a fine-tuned model
EXACT_MAX_BYTES = 1 << 30  # run on them as on the images (to float tolerance); float16 above, and images then
FEATURE_BATCH = 64  # evaluation views' activations gathered before the top blocks give their features


def view_transforms(pre: Preprocessing, views: int) -> tuple[list[T.Compose], T.Compose]:
    """The evaluation view, its mirror image, then ``--augment light``'s random crops (seeded by the caller),
    each up to its uint8 tensor; and the scaling and normalisation that follow, the same for every view,
    run once on the stacked views (the same numbers as per view, for a fraction of the calls)."""
    base, normalize = _split_normalization(eval_transform(pre))
    crop, _ = _split_normalization(train_transform(pre, "light"))
    mirror = T.Compose([*base.transforms, T.RandomHorizontalFlip(p=1.0)])  # the crop mirrored
    return [base, mirror, *[crop] * max(0, views - 2)][:views], normalize


def _split_normalization(transform: T.Compose) -> tuple[T.Compose, T.Compose]:
    steps = transform.transforms
    cut = next(i for i, step in enumerate(steps) if isinstance(step, T.ToDtype))
    return T.Compose(steps[:cut]), T.Compose(steps[cut:])


def image_views(image, transforms: list, digest: str, which: list[int]) -> torch.Tensor:
    """(len(which), 3, S, S): view ``v`` of the image for each ``v`` in ``which``, each seeded by the file's
    content digest and ``v``: the same in every run and whichever other views are made, whatever else
    draws random numbers."""
    seed = int(digest[:15], 16) if digest else 0
    made = []
    for v in which:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed + v)  # the CPU's, which the transforms draw from (torch.
            made.append(transforms[v](image))  # manual_seed also seeds every accelerator's, formatting a stack each)
    return torch.stack(made)


@dataclass
class ActivationSet:
    activations: torch.Tensor  # (n, views, ...)
    targets: torch.Tensor  # (n,)
    positions: torch.Tensor  # (n,) index of each row in the split's sample list
    missing: torch.Tensor | None = None  # (n, views) bool: views not computed yet, made by ``fill`` when drawn
    fill: Callable[[ActivationSet, list[tuple[int, int]]], None] | None = None

    @property
    def views(self) -> int:
        return self.activations.shape[1]

    def __len__(self) -> int:
        return len(self.targets) * self.views

    def __getitem__(self, item: int):
        """Item ``i * views + v``: view ``v`` of image ``i``, as float32."""
        i, v = divmod(item, self.views)
        if self.missing is not None and self.missing[i, v]:
            self.fill(self, [(i, v)])
        return self.activations[i, v].float(), self.targets[i], self.positions[i]

    def __getitems__(self, items: list[int]) -> list:
        """A batch (the DataLoader's call): the views it draws that were never computed, made in one pass."""
        if self.missing is not None:
            pairs = sorted({divmod(item, self.views) for item in items})
            pairs = [(i, v) for i, v in pairs if self.missing[i, v]]
            if pairs:
                self.fill(self, pairs)
        return [self[item] for item in items]


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


def store_for(built: BuiltModel, body: str, found: partial.Split, cache_dir, ndim: int,
              dtype: str = STORAGE) -> ArrayStore | None:
    """Each view its own entry (:func:`entry`), of ``ndim`` axes, in ``dtype``."""
    if cache_dir is None or built.weights is None:
        return None
    description = {**features.describe_model(built, body), "cut_after_block": found.cut, "blocks": len(found.blocks),
                   "view_recipe": "0: eval, 1: its mirror, 2+: light crops; each seeded by digest and number",
                   "entry": "one view", "dtype": dtype}
    return activation_store(cache_dir, description, ndim, dtype)


def entry(digest: str, view: int) -> str:
    return f"{digest}-{view}"


@torch.no_grad()
def extract(found: partial.Split, pre: Preprocessing, samples: list[Sample], classes: list[str], views: int,
            store: ArrayStore | None, batch_size: int, pixels: ArrayStore | None = None,
            description: str = "activations", lower: Callable[[], Run] | None = None,
            feature_store: ArrayStore | None = None, dtype: str = STORAGE, lazy: bool = False) -> ActivationSet:
    """The lower blocks' output for ``views`` views of each sample: from ``store`` where present,
    computed (and stored) otherwise, by ``lower()``'s function (default: torch); with ``lazy``, only the
    evaluation view now, the others when first drawn (:class:`ActivationSet`). ``feature_store``: given
    the evaluation view's features of each computed sample on the way (the top blocks run on its
    activation; :mod:`imgtune.features` then finds them cached). ``dtype``: of the activations, in memory
    and in ``store``. Files that fail to load are left out."""
    have: dict[tuple[int, int], np.ndarray] = {}
    if store is not None:
        for i, sample in enumerate(samples):
            for v in range(views) if sample.digest else ():
                if (found_entry := store.get(entry(sample.digest, v))) is not None:
                    have[i, v] = found_entry
    wanted = {i: [v for v in range(views if not lazy else 1) if (i, v) not in have] for i in range(len(samples))}
    wanted = {i: which for i, which in wanted.items() if which}
    if wanted:
        log.info("computing %s of %d image(s), %d view(s) each%s (%d cached)", description, len(wanted),
                 views if not lazy else 1, f" (the other {views - 1} when an epoch first draws them)" if lazy and
                 views > 1 else "", len(samples) - len(wanted))
        made, _ = _compute(found, lower() if lower is not None else found.lower, pre, samples, wanted, store,
                           batch_size, pixels, description, feature_store, dtype)
        have.update(made)
    rows = [i for i in range(len(samples)) if (i, 0) in have and (lazy or all((i, v) in have for v in range(views)))]
    stacked = torch.zeros(len(rows), views, *have[rows[0], 0].shape, dtype=getattr(torch, dtype)) if rows else \
        torch.zeros(0, views, dtype=getattr(torch, dtype))
    missing = torch.ones(len(rows), views, dtype=torch.bool) if lazy else None
    for row, i in enumerate(rows):
        for v in range(views):
            if (i, v) in have:
                stacked[row, v] = torch.from_numpy(have[i, v])
                if missing is not None:
                    missing[row, v] = False
    index = {c: i for i, c in enumerate(classes)}
    targets = torch.tensor([index.get(samples[i].label, -1) for i in rows], dtype=torch.long)
    found_set = ActivationSet(stacked, targets, torch.tensor(rows, dtype=torch.long), missing)
    if lazy:
        def fill(target: ActivationSet, pairs: list[tuple[int, int]]) -> None:
            _fill(target, pairs, found, lower() if lower is not None else found.lower, pre, samples, store,
                  batch_size, pixels, dtype)
        found_set.fill = fill
    return found_set


def _fill(target: ActivationSet, pairs: list[tuple[int, int]], found, run, pre, samples, store, batch_size,
          pixels, dtype: str) -> None:
    """``pairs`` of (row, view) of ``target`` computed (and stored); a file that no longer loads gets its
    evaluation view's activation in their place, with a warning."""
    wanted: dict[int, list[int]] = {}
    for row, v in pairs:
        wanted.setdefault(int(target.positions[row]), []).append(v)
    made, failed = _compute(found, run, pre, samples, wanted, store, batch_size, pixels, None, None, dtype)
    rows = {int(i): row for row, i in enumerate(target.positions)}
    for i in failed:
        log.warning("%s no longer loads: its evaluation view stands in for its other views", samples[i].path)
    for i, which in wanted.items():
        for v in which:
            row = rows[i]
            value = made.get((i, v))
            target.activations[row, v] = torch.from_numpy(value) if value is not None else target.activations[row, 0]
            target.missing[row, v] = False


def _compute(found, run, pre, samples, wanted: dict[int, list[int]], store, batch_size, pixels,
             description: str | None, feature_store, dtype: str) -> tuple[dict[tuple[int, int], np.ndarray], set[int]]:
    """The views ``wanted[i]`` of each sample ``i``: ``({(i, v): activation in dtype}, samples whose file
    failed to load)``. Files are decoded by threads a few batches ahead (Pillow
    releases the GIL); the views are drawn in this thread (their seeded draws use the global generator,
    which threads must not share). ``description``: a progress bar's (None: none)."""
    device = next(found.body.parameters()).device
    with modes_kept(found.body):  # a fill runs mid-epoch, the top blocks training and the lower ones not
        found.body.eval()
        return _compute_views(found, run, pre, samples, wanted, store, batch_size, pixels, description,
                              feature_store, device, dtype)


def _compute_views(found, run, pre, samples, wanted, store, batch_size, pixels, description, feature_store, device,
                   dtype):
    from .predictions import read_ahead

    order = list(wanted)
    dataset = ImageDataset([samples[i] for i in order], [], lambda image: image, draft_size=pre.resize_size,
                           pixels=pixels, preprocessing=pre)
    transforms, normalize = view_transforms(pre, 1 + max(v for which in wanted.values() for v in which))
    made: dict[tuple[int, int], np.ndarray] = {}
    failed: set[int] = set()
    pending: list[tuple[str, torch.Tensor]] = []  # (digest, evaluation view's activation) awaiting features
    most = max(len(which) for which in wanted.values())
    bar = tqdm(total=len(order), desc=description, unit="img", leave=False,
               disable=description is None or quiet_rank())
    for start, loaded in read_ahead(range(len(order)), dataset.__getitem__, max(1, batch_size // most), 2):
        items = [(order[start + j], item[0]) for j, item in enumerate(loaded) if item is not None]
        failed.update(order[start + j] for j, item in enumerate(loaded) if item is None)
        if items:
            images = normalize(torch.cat([image_views(image, transforms, samples[i].digest, wanted[i])
                                          for i, image in items])).to(device)
            # one view at a time: a view's numbers then never depend on which views share its batch (the
            # plan's timing, a resume and an uninterrupted run compute them in different company); ONNX
            # Runtime is no slower per image at a batch of 1 here (docs/benchmarks.md, bench/lower_batch.py)
            acts = torch.cat([run(images[k:k + 1]) for k in range(len(images))]).float().cpu()
            keys = [(i, v) for i, _ in items for v in wanted[i]]
            for (i, v), act in zip(keys, acts):
                digest = samples[i].digest
                if v == 0 and feature_store is not None and digest:
                    pending.append((digest, act))
                value = act.to(getattr(torch, dtype)).numpy()
                made[i, v] = value
                if store is not None and digest:
                    store.put(entry(digest, v), value)
            if len(pending) >= FEATURE_BATCH:
                _put_features(found, pending, feature_store, device)
        bar.update(len(loaded))
    if pending:
        _put_features(found, pending, feature_store, device)
    bar.close()
    return made, failed


@contextlib.contextmanager
def modes_kept(module: torch.nn.Module):
    """Every submodule's train/eval mode as it was afterwards (``module.train(was)`` would also put the
    frozen lower blocks, kept in eval mode, back in training mode)."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


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

    @property
    def exact_val(self) -> bool:
        """The validation activations are float32: a fine-tuned model's final metrics can run on them."""
        return self.val.dataset.activations.dtype == getattr(torch, EXACT)


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

    def store(self, dtype: str = STORAGE) -> ArrayStore | None:
        return store_for(self.built, self.body, self.found, self.options.cache_dir, len(self.shape), dtype)

    def run(self) -> Run:
        if self._run is None:  # made mid-epoch when every evaluation view was cached: the modes kept
            device = next(self.found.body.parameters()).device
            with modes_kept(self.found.body):
                name, self._run = body_engine(self.found.lower_module(), self.found.img_size, device,
                                              self.options.feature_engine, self.store())
            log.info("activations: the lower blocks run on %s", name)
        return self._run

    def extract(self, samples: list[Sample], classes: list[str], views: int, description: str,
                stored: bool = True, lazy: bool = False, dtype: str = STORAGE) -> ActivationSet:
        """:func:`extract` of ``samples``; ``stored=False``: computed every time (the never-worse hold-out).
        In float32 a split is scored as exactly as on its images (to float tolerance)."""
        return extract(self.found, self.built.preprocessing, samples, classes, views,
                       self.store(dtype) if stored else None, self.options.batch_size, self.pixels, description,
                       self.run, self.features, dtype, lazy)


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
    exact = len(val) * math.prod(lower.shape) * np.dtype(EXACT).itemsize <= EXACT_MAX_BYTES
    sets = {"train": lower.extract(train, source.classes, views, "train activations", lazy=True),
            "val": lower.extract(val, source.classes, 1, "val activations", dtype=EXACT if exact else STORAGE)}
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
    device = next(found.body.parameters()).device
    with modes_kept(found.body):
        found.body.eval()
        return tuple(found.lower(torch.zeros(1, 3, found.img_size, found.img_size, device=device)).shape[1:])
