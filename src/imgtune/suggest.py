"""``imgtune suggest RUN DIR``: which unlabelled images are worth a person's time to label next.

Every image under ``DIR`` goes through the same file checks as training data (unreadable files are
skipped and named; exact copies of the run's own train/val/test images, found by content in
``RUN/data_files.json.gz``, are skipped with a warning: labelling them adds nothing, or leaks). The run's
model gives each image its probabilities (with the run's fitted temperature when it has one, so the
uncertainty is calibrated) and its body's feature vector, in one pass.

Strategies (``--strategy``):

- ``margin``: smallest gap between the two most likely classes first (uncertainty sampling);
- ``entropy``: highest entropy of the probabilities first;
- ``diverse`` (default): by margin, but at most one image of each group of copies or near-copies (the
  perceptual fingerprints ``imgtune doctor`` groups by), so the list never holds near-copies of one
  confusing image. A spread in feature space (greedy k-centre over the uncertain images, Sener &
  Savarese 2018) was measured too and did worse than margin alone on hymenoptera
  (docs/benchmarks.md, "Active learning").

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

from . import artifact, features, models
from .atomic import atomic_write_text
from .data.content import read_files
from .data.duplicates import exact_groups, near_groups
from .data.scan import Sample
from .data.unlabelled import unlabelled_images
from .errors import DataError, UsageError
from .inference import select_device

log = logging.getLogger(__name__)

STRATEGIES = ("diverse", "margin", "entropy")
CSV_NAME = "suggestions.csv"
COLUMNS = ("path", "label", "guess", "prob")


@dataclass
class Suggestion:
    path: Path
    guess: str
    prob: float  # the model's probability of its guess
    uncertainty: float  # 1 - margin, or the entropy (higher: less sure)


def suggest(run_dir: str | Path, folder: str | Path, n: int = 50, strategy: str = "diverse",
            device: str = "auto", batch_size: int = 32) -> list[Suggestion]:
    """The ``n`` images of ``folder`` to label first, best first."""
    if strategy not in STRATEGIES:
        raise UsageError(f"--strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    if n < 1:
        raise UsageError(f"--n must be at least 1; got {n}")
    run = artifact.read_run(run_dir)
    samples = _unknown_to_run(run, unlabelled_images(folder))
    built, temperature = _model(run)
    found = features.extract(built, samples, run.classes, None, select_device(device), batch_size, 0,
                             description="unlabelled features")
    kept = [samples[i] for i in found.positions.tolist()]
    probs = _probabilities(built.model.head, found.features, temperature)
    uncertainty = _entropy(probs) if strategy == "entropy" else _one_minus_margin(probs)
    order = _one_per_group(kept, uncertainty, n) if strategy == "diverse" else \
        np.argsort(-uncertainty, kind="stable")[:n]
    return [Suggestion(kept[i].path, run.classes[int(probs[i].argmax())], float(probs[i].max()),
                       float(uncertainty[i])) for i in order]


def _unknown_to_run(run: artifact.RunInfo, samples: list[Sample]) -> list[Sample]:
    files = read_files(run.path / artifact.DATA_FILES) or {}
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


def _one_minus_margin(probs: np.ndarray) -> np.ndarray:
    top = np.sort(probs, axis=1)[:, ::-1]
    return 1.0 - (top[:, 0] - top[:, 1])


def _entropy(probs: np.ndarray) -> np.ndarray:
    return -(probs * np.log(np.clip(probs, 1e-12, None))).sum(axis=1)


def _one_per_group(samples: list[Sample], uncertainty: np.ndarray, n: int) -> list[int]:
    """The most uncertain first (by margin), at most one image of each group of copies or near-copies
    (the perceptual fingerprints ``imgtune doctor`` groups by; :mod:`imgtune.data.duplicates`)."""
    group: dict[Path, int] = {}
    for number, found in enumerate(exact_groups(samples) + near_groups(samples)):
        first = {group[s.path] for s in found.members if s.path in group}
        target = min(first) if first else number  # groups that share a member become one
        for sample in found.members:
            group[sample.path] = target
    chosen, taken = [], set()
    for i in np.argsort(-uncertainty, kind="stable"):
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
