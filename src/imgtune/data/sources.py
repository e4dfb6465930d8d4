"""Where training images come from, behind one interface.

- :class:`FolderSource`: a folder tree or a CSV, every file checked and split (``scan.load_splits``);
  random access, so the disk caches (decoded pixels, backbone features) and class-balanced sampling
  apply.
- :class:`ShardSource`: WebDataset shards (``shards.py``), read as a stream; checked when ``imgtune
  shard`` wrote them; features of a frozen backbone are computed by streaming each split once.

Each source owns its checks and builds its own loaders; :func:`build_loaders` asks every source the
same questions, so the training flow never asks which kind it has.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import balance, distributed, features, partial
from ..cache import ArrayStore, pixel_store
from ..config import RunConfig
from ..engine import Loaders
from ..errors import UsageError
from ..activations import partial_loaders
from ..models import BuiltModel
from ..strategies import Phase
from . import content
from .checks import check_duplicates
from .dataset import ImageDataset, make_loader
from .sampler import evaluation_sampler, training_sampler
from .scan import DataSplits, load_splits
from .shards import ShardSplits, is_shards, load_manifest, stream_loader
from .transforms import Preprocessing, eval_transform, train_transform

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoaderOptions:
    """How loaders are made, the same for every source."""

    batch_size: int  # per process (the global batch split across ranks)
    workers: int
    seed: int
    balanced: bool  # class-balanced sampling of the training split (--balance sampler)
    cache_dir: Path | None  # the disk caches' folder; None: no disk caches (--no-cache)
    feature_engine: str = "auto"  # what runs the frozen body (--feature-engine, imgtune.body_runtime)
    unfreeze_top: int | None = None  # --unfreeze top:K (imgtune.partial); None: all


class _Source:
    """What every source has: the found splits' classes, layout, skipped files, counts and summary.
    Each source adds ``size``, ``check``, ``images`` and ``features``. ``train_weights``: how often each
    training image is drawn relative to the others (pseudo-labelled images count less: semi_train.py)."""

    train_weights: torch.Tensor | None = None

    def __init__(self, splits: DataSplits | ShardSplits, source: str):
        self.splits, self.source = splits, source
        self.classes, self.layout, self.skipped = splits.classes, splits.layout, splits.skipped

    def counts(self) -> dict[str, dict[str, int]]:
        return self.splits.counts()

    def summary(self) -> dict:
        return self.splits.summary()

    def files(self) -> content.Files | None:
        """Every image's (path, label, digest) per split, where the source knows them (``content.py``)."""
        return None

    def image_sides(self) -> list[int]:
        """The shorter side of every training image, where the source knows them (``sizing.py``)."""
        return []

    def content(self) -> dict[str, str] | None:
        """One digest per split of the images' content (what a resume compares), where known."""
        files = self.files()
        return content.split_digests(files) if files is not None else None


class FolderSource(_Source):
    """A folder of class folders (split or not) or a CSV, checked and split."""

    def files(self) -> content.Files:
        if getattr(self, "_files", None) is None:  # computed once: meta.json and data_files.json.gz need it
            self._files = content.folder_files(self.splits.samples, self.source)
        return self._files

    def size(self, split: str) -> int:
        return len(self.splits.split(split))

    def image_sides(self) -> list[int]:
        return [min(s.shape) for s in self.splits.split("train") if s.shape]

    def check(self, config: RunConfig) -> None:
        """Copies of a file across splits or classes stop training unless ``--allow-leakage``."""
        check_duplicates(self.splits, self.source, config.data.allow_leakage)

    def images(self, split: str, transform, shuffle: bool, options: LoaderOptions, pre: Preprocessing,
               cache_pixels: bool) -> torch.utils.data.DataLoader:
        """``cache_pixels``: decode each image once into the pixel cache (worth it when the backbone
        trains, reading the images every epoch)."""
        members = self.splits.split(split)
        pixels = pixel_store(options.cache_dir, pre.resize_size, pre.interpolation) \
            if cache_pixels and options.cache_dir is not None else None
        dataset = ImageDataset(members, self.classes, transform, draft_size=pre.resize_size, pixels=pixels,
                               preprocessing=pre)
        sampler = train_sampler(self, dataset.targets(), torch.arange(len(dataset)), options) if shuffle else \
            evaluation_sampler(len(dataset))
        drop_last = shuffle and drop_last_batch(len(members), options.batch_size)
        return make_loader(dataset, options.batch_size, shuffle, options.workers, options.seed, drop_last,
                           sampler=sampler)

    def features(self, split: str, built: BuiltModel, body: str, options: LoaderOptions,
                 device: torch.device) -> features.FeatureSet:
        """The frozen backbone's features, from the disk cache where present. In distributed training
        each rank first computes its share into the cache, so nobody waits for one rank doing all."""
        samples = self.splits.split(split)
        store = features.store_for(built, body, options.cache_dir) \
            if options.cache_dir is not None and built.weights else None
        args = (built, samples, self.classes, store, device, options.batch_size, options.workers)
        ctx = distributed.current()
        if ctx.enabled and store is not None:
            features.extract(built, samples[ctx.rank::ctx.world], *args[2:], engine=options.feature_engine,
                             description=f"{split} features (share of rank {ctx.rank})")
            distributed.barrier()
        return features.extract(*args, description=f"{split} features", engine=options.feature_engine)


