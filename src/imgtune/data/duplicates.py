"""Exact and near-duplicate images, and what they mean for a dataset: copies within a class (harmless
but wasteful), across classes (a label conflict: one of the labels is wrong), across splits (leakage:
the model is tested on what it trained on, and every metric is inflated).

Exact: the same bytes (``Sample.digest``). Near: close perceptual fingerprints (``fingerprint.py``).
Used by ``imgtune train`` (the cheap checks before training) and ``imgtune doctor``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .fingerprint import near_pairs, stack
from .scan import Sample


@dataclass(frozen=True)
class DuplicateGroup:
    match: str  # "exact" or "near"
    members: tuple[Sample, ...]
    bits: int = 0  # near: the largest fingerprint distance among the pairs that link the group

    @property
    def labels(self) -> set[str]:
        return {s.label for s in self.members}

    @property
    def splits(self) -> set[str | None]:
        return {s.split for s in self.members}

    def kinds(self) -> list[str]:
        """``across-classes``, ``across-splits`` (either or both), else ``within-class``."""
        kinds = (["across-classes"] if len(self.labels) > 1 else []) + \
                (["across-splits"] if len(self.splits) > 1 else [])
        return kinds or ["within-class"]


def exact_groups(samples: list[Sample]) -> list[DuplicateGroup]:
    by_digest: dict[str, list[Sample]] = {}
    for sample in samples:
        if sample.digest:
            by_digest.setdefault(sample.digest, []).append(sample)
    return [DuplicateGroup("exact", tuple(group)) for group in by_digest.values() if len(group) > 1]


def near_groups(samples: list[Sample]) -> list[DuplicateGroup]:
    """Groups of near-duplicates (linked pairs, transitively), leaving out pairs that are exact copies."""
    distinct = _one_per_digest([s for s in samples if s.fingerprint])
    pairs = near_pairs(stack([s.fingerprint for s in distinct]))
    parent = list(range(len(distinct)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    worst: dict[int, int] = {}
    for i, j, bits in pairs:
        a, b = root(i), root(j)
        parent[b] = a
        worst[a] = max(worst.get(a, 0), worst.pop(b, 0), bits)
    members: dict[int, list[Sample]] = {}
    for i, sample in enumerate(distinct):
        members.setdefault(root(i), []).append(sample)
    copies = _copies(samples)
    return [DuplicateGroup("near", tuple(c for s in group for c in copies.get(s.digest, [s])),
                           worst.get(r, 0))
            for r, group in members.items() if len(group) > 1]


def leaks_into(train: list[Sample], others: list[Sample]) -> list[tuple[Sample, Sample, int]]:
    """Near-duplicate pairs (other, train image, bits) between the held-out splits and train."""
    queries, prints = [s for s in others if s.fingerprint], [s for s in train if s.fingerprint]
    pairs = near_pairs(stack([s.fingerprint for s in prints]), stack([s.fingerprint for s in queries]))
    return [(queries[i], prints[j], bits) for i, j, bits in pairs if queries[i].digest != prints[j].digest]


def _one_per_digest(samples: list[Sample]) -> list[Sample]:
    seen: dict[object, Sample] = {}
    for i, sample in enumerate(samples):
        seen.setdefault(sample.digest or i, sample)
    return list(seen.values())


def _copies(samples: list[Sample]) -> dict[str, list[Sample]]:
    """Byte-identical copies by digest (samples without a digest have no copies)."""
    out: dict[str, list[Sample]] = {}
    for sample in samples:
        if sample.digest:
            out.setdefault(sample.digest, []).append(sample)
    return out

