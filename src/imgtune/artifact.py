"""The run folder: everything needed to repeat, evaluate and use a trained model.

```
config.yaml        the final, complete configuration (``imgtune train --config`` accepts it)
model.safetensors  weights (never pickled objects)
meta.json          classes, preprocessing, model name and library, weights source, strategy, data summary,
                   versions
metrics.csv        one row per epoch
metrics.json       validation results at top level, test results under "test", calibration under
                   "calibration"
calibration.json   the temperature fitted on val and ECE before/after it (imgtune.calibration)
tensorboard/       per-epoch scalars as TensorBoard event files (only with --log tensorboard)
checkpoints/       the newest two checkpoints, to continue an interrupted run (imgtune.checkpoint)
```
Every file is written atomically (temporary file, fsync, rename), so a crash never leaves half a file.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import platform
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from . import __version__, finite
from .atomic import atomic_write, atomic_write_bytes, atomic_write_text  # noqa: F401 (re-exported)
from .config import RunConfig, from_dict
from .data.transforms import Preprocessing
from .errors import DataError, UsageError

CONFIG, WEIGHTS, META, METRICS_CSV, METRICS_JSON, CALIBRATION = (
    "config.yaml", "model.safetensors", "meta.json", "metrics.csv", "metrics.json", "calibration.json")
ARTIFACT_FILES = (CONFIG, WEIGHTS, META, METRICS_CSV, METRICS_JSON, CALIBRATION)
CHECKPOINTS = "checkpoints"  # see imgtune.checkpoint
TENSORBOARD = "tensorboard"  # event files of --log tensorboard
EVALUATION_FILES = ("evaluation_*.json", "confusion_matrix_*.csv", "confusion_matrix_*.png",
                    "reliability_*.png")  # imgtune evaluate


def default_out_dir() -> Path:
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


def prepare_out_dir(out: str | Path | None, overwrite: bool) -> Path:
    """Create the run folder; a non-empty one is refused unless ``overwrite``."""
    path = Path(out) if out else default_out_dir()
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path} is a file, not a folder")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise UsageError(f"--out {path} exists and is not empty; choose another folder or pass --overwrite")
        _remove_results(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _remove_results(path: Path) -> None:
    """Stale results of the previous run (its weights, metrics, evaluations and checkpoints) must not
    survive: ``--resume`` would otherwise continue the old run."""
    for name in ARTIFACT_FILES:
        (path / name).unlink(missing_ok=True)
    remove_final_results(path)
    folder = path / CHECKPOINTS
    for file in [*folder.glob("epoch*.pt"), *folder.glob("epoch*.pt.unusable")]:
        file.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # kept if something else lives there
        folder.rmdir()
    events = path / TENSORBOARD
    for file in events.glob("events.out.tfevents.*"):
        file.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        events.rmdir()


def remove_final_results(path: Path) -> None:
    """The weights, final metrics and evaluations, which a resumed run is about to replace: until it
    does, none may sit beside a config and metrics they do not belong to."""
    stale = [path / WEIGHTS, path / METRICS_JSON, path / CALIBRATION]
    stale += [p for pattern in EVALUATION_FILES for p in path.glob(pattern)]
    for file in stale:
        file.unlink(missing_ok=True)


def write_json(path: Path, values: dict) -> None:
    """Strict JSON: a value that does not exist (NaN, an infinity) is written ``null``."""
    atomic_write_text(path, finite.dumps(values, indent=2) + "\n")


def save_weights(model: torch.nn.Module, path: Path) -> None:
    atomic_write(path, lambda tmp: save_model(model, str(tmp)))


def write_metrics_csv(path: Path, rows: list[dict]) -> None:
    """Rewritten whole after each epoch (atomically), so the file is always complete."""
    if not rows:
        return
    fields = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def versions() -> dict:
    import timm
    import torchvision

    return {"imgtune": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "python": platform.python_version()}


@dataclass
class RunInfo:
    path: Path
    config: RunConfig
    meta: dict

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_dict(self.meta["preprocessing"])


def read_run(path: str | Path) -> RunInfo:
    """Read a run folder's config and metadata; raises DataError naming what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"run folder {path} does not exist; pass the folder `imgtune train` wrote (--out)")
    missing = [name for name in (CONFIG, WEIGHTS, META) if not (path / name).is_file()]
    if missing:
        raise DataError(f"{path} is not a complete imgtune run folder: missing {', '.join(missing)}")
    import yaml

    try:
        meta = json.loads((path / META).read_text())
        config = from_dict(yaml.safe_load((path / CONFIG).read_text()) or {}, origin=str(path / CONFIG))
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise DataError(f"{path}: damaged run metadata ({exc})") from exc
    return RunInfo(path, config, meta)


def read_calibration(path: Path) -> dict:
    """The run's calibration.json; a DataError saying how to get one when the run has none."""
    file = Path(path) / CALIBRATION
    if not file.is_file():
        raise DataError(f"{path} has no {CALIBRATION}: it was trained before imgtune fitted a temperature "
                        "(or its training did not finish). Train it again, or write its results again with "
                        f"`imgtune train --resume {path}` if it still has its checkpoints; without "
                        "--calibrated the probabilities are the model's own")
    try:
        values = json.loads(file.read_text())
        temperature = float(values["temperature"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{file} is damaged ({exc}); train the run again") from exc
    if not temperature > 0:
        raise DataError(f"{file}: the temperature must be positive, got {temperature}")
    return values


def load_weights(model: torch.nn.Module, path: Path) -> None:
    from .errors import ModelError

    try:
        load_model(model, str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise ModelError(f"cannot load {path} into the model described by its run folder: {exc}") from exc
    bad = finite.nonfinite_tensors(model.state_dict())
    if bad:  # written before imgtune stopped diverging runs: every prediction would be the same class
        names = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
        raise ModelError(f"{path} holds weights that are NaN or infinite ({names}): the training that wrote it "
                         "diverged; train the run again with a lower --lr")
