"""The order in which training items are drawn: a pure function of (seed, epoch), so that a checkpoint
need only say which epoch it is in and how many items were used to continue with the same batches.

Like torch's ``DistributedSampler``, each epoch's order comes from a generator seeded with
``(seed, epoch)``; call :meth:`EpochSampler.set_epoch` before iterating. ``start`` skips the items an
interrupted epoch had already trained on. A sharded variant (one slice of the order per process)
would override :meth:`EpochSampler.order` only, e.g. ``return super().order()[rank::world_size]``
after padding the order to a multiple of ``world_size``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def epoch_seed(seed: int, epoch: int) -> int:
    """Distinct for every (seed, epoch): ``seed + epoch`` would give seed 1 the orders of seed 0 shifted
    by one epoch."""
    return (seed * 1_000_003 + epoch) % 2**63


class EpochSampler(torch.utils.data.Sampler[int]):
    """A random permutation of ``range(n)`` per epoch; with ``weights``, ``n`` draws with replacement,
    item ``i`` with probability proportional to ``weights[i]`` (class-balanced sampling)."""

    def __init__(self, n: int, seed: int, weights: torch.Tensor | None = None):
        if weights is not None and len(weights) != n:
            raise ValueError(f"{len(weights)} weights for {n} items")
        self.n = n
        self.seed = seed
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Draw the order of ``epoch``; begin at its ``start``-th item (items before were trained on)."""
        self.epoch, self.start = epoch, start

    def order(self) -> list[int]:
        """The whole order of the current epoch, ``start`` ignored."""
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        if self.weights is None:
            return torch.randperm(self.n, generator=generator).tolist()
        if self.n == 0:
            return []
        return torch.multinomial(self.weights, self.n, replacement=True, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start:])

    def __len__(self) -> int:
        """A whole epoch's items, whatever ``start``: learning-rate schedules and progress bars count
        whole epochs (the bar of a resumed epoch starts at the batches already done)."""
        return self.n

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start": self.start}

    def load_state_dict(self, state: dict) -> None:
        self.set_epoch(int(state["epoch"]), int(state["start"]))


class ShardedEpochSampler(EpochSampler):
    """One rank's share of :class:`EpochSampler`'s order (distributed training): items ``rank``,
    ``rank + world``, ... of the whole order, padded by wrapping around so every rank takes the same
    number of steps. Together, step k of all ranks covers the same items as step k of one process
    whose batch is ``world`` times larger."""

    def __init__(self, n: int, seed: int, rank: int, world: int, weights: torch.Tensor | None = None):
        super().__init__(n, seed, weights)
        self.rank, self.world = rank, world

    def order(self) -> list[int]:
        full = super().order()
        per_rank = -(-len(full) // self.world)
        padded = (full * (1 + per_rank * self.world // max(1, len(full))))[:per_rank * self.world]
        return padded[self.rank::self.world]

    def __len__(self) -> int:
        return -(-self.n // self.world)


class ShardSampler(torch.utils.data.Sampler[int]):
    """Evaluation in distributed training: items ``rank``, ``rank + world``, ... in order, unpadded, so
    gathering every rank's predictions counts each image exactly once."""

    def __init__(self, n: int, rank: int, world: int):
        self.n, self.rank, self.world = n, rank, world

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


def training_sampler(n: int, seed: int, weights: torch.Tensor | None = None) -> EpochSampler:
    """The training order for this process: the whole order, or this rank's share of it."""
    from ..distributed import current

    ctx = current()
    if ctx.enabled:
        return ShardedEpochSampler(n, seed, ctx.rank, ctx.world, weights)
    return EpochSampler(n, seed, weights)


def evaluation_sampler(n: int) -> ShardSampler | None:
    from ..distributed import current

    ctx = current()
    return ShardSampler(n, ctx.rank, ctx.world) if ctx.enabled else None
