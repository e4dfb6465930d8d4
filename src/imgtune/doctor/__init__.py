"""``imgtune doctor``: everything that is wrong with a dataset, found before training.

Checks, in order (``diagnose`` reads top to bottom): files that cannot be used (missing, empty, not an
image, truncated, corrupt, too many pixels); outliers (rare format or mode, 16-bit, CMYK, alpha,
animation, tiny images, extreme aspect ratios); exact and near duplicates within a class, across
classes (label conflicts) and across splits (leakage); class counts and imbalance; likely label
errors (out-of-fold predictions of a linear probe on cached pretrained features, ranked by confident
learning with ``cleanlab``). The result is a :class:`Diagnosis`: findings that name their files, saved
as ``doctor.json`` and ``doctor.html``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..balance import imbalance_ratio
from ..config import IMBALANCE_THRESHOLD
from ..data.duplicates import DuplicateGroup, exact_groups, near_groups
from ..data.scan import FileCheck, Sample, check_classes, find_samples, inspect_files, split_readable
from ..errors import DataError
from .outliers import find_outliers

log = logging.getLogger(__name__)
SEVERITIES = ("error", "warning", "info")


@dataclass
class Finding:
    check: str  # unreadable, outlier, leakage, label-conflict, duplicate, imbalance, split, label-error
    severity: str  # error (fix before training), warning (look at it), info
    message: str
    paths: list[str]
    details: dict = field(default_factory=dict)


@dataclass
class Diagnosis:
    source: str
    layout: str
    files: int
    readable: int
    classes: list[str]
    counts: dict[str, dict[str, int]]
    imbalance_ratio: float | None  # None when a class has no training images (a `split` finding says so)
    formats: dict[str, int]
    findings: list[Finding] = field(default_factory=list)
    label_errors: dict | None = None  # model, folds, out-of-fold accuracy, or why it was skipped
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, int]:
        return dict(Counter(f.check for f in self.findings).most_common())

    def by_check(self, check: str) -> list[Finding]:
        return [f for f in self.findings if f.check == check]

    def to_dict(self) -> dict:
        return {**asdict(self), "summary": self.summary()}


@dataclass(frozen=True)
class LabelCheck:
    """How likely label errors are looked for (``None`` in :func:`diagnose` skips it)."""

    model: str = "mobilenet_v2"
    img_size: int | None = None
    folds: int = 5
    cache_dir: str | None = None
    offline: bool = False
    device: str = "auto"
    batch_size: int = 32


def diagnose(source: str | Path, val_fraction: float = 0.2, test_fraction: float = 0.0, seed: int = 0,
             labels: LabelCheck | None = LabelCheck(), progress: bool = True,
             allow_outside_paths: bool = False) -> Diagnosis:
    clock = _Clock()
    samples, layout = find_samples(source, allow_outside_paths)
    checks = inspect_files(samples, progress, min_for_bar=0, description="reading files")
    clock.lap("files")
    good = [c.sample for c in checks if c.info is not None]
    findings = [_unreadable(c) for c in checks if c.info is None]
    split, split_problem = _split(good, samples, layout, val_fraction, test_fraction, seed, source)
    findings += split_problem
    findings += find_outliers([c for c in checks if c.info is not None])
    clock.lap("outliers")
    findings += _duplicates(exact_groups(split), near_groups(split))
    clock.lap("duplicates")
    classes = sorted({s.label for s in split})
    counts = _counts(split, classes)
    ratio = imbalance_ratio(counts.get("train", {}))
    ratio = None if ratio == float("inf") else ratio
    findings += _imbalance(counts, ratio)
    diagnosis = Diagnosis(str(source), layout, len(samples), len(good), classes, counts, ratio,
                          dict(Counter(c.info.format for c in checks if c.info).most_common()), findings)
    if labels is not None:
        from .labels import find_label_errors

        diagnosis.label_errors, label_findings = find_label_errors(split, classes, labels, seed)
        diagnosis.findings += label_findings
        clock.lap("label errors")
    diagnosis.findings.sort(key=lambda f: SEVERITIES.index(f.severity))
    diagnosis.seconds = clock.laps
    return diagnosis


class _Clock:
    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self.last, 2)
        self.laps["total"] = round(now - self.start, 2)
        self.last = now


def _unreadable(check: FileCheck) -> Finding:
    return Finding("unreadable", "error", f"{check.sample.path}: {check.reason}", [str(check.sample.path)],
                   {"problem": check.problem, "label": check.sample.label, "bytes": check.size})


def _split(good: list[Sample], found: list[Sample], layout: str, val_fraction: float, test_fraction: float,
           seed: int, source) -> tuple[list[Sample], list[Finding]]:
    """The splits ``imgtune train`` would use, with its checks of them (every class in train and in
    val, at least two classes ...); what it would refuse is a finding, and the doctor goes on (where
    it could not split at all, everything counts as train)."""
    try:
        split = split_readable(good, layout, val_fraction, test_fraction, seed, source, found)
    except DataError as exc:
        finding = Finding("split", "error", f"cannot split the data as imgtune train would: {exc}", [])
        return [replace(s, split=s.split or "train") for s in good], [finding]
    try:
        check_classes(split, {s.label for s in found}, source, [None] * (len(found) - len(good)))
    except DataError as exc:
        return split, [Finding("split", "error", f"imgtune train would refuse this data: {exc}", [])]
    return split, []


def _counts(samples: list[Sample], classes: list[str]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for name in ("train", "val", "test"):
        members = Counter(s.label for s in samples if s.split == name)
        if members:
            out[name] = {c: members.get(c, 0) for c in classes}
    return out


def _imbalance(counts: dict[str, dict[str, int]], ratio: float) -> list[Finding]:
    if ratio is None or ratio <= IMBALANCE_THRESHOLD:
        return []
    train = counts["train"]
    big, small = max(train, key=train.get), min(train, key=train.get)
    return [Finding("imbalance", "warning",
                    f"class imbalance {ratio:.1f}:1 in train ({big!r} {train[big]} images, {small!r} "
                    f"{train[small]}): imgtune train balances it (--balance weights by default above "
                    f"{IMBALANCE_THRESHOLD:g}:1); judge models by balanced accuracy and macro F1", [],
                    {"ratio": ratio, "largest": big, "smallest": small})]


def _duplicates(exact: list[DuplicateGroup], near: list[DuplicateGroup]) -> list[Finding]:
    findings = []
    for group in exact + near:
        where = [f"{s.path} ({s.split}/{s.label})" for s in group.members]
        paths = [str(s.path) for s in group.members]
        what = "the same file" if group.match == "exact" else \
            f"near-duplicates ({group.bits} of 256 fingerprint bits differ)"
        details = {"match": group.match, "bits": group.bits, "kinds": group.kinds(),
                   "members": [{"path": str(s.path), "split": s.split, "label": s.label} for s in group.members]}
        kinds = group.kinds()
        if "across-classes" in kinds:
            findings.append(Finding("label-conflict", "error" if group.match == "exact" else "warning",
                                    f"label conflict: {what} under classes {sorted(group.labels)}: "
                                    + ", ".join(where), paths, details))
        if "across-splits" in kinds:
            findings.append(Finding("leakage", "error" if group.match == "exact" else "warning",
                                    f"leakage: {what} in splits {sorted(group.splits)}: " + ", ".join(where),
                                    paths, details))
        if kinds == ["within-class"]:
            findings.append(Finding("duplicate", "info", f"duplicates: {what}: " + ", ".join(where), paths,
                                    details))
    return findings
