"""``imgtune suggest RUN DIR``: which unlabelled images are worth a person's time to label next.

Every image under ``DIR`` goes through the same file checks as training data (unreadable files are
skipped and named; exact copies of the run's own train/val/test images, found by content in
``RUN/data_files.json.gz``, are skipped with a warning: labelling them adds nothing, or leaks). The run's
model gives each image its probabilities (with the run's fitted temperature when it has one, so the
uncertainty is calibrated) and its body's feature vector, in one pass.

Strategies (``--strategy``; the selection itself is :mod:`imgtune.acquire`):

- ``margin``: smallest gap between the two most likely classes first (uncertainty sampling);
- ``entropy``: highest entropy of the probabilities first;
- ``diverse``: by margin, but at most one image of each group of copies or near-copies (the perceptual
  fingerprints ``imgtune doctor`` groups by), so the list never holds near-copies of one confusing image;
- ``typical`` (default): TypiClust (Hacohen et al. 2022): the most typical image of each k-means cluster
  holding the fewest labelled training images (the run's, read from ``RUN/data_files.json.gz``);
- ``badge``: BADGE (Ash et al. 2020): k-means++ seeding on the head's gradient embeddings;
- ``hybrid``: TCM (Doucet et al. 2024): ``typical`` while the run has fewer than ``TYPICAL_UNTIL``
  labelled training images per class, ``diverse`` from then on.

``typical``, ``badge`` (and so ``hybrid``) also take at most one image of each group of near-copies. How
they compare with random picks: docs/benchmarks.md, "Active learning".

The CSV (``path,label,guess,prob``, best first) has an empty ``label`` column to fill in; ``imgtune train
DATA --extra-labels FILE.csv`` adds the filled rows. Paths are relative to the CSV's folder when the
images are under it (the default ``DIR/suggestions.csv``), else absolute.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from . import acquire, artifact, features, models
from .atomic import atomic_write_text
from .data.content import read_files
from .data.duplicates import exact_groups, near_groups
from .data.scan import Sample
from .data.unlabelled import unlabelled_images
from .errors import DataError, UsageError
from .inference import select_device

log = logging.getLogger(__name__)

STRATEGIES = ("hybrid", "typical", "diverse", "margin", "entropy", "badge")
DEFAULT_STRATEGY = "typical"  # the only one ahead of random picks at every round on both benchmarks
TYPICAL_UNTIL = 10  # hybrid: typical while the run has fewer labelled training images per class, then diverse
CSV_NAME = "suggestions.csv"
COLUMNS = ("path", "label", "guess", "prob")


@dataclass
class Suggestion:
    path: Path
    guess: str
    prob: float  # the model's probability of its guess
    uncertainty: float  # 1 - margin, or the entropy (higher: less sure)


def suggest(run_dir: str | Path, folder: str | Path, n: int = 50, strategy: str = DEFAULT_STRATEGY,
            device: str = "auto", batch_size: int = 32) -> list[Suggestion]:
    """The ``n`` images of ``folder`` to label first, best first."""
    if strategy not in STRATEGIES:
        raise UsageError(f"--strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    if n < 1:
        raise UsageError(f"--n must be at least 1; got {n}")
    run = artifact.read_run(run_dir)
    files = read_files(run.path / artifact.DATA_FILES) or {}  # the run's images by split: (path, label, digest)
    samples = _unknown_to_run(files, unlabelled_images(folder))
    built, temperature = _model(run)
    device_ = select_device(device)
    found = features.extract(built, samples, run.classes, None, device_, batch_size, 0,
                             description="unlabelled features")
    kept = [samples[i] for i in found.positions.tolist()]
    training = files.get("train", [])
    strategy = concrete(strategy, len(training), len(run.classes))
    labelled = _labelled_features(run, training, built, device_, batch_size) if strategy == "typical" else None
    probs = _probabilities(built.model.head, found.features, temperature)
    return choose(kept, probs, found.features.numpy(), labelled, run.classes, n, strategy)


def concrete(strategy: str, labelled: int, classes: int) -> str:
    """``hybrid`` (TCM, Doucet et al. 2024: TypiClust, then margin) as the strategy it means for a run
    with ``labelled`` training images of ``classes`` classes; any other strategy as itself."""
    if strategy != "hybrid":
        return strategy
    return "typical" if labelled < TYPICAL_UNTIL * classes else "diverse"


def choose(samples: list[Sample], probs: np.ndarray, vectors: np.ndarray, labelled: np.ndarray | None,
           classes: list[str], n: int, strategy: str) -> list[Suggestion]:
    """The ranking itself, on the pool's probabilities and feature vectors (and, for ``typical``, the
    feature vectors of the run's labelled training images); bench/active.py calls it with cached features."""
    uncertainty = acquire.entropy(probs) if strategy == "entropy" else acquire.one_minus_margin(probs)
    by_uncertainty = [int(i) for i in np.argsort(-uncertainty, kind="stable")]
    if strategy in ("margin", "entropy"):
        order = by_uncertainty[:n]
    elif strategy == "diverse":
        order = _one_per_group(samples, by_uncertainty, n)
    else:  # one image of each group of near-copies may be chosen, then the strategy picks among them
        keep = _one_per_group(samples, list(range(len(samples))), len(samples))
        if strategy == "typical":
            dim = vectors.shape[1]
            picked = acquire.typical_clusters(vectors[keep], np.empty((0, dim)) if labelled is None else labelled, n)
        else:
            picked = acquire.badge(probs[keep], vectors[keep], n)
        order = [keep[i] for i in picked]
    return [Suggestion(samples[i].path, classes[int(probs[i].argmax())], float(probs[i].max()),
                       float(uncertainty[i])) for i in order]


