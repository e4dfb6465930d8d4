"""Finding labelled images: folder trees and CSV files, splits, and the checks done before training.

Finding files is kept apart from decoding them (``decode.py``) and from feeding them to a model
(``dataset.py``). Everything here raises :class:`~imgtune.errors.DataError` with a message that
names the file or folder and says what to do.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from ..cache import ArrayStore
from ..errors import DataError
from . import checked
from .decode import DecodeError, ImageInfo, probe
from .reading import FileTooLarge, NotRegularFile, kind_of, read_bounded

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test", "testing": "test"}
IMAGE_EXTENSIONS = frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


@dataclass(frozen=True)
class Sample:
    path: Path
    label: str
    split: str | None = None  # None until assigned
    digest: str | None = None  # hash of the file's bytes, set by check_files (the caches' key)
    fingerprint: bytes | None = None  # perceptual fingerprint (fingerprint.py), set by check_files
    shape: tuple[int, int] | None = None  # (width, height) in pixels, set by check_files (sizing.py reads it)


@dataclass(frozen=True)
class FileCheck:
    """What reading one file found: ``info`` for an image, else ``problem`` (``missing``, ``unreadable``,
    ``not-a-file``, ``too-large``, ``empty``, ``not-an-image``, ``truncated``, ``too-many-pixels``,
    ``corrupt``) and ``reason``."""

    sample: Sample  # digest and fingerprint set when the file could be read
    info: ImageInfo | None = None
    problem: str | None = None
    reason: str | None = None
    size: int = 0  # bytes


@dataclass
class DataSplits:
    """The outcome of scanning and checking a dataset: what trains, what validates, what was skipped."""

    classes: list[str]
    samples: list[Sample]
    layout: str
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    formats: Counter = field(default_factory=Counter)

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for name in SPLITS:
            members = self.split(name)
            if members:
                per_class = Counter(s.label for s in members)
                out[name] = {c: per_class.get(c, 0) for c in self.classes}
        return out

    def summary(self) -> dict:
        return {
            "layout": self.layout,
            "classes": self.classes,
            "counts": self.counts(),
            "formats": dict(self.formats.most_common()),
            "formats_text": format_counts(self.formats),
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
        }


def format_counts(formats: Counter) -> str:
    return ", ".join(f"{n} {fmt}" for fmt, n in formats.most_common()) or "no images"


def find_samples(source: str | Path, allow_outside_paths: bool = False) -> tuple[list[Sample], str]:
    """Return every labelled file under ``source`` (a folder or a CSV) and the layout found;
    ``allow_outside_paths``: a CSV may name files outside its own folder (:func:`read_csv`)."""
    root = Path(source)
    if not root.exists():
        raise DataError(f"data not found: {root} does not exist. Pass a folder of class folders, "
                        "a folder with train/ and val/, or a CSV file with columns path,label")
    if not root.is_dir() and not root.is_file():
        raise DataError(f"{root} is {kind_of(root.stat().st_mode)}: pass a folder or a CSV file")
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise DataError(f"{root} is a file but not a .csv; pass a folder or a CSV with columns path,label")
        return read_csv(root, allow_outside_paths), "csv"
    split_dirs = {SPLIT_ALIASES[p.name.lower()]: p for p in _subdirs(root) if p.name.lower() in SPLIT_ALIASES}
    if "train" in split_dirs:
        samples = []
        for split, folder in sorted(split_dirs.items()):
            samples += [replace(s, split=split) for s in scan_class_folders(folder)]
        layout = "split folders (" + ", ".join(sorted(split_dirs, key=SPLITS.index)) + ")"
        return samples, layout
    return scan_class_folders(root), "class folders"


def _subdirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_class_folders(root: Path) -> list[Sample]:
    """One sub-folder per class; images are found recursively inside each class folder."""
    classes = _subdirs(root)
    if not classes:
        raise DataError(f"no class folders in {root}: put the images of each class in a sub-folder "
                        f"named after the class (e.g. {root}/cats/1.jpg, {root}/dogs/2.jpg)")
    loose = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if loose:
        log.warning("%d image(s) directly in %s are in no class folder and are ignored (e.g. %s)",
                    len(loose), root, loose[0].name)
    samples = []
    for folder in classes:
        files = _image_files(folder)
        if not files:
            raise DataError(f"class folder {folder} holds no image files; add images or remove the folder")
        samples += [Sample(path, folder.name) for path in files]
    return samples


def _image_files(folder: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath) / name)
    return found


def read_csv(path: Path, allow_outside_paths: bool = False) -> list[Sample]:
    """A CSV with a header ``path,label`` and optionally ``split``; paths relative to the CSV's folder.
    A path that leads outside that folder (``..``, or an absolute path elsewhere) is refused unless
    ``allow_outside_paths``: a CSV from someone else must not make imgtune read ``/etc/passwd``.
    Symbolic links inside the folder are followed wherever they lead (DVC, git-annex). A row given
    twice is counted once, with a warning."""
    rows, columns = _csv_rows(path)
    missing = {"path", "label"} - set(columns)
    if missing:
        raise DataError(f"CSV {path} needs a header with columns path,label (and optionally split); "
                        f"found columns {columns}")
    samples = [_csv_sample(path, line, row, allow_outside_paths) for line, row in enumerate(rows, start=2)]
    if not samples:
        raise DataError(f"CSV {path} has a header but no rows")
    return _drop_repeated_rows(path, samples)


def _csv_rows(path: Path) -> tuple[list[dict], list[str]]:
    try:
        data = read_bounded(path)
    except OSError as exc:
        raise DataError(f"cannot read CSV {path}: {exc.strerror or exc}") from exc
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"CSV {path} line {line}: not UTF-8 text (byte {data[exc.start:exc.start + 1]!r}); "
                        "save the CSV as UTF-8") from exc
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = list(reader)
        columns = [c.strip().lower() for c in reader.fieldnames or []]
    except csv.Error as exc:
        raise DataError(f"cannot read CSV {path}: {exc}") from exc
    return rows, columns


def _drop_repeated_rows(path: Path, samples: list[tuple[int, Sample]]) -> list[Sample]:
    first: dict[Sample, int] = {}
    repeated = []
    for line, sample in samples:
        if sample in first:
            repeated.append(f"line {line} repeats line {first[sample]} ({sample.path.name})")
        else:
            first[sample] = line
    if repeated:
        shown = "; ".join(repeated[:5]) + (f"; and {len(repeated) - 5} more" if len(repeated) > 5 else "")
        log.warning("CSV %s: %d repeated row(s) counted once: %s", path, len(repeated), shown)
    return list(first)


def _csv_sample(csv_path: Path, line: int, row: dict, allow_outside_paths: bool) -> tuple[int, Sample]:
    where = f"CSV {csv_path} line {line}"
    if None in row:  # csv.DictReader puts fields beyond the header under the key None
        raise DataError(f"{where}: more fields than the header; put paths that contain commas in double quotes")
    row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
    if not row["path"] or not row["label"]:
        raise DataError(f"{where}: empty path or label")
    split = None
    if row.get("split"):
        split = SPLIT_ALIASES.get(row["split"].lower())
        if split is None:
            raise DataError(f"{where}: split {row['split']!r} is not one of train, val, test")
    elif "split" in row:
        raise DataError(f"{where}: the split column is empty; fill it or drop the column")
    if not allow_outside_paths:
        _check_inside(csv_path, row["path"], where)
    return line, Sample((csv_path.parent / row["path"]).resolve(), row["label"], split)


def _check_inside(csv_path: Path, name: str, where: str) -> None:
    """Lexically (before links are followed): a link inside the folder may lead anywhere."""
    folder = os.path.abspath(csv_path.parent)
    target = os.path.normpath(os.path.join(folder, name))
    if os.path.commonpath([folder, target]) != folder:
        raise DataError(f"{where}: {name!r} is outside the CSV's folder {folder}; move the files beside the CSV, "
                        "or pass --allow-outside-paths if you trust this CSV to name any file on this machine")


def inspect_file(sample: Sample, checks: ArrayStore | None = None) -> FileCheck:
    """Read the file once: its bytes' digest, and a full decode (which is what finds truncated and
    corrupt files) giving format, mode, size, bit depth and perceptual fingerprint; not decoded again
    when ``checks`` (:mod:`imgtune.data.checked`) has seen the same bytes."""
    try:
        data = read_bounded(sample.path)
    except FileNotFoundError:
        return FileCheck(sample, problem="missing", reason="file not found")
    except NotRegularFile as exc:
        return FileCheck(sample, problem="not-a-file", reason=str(exc))
    except FileTooLarge as exc:
        return FileCheck(sample, problem="too-large", reason=str(exc))
    except OSError as exc:
        return FileCheck(sample, problem="unreadable", reason=f"cannot read the file ({exc.strerror})")
    if not data:
        return FileCheck(sample, problem="empty", reason="empty file (0 bytes)")
    digest = file_digest(data)
    info = checked.known(checks, digest)
    if info is None:
        try:
            info = probe(io.BytesIO(data), fingerprint=True)
        except DecodeError as exc:
            return FileCheck(sample, problem=exc.kind, reason=str(exc), size=len(data))
        checked.remember(checks, digest, info)
    return FileCheck(replace(sample, digest=digest, fingerprint=info.fingerprint, shape=(info.width, info.height)),
                     info, size=len(data))


TRIAL = 64  # files checked each way (this thread, threads) before the faster way checks the rest


def inspect_files(samples: list[Sample], progress: bool = True, min_for_bar: int = 2000,
                  description: str = "checking images", checks: ArrayStore | None = None) -> list[FileCheck]:
    """:func:`inspect_file` for every sample, in order: in threads or in this thread, whichever checked
    its share of the first ``2 * TRIAL`` files faster. Decoding a photo releases the GIL, so threads
    overlap photos; a tiny image's many short steps hold it, and threads then queue for it (28 px PNGs
    on 2 cores: 1.9 ms an image in this thread, 3.7 ms in four threads; hymenoptera's photos 5.3 ms
    and 3.9 ms)."""
    workers = min(8, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(_inspected(samples, checks, pool), total=len(samples), desc=description, unit="img",
                         leave=False, disable=not progress or len(samples) < min_for_bar))


def _inspected(samples: list[Sample], checks: ArrayStore | None, pool: ThreadPoolExecutor):
    def threaded(part: list[Sample]):
        return pool.map(lambda sample: inspect_file(sample, checks), part)

    if len(samples) < 4 * TRIAL:
        yield from threaded(samples)
        return
    start = time.perf_counter()
    for sample in samples[:TRIAL]:
        yield inspect_file(sample, checks)
    alone = time.perf_counter() - start
    start = time.perf_counter()
    yield from list(threaded(samples[TRIAL:2 * TRIAL]))
    in_threads = time.perf_counter() - start
    log.debug("checking files: %.2f ms a file in this thread, %.2f ms in threads", alone / TRIAL * 1e3,
              in_threads / TRIAL * 1e3)
    rest = samples[2 * TRIAL:]
    yield from threaded(rest) if in_threads < alone else (inspect_file(sample, checks) for sample in rest)


def check_files(samples: list[Sample], progress: bool = True, checks: ArrayStore | None = None
                ) -> tuple[list[Sample], list[tuple[str, str]], Counter]:
    """Decode every file once; returns (readable samples, skipped (path, reason), formats found)."""
    return _summarise(inspect_files(samples, progress, checks=checks))


def _summarise(checks: list[FileCheck]) -> tuple[list[Sample], list[tuple[str, str]], Counter]:
    good, skipped, formats = [], [], Counter()
    for check in checks:
        if check.info is None:
            log.warning("skipping %s: %s", check.sample.path, check.reason)
            skipped.append((str(check.sample.path), check.reason))
        else:
            good.append(check.sample)
            formats[check.info.format] += 1
    return good, skipped, formats


def _check_files_shared(samples: list[Sample], progress: bool, checks: ArrayStore | None = None):
    """:func:`check_files`; in distributed training each rank checks its share and all get the whole."""
    from ..distributed import current, gather

    ctx = current()
    if not ctx.enabled:
        return check_files(samples, progress, checks)
    shares = gather(inspect_files(samples[ctx.rank::ctx.world], progress and ctx.is_main, checks=checks))
    checks = [shares[i % ctx.world][i // ctx.world] for i in range(len(samples))]  # back in order
    return _summarise(checks)


def file_digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def assign_splits(samples: list[Sample], val_fraction: float, test_fraction: float, seed: int) -> list[Sample]:
    """Stratified, seeded split of the samples that have no split yet; every class gets at least one
    image in val (and in test when ``test_fraction`` > 0) and keeps at least one for training; exact
    copies of a file land in the same split."""
    by_class: dict[str, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    rng = random.Random(seed)
    out = []
    for label in sorted(by_class):
        members = sorted(by_class[label], key=lambda s: str(s.path))
        groups = _identical_groups(members)
        rng.shuffle(groups)
        n_test = max(1, round(len(members) * test_fraction)) if test_fraction > 0 else 0
        n_val = max(1, round(len(members) * val_fraction))
        taken = Counter()
        for group in groups:
            split = "test" if taken["test"] < n_test else "val" if taken["val"] < n_val else "train"
            taken[split] += len(group)
            out += [replace(s, split=split) for s in group]
        if len(members) - n_test - n_val < 1 or not taken["train"]:
            need = 2 + (test_fraction > 0)
            copies = f" ({len(groups)} distinct; copies of a file stay in one split)" if len(groups) < len(members) else ""
            raise DataError(f"class {label!r} has only {len(members)} readable image(s){copies}; at least {need} "
                            "distinct ones are needed to split it into train/val" + ("/test" if test_fraction > 0 else ""))
    return out


def _identical_groups(members: list[Sample]) -> list[list[Sample]]:
    """Copies of one file (same bytes) stay together, so that a split never puts one copy in train and
    another in val (that would be leakage made by imgtune). Without copies: one group per sample."""
    groups: dict[object, list[Sample]] = {}
    for i, sample in enumerate(members):
        groups.setdefault(sample.digest or i, []).append(sample)
    return list(groups.values())


def load_splits(source: str | Path, val_fraction: float = 0.2, test_fraction: float = 0.0, seed: int = 0,
                progress: bool = True, allow_outside_paths: bool = False,
                extra_labels: str | Path | None = None, checks: ArrayStore | None = None) -> DataSplits:
    """Find, check and split a dataset; raises DataError before any training could start.
    ``extra_labels``: a CSV of more training images (:mod:`imgtune.data.extra_labels`); ``checks``: the
    file checks already done (:mod:`imgtune.data.checked`)."""
    samples, layout = find_samples(source, allow_outside_paths)
    good, skipped, formats = _check_files_shared(samples, progress, checks)
    added = []
    if extra_labels:
        from .extra_labels import read_extra_labels

        added, more_skipped, more_formats = _check_files_shared(
            read_extra_labels(extra_labels, {s.label for s in samples}, allow_outside_paths), progress, checks)
        skipped, formats = skipped + more_skipped, formats + more_formats
        log.info("--extra-labels %s: %d training image(s) added", extra_labels, len(added))
    assigned = split_readable(good, layout, val_fraction, test_fraction, seed, source, samples) + added
    classes = check_classes(assigned, {s.label for s in samples}, source, skipped)
    return DataSplits(classes, sorted(assigned, key=lambda s: (s.split, s.label, str(s.path))), layout,
                      skipped, formats)


def split_readable(good: list[Sample], layout: str, val_fraction: float, test_fraction: float, seed: int,
                   source: str | Path = "", found: list[Sample] | None = None) -> list[Sample]:
    """Give every readable sample its split, as ``imgtune train`` does: the folder's or CSV's split
    where there is one, else a stratified seeded split; a split-folder tree without val/ has val
    split off train/ (a val/ whose files are all unreadable, among ``found``, is an error found later)."""
    assigned = [s for s in good if s.split is not None]
    unassigned = [s for s in good if s.split is None]
    if layout.startswith("split folders") and not any(s.split == "val" for s in found or good):
        log.info("no val/ folder in %s: splitting %.0f%% of train/ off as validation", source, val_fraction * 100)
        assigned = [s for s in good if s.split != "train"]
        unassigned = [replace(s, split=None) for s in good if s.split == "train"]
        test_fraction = 0.0
    if unassigned:
        assigned += assign_splits(unassigned, val_fraction, test_fraction, seed)
    return assigned


def check_classes(samples: list[Sample], found_labels: set[str], source, skipped) -> list[str]:
    """``found_labels`` are the labels of every file found, readable or not: a class whose files are all
    unreadable must fail here rather than vanish from the classifier."""
    counts = {split: Counter(s.label for s in samples if s.split == split) for split in SPLITS}
    classes = sorted(counts["train"])
    hint = f" ({len(skipped)} file(s) could not be read)" if skipped else ""
    if not classes:
        raise DataError(f"{source}: no readable training images{hint}")
    empty = sorted(found_labels - set(classes))
    if empty:
        raise DataError(f"{source}: class(es) {empty} have no readable training images{hint}; "
                        "add images or remove them")
    if len(classes) < 2:
        raise DataError(f"{source}: only one class ({classes[0]!r}) found; a classifier needs at least two")
    for split in ("val", "test"):
        if not counts[split]:
            if split == "val":
                raise DataError(f"{source}: no readable validation images")
            continue
        missing = [c for c in classes if counts[split][c] == 0]
        if missing:
            raise DataError(f"{source}: the {split} split has no images of class(es) {missing}; every class must "
                            f"appear in {split} to be measured. Add some, or let imgtune split a single class "
                            "folder tree (--val-fraction)")
    return classes
