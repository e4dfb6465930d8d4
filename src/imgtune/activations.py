"""The frozen lower blocks' activations for ``--unfreeze top:K`` (imgtune.partial), computed once per
image and view and cached on disk as float16 (``imgtune.cache``, beside the features and keyed like
them), and the loaders the top blocks train and validate on.

Training images get :data:`partial.VIEWS` views (fewer when the split's activations would pass
:data:`partial.MAX_BYTES`); validation images one, the evaluation view.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms import v2 as T
from tqdm.auto import tqdm

from . import partial
from .cache import ArrayStore, activation_store
from .data.dataset import ImageDataset
from .data.sampler import EpochSampler, epoch_seed
from .data.scan import Sample
from .data.transforms import Preprocessing, eval_transform, train_transform
from .distributed import quiet_rank
from .features import describe_model
from .errors import UsageError
from .models import BuiltModel

log = logging.getLogger(__name__)

STORAGE = "float16"


def view_transforms(pre: Preprocessing, views: int) -> list:
    """The evaluation view, its mirror image, then ``--augment light``'s random crops (seeded by the caller)."""
    base = eval_transform(pre)
    mirror = T.Compose([T.RandomHorizontalFlip(p=1.0), base])
    return [base, mirror, *[train_transform(pre, "light")] * max(0, views - 2)][:views]


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
    description = {**describe_model(built, body), "cut_after_block": found.cut, "blocks": len(found.blocks),
                   "views": views, "view_recipe": "eval, mirror, light crops seeded by digest", "dtype": STORAGE}
    return activation_store(cache_dir, description, ndim)


@torch.no_grad()
def extract(found: partial.Split, pre: Preprocessing, samples: list[Sample], classes: list[str], views: int,
            store: ArrayStore | None, batch_size: int, pixels: ArrayStore | None = None,
            description: str = "activations") -> ActivationSet:
    """The lower blocks' output for ``views`` views of each sample: from ``store`` where present,
    computed (and stored) otherwise. Files that fail to load are left out."""
    rows = {i: a for i, s in enumerate(samples) if store is not None and s.digest
            and (a := store.get(s.digest)) is not None and a.shape[0] == views}
    todo = [i for i in range(len(samples)) if i not in rows]
    if todo:
        log.info("computing %s of %d image(s), %d view(s) each (%d cached)", description, len(todo), views,
                 len(samples) - len(todo))
        rows.update(_compute(found, pre, samples, todo, classes, views, store, batch_size, pixels, description))
    positions = sorted(rows)
    index = {c: i for i, c in enumerate(classes)}
    stacked = torch.from_numpy(np.stack([rows[i] for i in positions]))
    targets = torch.tensor([index.get(samples[i].label, -1) for i in positions], dtype=torch.long)
    return ActivationSet(stacked, targets, torch.tensor(positions, dtype=torch.long))


def _compute(found, pre, samples, todo, classes, views, store, batch_size, pixels, description):
    dataset = ImageDataset([samples[i] for i in todo], classes, lambda image: image,
                           draft_size=pre.resize_size, pixels=pixels, preprocessing=pre)
    transforms = view_transforms(pre, views)
    was, device = found.body.training, next(found.body.parameters()).device
    found.body.eval()
    out: dict[int, np.ndarray] = {}
    per_batch = max(1, batch_size // views)
    bar = tqdm(total=len(todo), desc=description, unit="img", leave=False, disable=quiet_rank())
    for start in range(0, len(todo), per_batch):
        items = [(k, dataset[k]) for k in range(start, min(start + per_batch, len(todo)))]
        items = [(k, item[0]) for k, item in items if item is not None]
        if items:
            images = torch.cat([image_views(image, transforms, samples[todo[k]].digest) for k, image in items])
            acts = found.lower(images.to(device)).cpu()
            acts = acts.reshape(len(items), views, *acts.shape[1:])
            for (k, _), value in zip(items, acts.to(getattr(torch, STORAGE)).numpy()):
                out[todo[k]] = value
                if store is not None and samples[todo[k]].digest:
                    store.put(samples[todo[k]].digest, value)
        bar.update(per_batch)
    bar.close()
    found.body.train(was)
    return out


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


def partial_loaders(source, built: BuiltModel, body: str, options, limit: int = partial.MAX_BYTES) -> PartialLoaders:
    """Activations of the training split (several views) and of the validation split (one), as loaders."""
    from .balance import balanced_sampler
    from .cache import pixel_store
    from .data.sampler import evaluation_sampler
    from .data.sources import drop_last_batch

    pre = built.preprocessing
    found = partial.split(built.model.body, options.unfreeze_top, pre.img_size)
    train, val = source.splits.split("train"), source.splits.split("val")
    shape = activation_shape(found)
    views = views_within(len(train), shape, partial.VIEWS, limit)
    if views < 1:
        raise UsageError(f"--unfreeze top:{options.unfreeze_top}: one view of each training image's activations "
                         f"needs more than {limit / 2**30:.1f} GiB; use a higher K (a smaller activation) or "
                         "--unfreeze all")
    if views < partial.VIEWS:
        log.warning("--unfreeze top:%d: %d view(s) per training image (not %d) keep the cached activations within "
                    "%.1f GiB", options.unfreeze_top, views, partial.VIEWS, limit / 2**30)
    pixels = pixel_store(options.cache_dir, pre.resize_size, pre.interpolation) if options.cache_dir else None
    sets = {name: extract(found, pre, samples, source.classes, count,
                          store_for(built, body, found, count, options.cache_dir, len(shape) + 1), options.batch_size, pixels,
                          f"{name} activations") for name, samples, count in (("train", train, views), ("val", val, 1))}
    n, targets = len(sets["train"].targets), sets["train"].targets
    balanced = balanced_sampler(targets, len(source.classes), options.seed) if options.balanced else None
    # private generators: iterating a loader then never draws from the global torch RNG, which a resumed
    # epoch restores to where it stopped (dropout's draws would shift by one otherwise)
    train_loader = torch.utils.data.DataLoader(sets["train"], batch_size=options.batch_size,
                                               sampler=ViewSampler(n, views, options.seed, balanced),
                                               drop_last=drop_last_batch(n, options.batch_size),
                                               generator=torch.Generator().manual_seed(options.seed))
    val_loader = torch.utils.data.DataLoader(sets["val"], batch_size=options.batch_size,
                                             sampler=evaluation_sampler(len(sets["val"])),
                                             generator=torch.Generator().manual_seed(options.seed))
    return PartialLoaders(found, train_loader, val_loader)


@torch.no_grad()
def activation_shape(found: partial.Split) -> tuple[int, ...]:
    was, device = found.body.training, next(found.body.parameters()).device
    found.body.eval()
    shape = tuple(found.lower(torch.zeros(1, 3, found.img_size, found.img_size, device=device)).shape[1:])
    found.body.train(was)
    return shape