def _labelled_features(run: artifact.RunInfo, files: list[list[str]], built: models.BuiltModel,
                       device: torch.device, batch_size: int) -> np.ndarray | None:
    """Feature vectors of the run's training images ``files`` (paths relative to its data's folder), so
    ``typical`` knows which regions of the data are labelled already."""
    root = Path(run.config.data.source)
    root = root.parent if root.is_file() else root
    paths = [Path(p) if Path(p).is_absolute() else root / p for p, _, _ in files]
    found = [Sample(p, label, "train", digest or None) for p, (_, label, digest) in zip(paths, files) if p.is_file()]
    if len(found) < len(files):
        log.warning("%d of the run's %d training images are not at their recorded paths (under %s); the "
                    "typical strategy counts only the %d found as labelled (move them back for better picks)",
                    len(files) - len(found), len(files), root, len(found))
    if not found:
        return None
    vectors = features.extract(built, found, run.classes, None, device, batch_size, 0,
                               description="labelled features")
    return vectors.features.numpy()


def _unknown_to_run(files: dict, samples: list[Sample]) -> list[Sample]:
    known = {digest: (split, path) for split, rows in files.items() for path, _, digest in rows if digest}
    copies = [(s, known[s.digest]) for s in samples if s.digest in known]
    for sample, (split, path) in copies[:5]:
        log.warning("skipping %s: a copy of %s in the run's %s split", sample.path, path, split)
    if len(copies) > 5:
        log.warning("skipping %d more copies of the run's own images", len(copies) - 5)
    left = [s for s in samples if s.digest not in known]
    if not left:
        raise DataError("every image given is a copy of one the run was trained or validated on; nothing to suggest")
    return left


def _model(run: artifact.RunInfo) -> tuple[models.BuiltModel, float | None]:
    built = models.create(run.config.model, len(run.classes), load_pretrained=False)
    artifact.load_weights(built.model, run.path / artifact.WEIGHTS)
    built = replace(built, preprocessing=run.preprocessing)
    calibration = run.path / artifact.CALIBRATION
    temperature = float(artifact.read_calibration(run.path)["temperature"]) if calibration.is_file() else None
    return built, temperature


@torch.inference_mode()
def _probabilities(head: torch.nn.Module, vectors: torch.Tensor, temperature: float | None) -> np.ndarray:
    logits = head.eval()(vectors)
    return torch.softmax(logits / (temperature or 1.0), dim=1).double().numpy()


def _one_per_group(samples: list[Sample], order: list[int], n: int) -> list[int]:
    """The first ``n`` of ``order`` with at most one image of each group of copies or near-copies (the
    perceptual fingerprints ``imgtune doctor`` groups by; :mod:`imgtune.data.duplicates`)."""
    group: dict[Path, int] = {}
    for number, found in enumerate(exact_groups(samples) + near_groups(samples)):
        first = {group[s.path] for s in found.members if s.path in group}
        target = min(first) if first else number  # groups that share a member become one
        for sample in found.members:
            group[sample.path] = target
    chosen, taken = [], set()
    for i in order:
        key = group.get(samples[i].path, ("alone", int(i)))
        if key not in taken:
            taken.add(key)
            chosen.append(int(i))
            if len(chosen) == n:
                break
    return chosen


def write_csv(suggestions: list[Suggestion], out: str | Path, overwrite: bool = False) -> Path:
    """``path,label,guess,prob``; an existing file (perhaps already filled in) is kept unless ``overwrite``."""
    out = Path(out)
    check_target(out, overwrite)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(COLUMNS)
    for item in suggestions:
        writer.writerow([_relative(item.path, out.parent), "", item.guess, f"{item.prob:.4f}"])
    atomic_write_text(out, buffer.getvalue())
    return out


def check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise UsageError(f"{out} exists (it may hold labels you filled in): pass another --out, or --overwrite")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: the folder {out.parent} does not exist")


def _relative(path: Path, folder: Path) -> str:
    folder = folder.resolve()
    inside = os.path.commonpath([folder, path.resolve()]) == str(folder)
    return os.path.relpath(path.resolve(), folder) if inside else str(path.resolve())