class ShardSource(_Source):
    """WebDataset shards listed by a manifest (a folder, a ``dataset.json``, or its URL)."""

    def content(self) -> dict[str, str] | None:
        """The split digests ``imgtune shard`` wrote into the manifest (None in older manifests)."""
        return self.splits.content

    def size(self, split: str) -> int:
        return self.splits.size(split) if split in self.splits.urls else 0

    def check(self, config: RunConfig) -> None:
        """The files were checked when ``imgtune shard`` wrote them; what a stream cannot do is refused."""
        if config.train.balance == "sampler":
            raise UsageError("--balance sampler needs random access to the images; shards are read as a stream: "
                             "use --balance weights (class weights from the manifest's counts)")
        if config.train.unfreeze not in ("all", partial.AUTO):
            raise UsageError("--unfreeze top:K caches activations by file; shards are read as a stream: use "
                             "--unfreeze all")
        if config.train.checkpoint_every:
            raise UsageError("--checkpoint-every: a stream cannot resume in the middle of an epoch; checkpoints "
                             "are written at the end of every epoch (resume restarts at the next one)")

    def images(self, split: str, transform, shuffle: bool, options: LoaderOptions, pre: Preprocessing,
               cache_pixels: bool):
        """(No pixel cache: the disk caches are keyed by files, and a stream has none.)"""
        return stream_loader(self.splits, split, transform, options.batch_size, shuffle, options.workers,
                             options.seed, pre.resize_size)

    def features(self, split: str, built: BuiltModel, body: str, options: LoaderOptions,
                 device: torch.device) -> features.FeatureSet:
        """Computed by streaming the split once, kept in memory."""
        stream = self.images(split, eval_transform(built.preprocessing), False, options, built.preprocessing,
                             False)
        return features.from_stream(built, stream, device, f"{split} features", options.feature_engine)


DataSource = FolderSource | ShardSource


def open_source(source: str, val_fraction: float, test_fraction: float, seed: int,
                progress: bool = True, allow_outside_paths: bool = False,
                extra_labels: str | None = None, checks: ArrayStore | None = None) -> DataSource:
    """A folder or CSV (checked and split), or the manifest of WebDataset shards (streamed)."""
    if is_shards(source):
        if extra_labels:
            raise UsageError("--extra-labels adds files to a folder or CSV dataset; for shards, add the images to "
                             "the data and write the shards again (imgtune shard)")
        return ShardSource(load_manifest(source), source)
    return FolderSource(load_splits(source, val_fraction, test_fraction, seed, progress, allow_outside_paths,
                                    extra_labels, checks),
                        source)


def total_images(source: DataSource) -> int:
    return sum(source.size(name) for name in ("train", "val", "test"))


def build_loaders(source: DataSource, built: BuiltModel, phases: list[Phase], augment: str, body: str,
                  options: LoaderOptions, device: torch.device, lower=None) -> Loaders:
    """Image loaders for every split, plus loaders of the frozen backbone's features for the phases
    where it is frozen (test features only when the last phase is frozen: the final metrics), and with
    ``--unfreeze top:K`` of the lower blocks' activations (``lower``: an :class:`activations.Lower` made
    before, else one is made)."""
    pre = built.preprocessing
    body_trains = not all(p.body_frozen for p in phases)

    def images(name: str, transform, shuffle: bool):
        return source.images(name, transform, shuffle, options, pre, body_trains) if source.size(name) else None

    loaders = Loaders(images("train", train_transform(pre, augment), True), images("val", eval_transform(pre), False),
                      images("test", eval_transform(pre), False))
    if options.unfreeze_top is not None and body_trains:  # first: it gives the features of what it computes
        loaders.partial = partial_loaders(source, built, body, options, lower=lower)
    if any(p.body_frozen for p in phases):
        names = ("train", "val", "test") if phases[-1].body_frozen else ("train", "val")
        sets = {name: source.features(name, built, body, options, device) for name in names if source.size(name)}
        targets, positions = sets["train"].targets, sets["train"].positions
        sampler = train_sampler(source, targets, positions, options)
        loaders.frozen_train = sets["train"].loader(options.batch_size, True, options.seed,
                                                    drop_last_batch(len(targets), options.batch_size), sampler)
        if source.train_weights is not None:
            loaders.frozen_train_weights = source.train_weights[positions]
        loaders.frozen_val = _frozen_eval(sets["val"], options)
        loaders.frozen_test = _frozen_eval(sets["test"], options) if "test" in sets else None
    return loaders


def train_sampler(source: DataSource, targets: torch.Tensor, positions: torch.Tensor, options: LoaderOptions):
    """The training split's sampler: class-balanced (``--balance sampler``) and/or drawing each image as
    often as its weight (``source.train_weights``), else None (the loader's shuffling)."""
    weights = source.train_weights[positions] if source.train_weights is not None else None
    if options.balanced:
        sampler = balance.balanced_sampler(targets, len(source.classes), options.seed)
        if weights is not None:
            sampler.weights = sampler.weights * weights
        return sampler
    return training_sampler(len(targets), options.seed, weights=weights) if weights is not None else None


def _frozen_eval(found: features.FeatureSet, options: LoaderOptions):
    return found.loader(options.batch_size, False, options.seed, sampler=evaluation_sampler(len(found.targets)))


def drop_last_batch(n: int, batch_size: int) -> bool:
    """Drop a last batch of one image: batch norm cannot train on it."""
    return n % batch_size == 1
