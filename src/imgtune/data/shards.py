"""WebDataset tar shards: for data too large for local disk, read as a stream (local paths or URLs).

``imgtune shard DATA OUT`` checks and splits DATA exactly as ``imgtune train`` would and writes
``OUT/<split>-000000.tar`` ... with the ``webdataset`` library; each sample holds the file's original
bytes under its extension (never re-encoded), ``cls`` (class index) and ``json`` (label, original
path, digest). Training images are shuffled (seeded) before writing, since a stream can only shuffle
within a buffer. ``OUT/dataset.json`` (the manifest) lists classes, counts and shards; ``imgtune
train OUT`` or ``imgtune train https://host/data/dataset.json`` then streams the shards, decoding
with the same rules as files (``decode.load_rgb``).
"""

from __future__ import annotations

import io
import json
import logging
import random
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import finite
from ..errors import DataError
from .content import folder_files, split_digests
from .decode import DecodeError, load_rgb
from .scan import SPLITS, DataSplits, format_counts

log = logging.getLogger(__name__)
MANIFEST = "dataset.json"
FORMAT, VERSION = "imgtune-webdataset", 1
SHUFFLE_BUFFER = 1000  # training items mixed in memory while streaming


def is_shards(source: str | Path) -> bool:
    text = str(source)
    if text.startswith(("http://", "https://")):
        return text.endswith(".json")
    path = Path(text)
    return (path.is_dir() and (path / MANIFEST).is_file()) or (path.is_file() and path.name == MANIFEST)


def write_shards(splits: DataSplits, out: Path, source: str, seed: int = 0, max_count: int = 10_000,
                 max_size: float = 1e9, progress: bool = True) -> dict:
    """Write every split of ``splits`` (checked and split by ``load_splits``) into ``out``; returns the
    manifest (also written to ``out/dataset.json``)."""
    import webdataset as wds
    from tqdm.auto import tqdm

    index = {c: i for i, c in enumerate(splits.classes)}
    shards: dict[str, list[str]] = {}
    for name in SPLITS:
        members = splits.split(name)
        if not members:
            continue
        if name == "train":
            members = list(members)
            random.Random(seed).shuffle(members)
        pattern = str(out / f"{name}-%06d.tar")
        with wds.ShardWriter(pattern, maxcount=max_count, maxsize=max_size, verbose=0) as writer:
            for i, sample in enumerate(tqdm(members, desc=f"writing {name} shards", unit="img", leave=False,
                                            disable=not progress)):
                extension = sample.path.suffix.lower().lstrip(".") or "img"
                writer.write({"__key__": f"{i:09d}", extension: sample.path.read_bytes(),
                              "cls": index[sample.label],
                              "json": {"label": sample.label, "path": str(sample.path), "digest": sample.digest}})
        shards[name] = sorted(p.name for p in out.glob(f"{name}-*.tar"))
    manifest = {"format": FORMAT, "version": VERSION, "source": source, "layout": splits.layout,
                "classes": splits.classes, "counts": splits.counts(), "shards": shards, "seed": seed,
                "formats": dict(splits.formats.most_common()),
                "skipped": [{"path": p, "reason": r} for p, r in splits.skipped],
                "content": split_digests(folder_files(splits.samples, source))}
    (out / MANIFEST).write_text(finite.dumps(manifest, indent=2) + "\n")
    return manifest


@dataclass
class ShardSplits:
    """What ``load_splits`` gives for folders, for a stream: classes and counts from the manifest,
    shard URLs per split (no list of samples: the images are read as they stream)."""

    classes: list[str]
    layout: str
    urls: dict[str, list[str]]
    per_class: dict[str, dict[str, int]]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    formats: Counter = field(default_factory=Counter)
    content: dict[str, str] | None = None  # per-split digests of the images (``content.py``; newer manifests)

    def counts(self) -> dict[str, dict[str, int]]:
        return self.per_class

    def size(self, name: str) -> int:
        return sum(self.per_class.get(name, {}).values())

    def summary(self) -> dict:
        return {"layout": self.layout, "classes": self.classes, "counts": self.per_class,
                "formats": dict(self.formats.most_common()), "formats_text": format_counts(self.formats),
                "skipped": [{"path": p, "reason": r} for p, r in self.skipped]}


def load_manifest(source: str | Path) -> ShardSplits:
    text = str(source)
    remote = text.startswith(("http://", "https://"))
    if remote:
        url = text
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                manifest = json.loads(response.read())
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read the shard manifest {url}: {exc}") from exc
        base = url.rsplit("/", 1)[0] + "/"
    else:
        path = Path(text)
        path = path / MANIFEST if path.is_dir() else path
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read the shard manifest {path}: {exc}") from exc
        base = str(path.parent.resolve()) + "/"
    if manifest.get("format") != FORMAT:
        raise DataError(f"{text} is not an imgtune shard manifest (written by imgtune shard DATA OUT)")
    urls = {name: [base + shard for shard in names] for name, names in manifest["shards"].items()}
    if "train" not in urls or "val" not in urls:
        raise DataError(f"{text}: the shards need a train and a val split; found {sorted(urls)}")
    return ShardSplits(manifest["classes"], f"webdataset shards ({manifest['layout']})", urls, manifest["counts"],
                       [(s["path"], s["reason"]) for s in manifest["skipped"]], Counter(manifest["formats"]),
                       manifest.get("content"))


