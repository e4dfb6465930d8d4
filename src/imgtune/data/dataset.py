"""A map-style dataset over checked samples; a file that breaks after the scan is skipped, not fatal."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from ..cache import ArrayStore

from .decode import DecodeError, load_rgb
from .sampler import training_sampler
from .scan import Sample
from .transforms import Preprocessing

log = logging.getLogger(__name__)


class ImageDataset(Dataset):
    """Yields ``(tensor, class index, position)``; ``None`` for a file that fails to load.

    With a ``pixels`` store (see ``imgtune.cache``), each image is decoded once, resized to
    ``resize_size`` on its shorter side exactly as evaluation would, kept as uint8, and every later
    epoch crops and augments those pixels instead of decoding the file again."""

    def __init__(self, samples: Sequence[Sample], classes: Sequence[str], transform: Callable,
                 draft_size: int | None = None, pixels: ArrayStore | None = None,
                 preprocessing: Preprocessing | None = None):
        self.samples = list(samples)
        self.class_to_idx = {c: i for i, c in enumerate(classes)}
        self.transform = transform
        self.draft_size = draft_size
        self.pixels = pixels if preprocessing is not None else None
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.samples)

    def targets(self) -> torch.Tensor:
        return torch.tensor([self.class_to_idx.get(s.label, -1) for s in self.samples], dtype=torch.long)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        try:
            image = self._cached(sample) if self.pixels is not None and sample.digest else \
                load_rgb(sample.path, self.draft_size)
        except DecodeError as exc:
            log.warning("skipping %s during loading: %s", sample.path, exc)
            return None
        return self.transform(image), self.class_to_idx.get(sample.label, -1), index

    def _cached(self, sample: Sample) -> torch.Tensor:
        pixels = self.pixels.get(sample.digest)
        if pixels is None:
            pre = self.preprocessing
            image = load_rgb(sample.path, pre.resize_size)
            resized = F.resize(image, pre.resize_size, InterpolationMode(pre.interpolation), antialias=True)
            pixels = np.array(resized)  # writable, as torch.from_numpy wants
            self.pixels.put(sample.digest, pixels)
        return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)


class ReadAhead:
    """The batches of a dataset, in order, loaded by threads of this process a few batches ahead of the
    model. On a CPU the model's own threads use every core, so worker processes would compete with it
    and cost their start-up; Pillow releases the GIL while it decodes, so threads overlap decoding with
    the model instead of taking turns with it."""

    def __init__(self, dataset: Dataset, batch_size: int, ahead: int = 2):
        self.dataset, self.batch_size, self.ahead = dataset, batch_size, ahead

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self):
        from ..predictions import read_ahead

        for _, items in read_ahead(range(len(self.dataset)), self.dataset.__getitem__, self.batch_size, self.ahead):
            yield collate_skipping_none(items)


def collate_skipping_none(batch):
    """Drop items that failed to load; an all-failed batch gives ``None``."""
    batch = [item for item in batch if item is not None]
    return default_collate(batch) if batch else None


def make_loader(dataset: ImageDataset, batch_size: int, shuffle: bool, num_workers: int,
                seed: int = 0, drop_last: bool = False, sampler=None) -> torch.utils.data.DataLoader:
    """``shuffle``: a new order every epoch from an :class:`EpochSampler` (resumable, unlike the
    DataLoader's own shuffling); ``sampler`` (e.g. a class-balanced one) replaces it. The private
    ``generator`` only seeds worker processes: iterating never draws from the global torch RNG."""
    generator = torch.Generator().manual_seed(seed)
    if shuffle and sampler is None:
        sampler = training_sampler(len(dataset), seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_skipping_none, generator=generator, drop_last=drop_last,
        persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available(),
        worker_init_fn=_seed_worker)


def _seed_worker(worker_id: int) -> None:
    import random

    import numpy as np

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
