"""Checkpoints: everything needed to continue an interrupted run exactly where it stopped.

```
RUN/checkpoints/epoch0003-step000012.pt   after 12 batches of epoch 3
RUN/checkpoints/epoch0003-end.pt          after epoch 3 (validated, its metrics row written)
```
A checkpoint holds the model, optimizer, scheduler and grad-scaler states, the phase, epoch and
batch reached, the random number generators' states (Python, NumPy, torch CPU and CUDA), the
training sampler's position, the early-stopping state (with the best weights for ``--keep best``)
and the metrics rows so far. It is a ``torch.save`` of plain containers only, so it loads with
``weights_only=True`` (nothing is unpickled that could run code). Each is written atomically
(temporary file, fsync, rename); the newest :data:`KEEP` are kept. An unusable newest file (cut
short, damaged, missing keys, or NaN weights) is reported and the one before it is used.
"""

from __future__ import annotations

import io
import logging
import random
import re
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import distributed, finite
from .artifact import CHECKPOINTS, atomic_write_bytes
from .errors import DataError, Interrupted

log = logging.getLogger(__name__)

FOLDER = CHECKPOINTS
KEEP = 2
FORMAT = 1
REQUIRED_KEYS = ("format", "model", "optimizer", "scheduler", "schedule_steps", "scaler", "phase", "epoch",
                 "step", "epoch_done", "steps", "tally", "rng", "sampler", "stopper", "rows", "stopped_early")
_NAME = re.compile(r"epoch(\d{4,})-(?:step(\d{6,})|end)\.pt")


def file_name(epoch: int, step: int, epoch_done: bool) -> str:
    return f"epoch{epoch:04d}-end.pt" if epoch_done else f"epoch{epoch:04d}-step{step:06d}.pt"


def _order(path: Path) -> tuple[int, float] | None:
    """Sort key (epoch, step; the end of an epoch after all its steps); None for other files."""
    match = _NAME.fullmatch(path.name)
    if match is None:
        return None
    return int(match[1]), float("inf") if match[2] is None else int(match[2])


def listed(folder: Path) -> list[Path]:
    """The checkpoint files in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = [(key, path) for path in folder.iterdir() if (key := _order(path)) is not None]
    return [path for _, path in sorted(found)]


def save(folder: Path, payload: dict) -> Path:
    """Write ``payload`` atomically, then delete all but the newest :data:`KEEP` checkpoints."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / file_name(payload["epoch"], payload["step"], payload["epoch_done"])
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    for old in listed(folder)[:-KEEP]:
        old.unlink(missing_ok=True)
    return path


def remove_partial(folder: Path) -> None:
    """Temporary files of writes cut short (a killed process): never complete, never needed."""
    for tmp in folder.glob(".epoch*.tmp"):
        tmp.unlink(missing_ok=True)


class UnusableCheckpoint(Exception):
    """Why a checkpoint file cannot be used (internal: :func:`newest_usable` turns it into a warning)."""


def load(path: Path) -> dict:
    """Read one checkpoint; raises :class:`UnusableCheckpoint` saying why it cannot be used."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, damaged pickle, refused type: torch raises many kinds
        raise UnusableCheckpoint(f"cannot be loaded ({type(exc).__name__}: {_brief(exc)})") from exc
    if not isinstance(payload, dict):
        raise UnusableCheckpoint(f"holds a {type(payload).__name__}, not a checkpoint")
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    if missing:
        raise UnusableCheckpoint(f"lacks {', '.join(missing)}")
    if payload["format"] != FORMAT:
        raise UnusableCheckpoint(f"has format {payload['format']!r}; this imgtune reads format {FORMAT}")
    if finite.nonfinite_tensors(payload["model"]):  # written before imgtune stopped diverging runs
        raise UnusableCheckpoint("holds weights that are NaN or infinite (the training that wrote it diverged)")
    return payload


def _brief(exc: Exception) -> str:
    """The first sentence of an error message (torch appends paragraphs of advice)."""
    line = (str(exc).strip().splitlines() or [""])[0]
    return line.split(". ")[0].rstrip(".")[:200]


@dataclass
class Found:
    path: Path
    payload: dict
    rejected: list[tuple[Path, str]] = field(default_factory=list)  # newer files that could not be used


def newest_usable(folder: Path) -> Found:
    """The newest checkpoint that loads; each newer one that does not is logged with the reason."""
    rejected: list[tuple[Path, str]] = []
    for path in reversed(listed(folder)):
        try:
            return Found(path, load(path), rejected)
        except UnusableCheckpoint as exc:
            log.warning("checkpoint %s is unusable: it %s; trying the one before it", path, exc)
            rejected.append((path, str(exc)))
    if not rejected:
        raise DataError(f"no checkpoint in {folder}: the run stopped before its first checkpoint (or was "
                        "trained without them); start it again")
    reasons = "; ".join(f"{path.name} {reason}" for path, reason in rejected)
    raise DataError(f"no usable checkpoint in {folder}: {reasons}; start the run again")


def capture_rng() -> dict:
    """The global generators' states as plain values (NumPy's array becomes a list of ints). CUDA's
    only once CUDA is in use: asking earlier would start it in runs on the CPU."""
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(words), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []}


def restore_rng(state: dict) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


class Checkpointer:
    """The engine's hooks (see ``engine.Hooks``): a checkpoint at the end of every epoch, every ``every``
    optimizer steps, and as soon as ``stop`` reports a signal, after which training stops
    (:class:`~imgtune.errors.Interrupted`)."""

    def __init__(self, run_dir: Path, every: int | None = None, stop=None):
        self.run_dir = Path(run_dir)
        self.folder = self.run_dir / FOLDER
        self.every = every
        self.stop = stop  # anything with a ``signum`` attribute: None until a stop is requested

    def after_step(self, steps: int, snapshot: Callable[[], dict]) -> None:
        stopping = self._stopping()
        if stopping or (self.every and steps % self.every == 0):
            path = self._save(snapshot())
            if stopping:
                raise self._interrupted(path)

    def after_epoch(self, snapshot: Callable[[], dict]) -> None:
        path = self._save(snapshot())
        if self._stopping():
            raise self._interrupted(path)

    def _save(self, payload: dict) -> Path:
        """Rank 0 writes (distributed: every rank took the snapshot, which gathers running sums)."""
        path = self.folder / file_name(payload["epoch"], payload["step"], payload["epoch_done"])
        if distributed.current().is_main:
            path = save(self.folder, payload)
        distributed.barrier()  # nobody runs ahead of a checkpoint that is not yet on disk
        return path

    def _stopping(self) -> bool:
        """A signal to any rank stops every rank at the same step (torchrun forwards signals to all,
        but a scheduler may signal one)."""
        local = self.stop is not None and self.stop.signum is not None
        return distributed.any_rank(local)

    def _interrupted(self, path: Path) -> Interrupted:
        if self.stop is None or self.stop.signum is None:  # distributed: another rank was signalled
            return Interrupted(f"training stopped because another rank was signalled; checkpoint {path} written; "
                               f"continue with: imgtune train --resume {self.run_dir}", signal.SIGTERM)
        return Interrupted(f"training stopped by signal {self.stop.name}; checkpoint {path} written; continue "
                           f"with: imgtune train --resume {self.run_dir}", self.stop.signum)
