"""What every inference engine returns and reads, without torch: :class:`Prediction` rows, the top-k of a
probability matrix, which files the PATH arguments of ``imgtune predict`` mean, and the
:class:`RunPredictor` protocol that ``predict``, ``evaluate`` and ``measure`` call (the torch
:class:`~imgtune.predict.Predictor` and the ONNX Runtime :class:`~imgtune.ort_predict.OrtPredictor`)."""

from __future__ import annotations

import itertools
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .data.image_ref import ImageRef
from .data.reading import is_regular, kind_of
from .data.scan import IMAGE_EXTENSIONS
from .errors import DataError

if TYPE_CHECKING:
    from .artifact import RunInfo

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    path: str
    labels: list[str] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        if self.error:
            return {"path": self.path, "error": self.error}
        return {"path": self.path, "label": self.labels[0], "prob": self.probs[0],
                "top": [{"label": label, "prob": p} for label, p in zip(self.labels, self.probs)]}


class RunPredictor(Protocol):
    """What ``imgtune predict`` and ``evaluate`` use of a predictor, whichever engine runs the model."""

    classes: list[str]
    run: "RunInfo | None"  # the run folder it was made from (measure() reads its data and calibration)
    temperature: float | None  # None: the model's own probabilities

    def probabilities(self, paths: list, batch_size: int = 32,
                      tta: bool = False) -> tuple[np.ndarray, list[str | None]]: ...

    def predict(self, paths: Iterable, top_k: int = 3, batch_size: int = 32, tta: bool = False) -> list[Prediction]: ...

    def load_one(self, source: Any) -> Any: ...  # one image as run_batch takes it; raises DecodeError

    def run_batch(self, inputs: list) -> np.ndarray: ...  # probabilities, one row per loaded image

    def flip_one(self, loaded: Any) -> Any: ...  # a load_one result mirrored left to right (--tta)


def rescale_temperature(probs: np.ndarray, have: float, want: float) -> np.ndarray:
    """Probabilities at temperature ``have`` turned into those at ``want``: ``softmax(log(p) * have / want)``,
    exact up to the float rounding of ``p`` (log softmax differs from the logits by a constant per row)."""
    if have == want:
        return probs
    with np.errstate(divide="ignore"):
        scaled = np.log(probs) * (have / want)
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def top_predictions(paths: Sequence[str | Path | ImageRef], probs: np.ndarray, errors: Sequence[str | None],
                    classes: list[str], top_k: int) -> list[Prediction]:
    """One :class:`Prediction` per image: its ``top_k`` classes, or its error."""
    k = max(1, min(top_k, len(classes)))
    results = []
    for path, row, error in zip(paths, probs, errors):
        if error:
            results.append(Prediction(str(path), error=error))
            continue
        order = np.argsort(-row)[:k]
        results.append(Prediction(str(path), [classes[i] for i in order], [float(row[i]) for i in order]))
    return results


def expand_paths(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given (whatever their extension) and image files found recursively in folders; in a
    folder, what is not a regular file (a FIFO, device or socket with an image's name) is skipped with a
    warning. A file given by name that cannot be read becomes an error row, not a crash."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if not path.is_dir():
            found.append(path)
            continue
        for p in sorted(path.rglob("*")):
            if p.suffix.lower() not in IMAGE_EXTENSIONS or p.is_dir() or \
                    any(part.startswith(".") for part in p.relative_to(path).parts):
                continue
            if is_regular(p):
                found.append(p)
            elif p.exists():  # not a dangling link
                log.warning("skipping %s: %s, not a regular file (only regular files are read)", p,
                            kind_of(p.stat().st_mode))
    if not found:
        raise DataError(f"no image files in {', '.join(map(str, inputs))}")
    return found


def batched_probabilities(paths: Sequence, load: Callable[[Any], Any], run: Callable[[list], np.ndarray],
                          num_classes: int, batch_size: int = 32, ahead: int = 2,
                          flip: Callable[[Any], Any] | None = None) -> tuple[np.ndarray, list[str | None]]:
    """What every predictor does with a list of images: ``load`` each (returning what ``run`` takes, or
    raising :class:`DecodeError`/``OSError``) in threads up to ``ahead`` batches in front of the model
    (Pillow releases the GIL, so decoding overlaps inference and memory holds a few batches), then
    ``run`` each batch of loaded images to probabilities. Returns the probabilities (rows of NaN where an
    image failed) and each image's error (``None`` when it was read). With ``flip`` (``--tta``), each
    image's probabilities are the mean of its own and its mirror image's (:func:`flip_averaged`)."""
    run = flip_averaged(run, flip) if flip is not None else run
    probs = np.full((len(paths), num_classes), np.nan, dtype=np.float64)
    errors: list[str | None] = [None] * len(paths)
    for start, loaded in read_ahead(paths, _catching(load), batch_size, ahead):
        for offset, (_, message) in enumerate(loaded):
            errors[start + offset] = message
        keep = [i for i, (item, _) in enumerate(loaded) if item is not None]
        if keep:
            probs[[start + i for i in keep]] = run([loaded[i][0] for i in keep])
    return probs, errors


def flip_averaged(run: Callable[[list], np.ndarray], flip: Callable[[Any], Any]) -> Callable[[list], np.ndarray]:
    """Flip test-time augmentation: the mean of the probabilities of each image and of its left-right
    mirror image, both views in one call of ``run``. Used only where asked (``predict --tta``,
    ``evaluate --tta``): exports and the server answer as plain ``predict`` does."""
    def both(items: list) -> np.ndarray:
        probs = run([*items, *(flip(item) for item in items)])
        return (probs[:len(items)] + probs[len(items):]) / 2
    return both


def _catching(load: Callable[[Any], Any]) -> Callable[[Any], tuple[Any, str | None]]:
    from .data.decode import DecodeError

    def safe(source):
        try:
            return load(source), None
        except DecodeError as exc:
            return None, str(exc)
        except OSError as exc:
            return None, exc.strerror or str(exc)
    return safe


def read_ahead(paths: Sequence, load: Callable, batch_size: int, ahead: int) -> Iterator[tuple[int, list]]:
    """``(start, [load(item) ...])`` for each batch of ``paths``, loaded by threads ``ahead`` batches in
    front of the consumer."""
    starts = iter(range(0, len(paths), batch_size))
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        def submit(start: int):
            return start, [pool.submit(load, p) for p in paths[start:start + batch_size]]

        pending = deque(submit(start) for start in itertools.islice(starts, ahead))
        while pending:
            start, futures = pending.popleft()
            following = next(starts, None)
            if following is not None:
                pending.append(submit(following))
            yield start, [future.result() for future in futures]
