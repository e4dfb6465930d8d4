"""imgtune: turn a folder of labelled images into a well-evaluated image classifier by transfer learning.

Python API (the command line calls the same functions)::

    import imgtune
    result = imgtune.train("data/", model="mobilenet_v2", strategy="linear-probe", out="runs/ants")
    predictor = imgtune.load(result.run_dir)
    for p in predictor.predict(["photo.jpg"]):
        print(p.path, p.labels[0], p.probs[0])
    evaluation = imgtune.evaluate(result.run_dir)  # computes only
    imgtune.write_evaluation(evaluation)  # the files `imgtune evaluate` writes into the run folder
    imgtune.resume("runs/ants")  # an interrupted run, from its newest checkpoint
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .evaluation import EvaluationResult
    from .predict import Predictor
    from .training import TrainResult


def train(data: str | Path, *, preset: str | None = None, config_file: str | Path | None = None,
          progress: bool = True, **options: Any) -> "TrainResult":
    """Train a classifier on ``data`` (a folder or a CSV). Options are the flat names of the command
    line's flags (``imgtune.config.OPTIONS``): ``model``, ``strategy``, ``epochs``, ``lr``, ``augment``,
    ``out``, ``seed`` ..."""
    from .config import build
    from .training import train as run_training

    return run_training(build(data, preset, config_file, **options), progress=progress)


def resume(run: str | Path, *, epochs: int | None = None, progress: bool = True) -> "TrainResult":
    """Continue the interrupted run in folder ``run`` from its newest usable checkpoint, with the run's
    saved config (``imgtune train --resume RUN``). ``epochs`` may only raise the run's epoch count, which
    also trains a finished run further."""
    from .training import resume as resume_training

    return resume_training(run, epochs, progress=progress)


def load(run: str | Path, device: str = "auto", calibrated: bool = False) -> "Predictor":
    """A :class:`~imgtune.predict.Predictor` for a run folder written by :func:`train`; ``calibrated``:
    probabilities scaled by the temperature stored with the run."""
    from .predict import Predictor

    return Predictor.from_run(run, device, calibrated)


def evaluate(run: str | Path, data: str | Path | None = None, split: str | None = None,
             device: str = "auto") -> "EvaluationResult":
    """Measure a run on its validation split (or ``split``), or on other ``data``; writes no file
    (:func:`write_evaluation` does)."""
    from .evaluation import evaluate as run_evaluation

    return run_evaluation(run, None if data is None else str(data), split, device)


def write_evaluation(result: "EvaluationResult") -> dict[str, Path]:
    """Write what :func:`evaluate` measured into the run folder, as ``imgtune evaluate`` does; returns the
    files by kind (``json``, ``csv``, ``png``, ``reliability``)."""
    from .evaluation import write_evaluation as write_files

    return write_files(result)


__all__ = ["__version__", "evaluate", "load", "resume", "train", "write_evaluation"]