class ShardStream(torch.utils.data.IterableDataset):
    """Yields ``(tensor, class index, position)`` like ``ImageDataset``, read from tar shards.

    Training (``shuffle``): each epoch visits the shards in a seeded order and mixes items in a buffer of
    ``SHUFFLE_BUFFER``; distributed ranks and loader workers take disjoint shards (so there should be
    at least ranks x workers shards). Evaluation: every item in stored order, on every rank."""

    def __init__(self, urls: list[str], classes: list[str], transform, size: int, shuffle: bool, seed: int = 0,
                 draft_size: int | None = None, labels: list[int] | None = None):
        self.urls, self.classes, self.transform, self.labels = urls, classes, transform, labels or []
        self.size, self.shuffle, self.seed, self.draft_size = size, shuffle, seed, draft_size
        self.epoch = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """(``start`` is ignored: a stream restarts an interrupted epoch at its beginning.)"""
        self.epoch = epoch

    def targets(self) -> torch.Tensor:
        """Class indices with the manifest's counts (in no particular order): what class weights need."""
        return torch.tensor(self.labels, dtype=torch.long)

    def __len__(self) -> int:
        from ..distributed import current

        world = current().world if self.shuffle else 1
        return -(-self.size // world)

    def __iter__(self):
        from ..distributed import current

        items = self._items(0)
        if self.shuffle and current().enabled:
            items = self._exactly(len(self))
        for position, item in enumerate(items):
            yield (*item, position)

    def _items(self, rerun: int):
        import webdataset as wds

        urls = list(self.urls)
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch + rerun * 7).shuffle(urls)
        splitter = wds.split_by_node if self.shuffle else _every_node
        stream = wds.WebDataset(urls, shardshuffle=False, nodesplitter=splitter, empty_check=False)
        items = self._decoded(stream)
        if self.shuffle:
            items = _buffer_shuffle(items, SHUFFLE_BUFFER, random.Random(self.seed * 7919 + self.epoch + rerun))
        return items

    def _exactly(self, count: int):
        """Distributed: every rank must take the same number of steps, but shards split over ranks
        rarely hold equal numbers of images; a rank that runs short reads its shards again."""
        given, rerun = 0, 0
        while given < count:
            before = given
            for item in self._items(rerun):
                yield item
                given += 1
                if given == count:
                    return
            if given == before:
                raise DataError(f"this rank got no training shard: {len(self.urls)} shard(s) for more ranks "
                                "(and loader workers); write smaller shards (imgtune shard --max-count)")
            rerun += 1

    def _decoded(self, stream):
        for sample in stream:
            payload = next((v for k, v in sample.items() if not k.startswith("__") and k not in ("cls", "json")), None)
            label = int(sample["cls"])
            try:
                image = load_rgb(io.BytesIO(payload), self.draft_size)
            except DecodeError as exc:
                log.warning("skipping %s in %s: %s", sample.get("__key__"), sample.get("__url__"), exc)
                continue
            yield self.transform(image), label


def _every_node(urls):
    """Evaluation: every rank reads every shard (the metrics need every image)."""
    return urls


def _buffer_shuffle(items, size: int, rng: random.Random):
    buffer = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            yield buffer.pop(rng.randrange(len(buffer)))
    rng.shuffle(buffer)
    yield from buffer


def stream_loader(splits: ShardSplits, name: str, transform, batch_size: int, shuffle: bool, workers: int,
                  seed: int, draft_size: int | None):
    from .dataset import collate_skipping_none

    counts = splits.per_class[name]
    labels = [i for i, c in enumerate(splits.classes) for _ in range(counts.get(c, 0))]
    dataset = ShardStream(splits.urls[name], splits.classes, transform, splits.size(name), shuffle, seed, draft_size,
                          labels)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                       collate_fn=collate_skipping_none, persistent_workers=workers > 0)


def read_split(splits: ShardSplits, name: str) -> list[tuple[str, str, bytes]]:
    """(original path, label, bytes) of every item of a split, in stored order (for ``evaluate``)."""
    import webdataset as wds

    if name not in splits.urls:
        raise DataError(f"the shards have no {name} split (splits: {sorted(splits.urls)})")
    out = []
    for sample in wds.WebDataset(splits.urls[name], shardshuffle=False, nodesplitter=_every_node,
                                 empty_check=False):
        meta = json.loads(sample["json"])
        payload = next(v for k, v in sample.items() if not k.startswith("__") and k not in ("cls", "json"))
        out.append((meta["path"], meta["label"], payload))
    return out
