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
rank.json          --model auto only: the ranking the model was chosen from (imgtune.rank)
data_files.json.gz every image the run started on (split, path, label, content digest): what a resume
                   compares the data with (imgtune.data.content)
.imgtune.lock      held by the one process writing into the folder (imgtune.runlock)
```
meta.json records the SHA-256 of model.safetensors once the weights are written; loading checks it.
Derived files (reports, evaluations, explanations, exports) are listed in ``DERIVED``: ``--overwrite``
and ``--resume`` remove them with the results they were derived from.
Every file is written atomically (temporary file, fsync, rename), so a crash never leaves half a file.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import platform
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__, finite, runlock
from .atomic import atomic_write, atomic_write_bytes, atomic_write_text, check_writable_folder  # noqa: F401
from .cache import file_sha256
from .config import RunConfig, from_dict
from .errors import DataError, ModelError, UsageError

if TYPE_CHECKING:  # torch is imported only where weights are read or written, so that reading a run folder
    import torch    # stays torch-free (imgtune predict --engine onnxruntime)

    from .data.transforms import Preprocessing

log = logging.getLogger(__name__)

CONFIG, WEIGHTS, META, METRICS_CSV, METRICS_JSON, CALIBRATION, DATA_FILES, RANK = (
    "config.yaml", "model.safetensors", "meta.json", "metrics.csv", "metrics.json", "calibration.json",
    "data_files.json.gz", "rank.json")
ARTIFACT_FILES = (CONFIG, WEIGHTS, META, METRICS_CSV, METRICS_JSON, CALIBRATION, DATA_FILES, RANK)
WEIGHTS_SHA256 = "weights_sha256"  # meta.json's record of model.safetensors
CHECKPOINTS = "checkpoints"  # see imgtune.checkpoint
TENSORBOARD = "tensorboard"  # event files of --log tensorboard
EVALUATION_FILES = ("evaluation_*.json", "confusion_matrix_*.csv", "confusion_matrix_*.png",
                    "reliability_*.png")  # imgtune evaluate
EXPLANATIONS = "explanations"  # imgtune explain's default --out
# What was derived from a run's weights, the one list of it: removed with the results it came from.
# Patterns (glob) relative to the run folder; the folders among them are removed when left empty.
DERIVED = (*EVALUATION_FILES, "report*.html", f"{EXPLANATIONS}/*.png", "export/**/*")
DERIVED_FOLDERS = (EXPLANATIONS, "export")


def default_out_dir() -> Path:
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


def check_out_dir(out: str | Path | None, overwrite: bool) -> None:
    """What :func:`prepare_out_dir` would refuse, found before any work (and before the folder exists, so
    that a run stopped by a mistake can be run again into the same ``--out``)."""
    path = Path(out) if out else default_out_dir()
    check_writable_folder(path, "--out")
    _refuse_non_empty(path, overwrite)


def prepare_out_dir(out: str | Path | None, overwrite: bool, lock: contextlib.ExitStack | None = None) -> Path:
    """Create the run folder; a non-empty one is refused unless ``overwrite``. With ``lock``, the folder
    is held (``imgtune.runlock``, until ``lock`` closes) before anything in it is removed or written."""
    path = Path(out) if out else default_out_dir()
    check_out_dir(path, overwrite)  # before the lock file is made in a folder that is not ours
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {path}: cannot create the folder ({exc.strerror}); choose one you can write "
                         "to") from exc
    if lock is not None:
        lock.enter_context(runlock.hold(path, "train"))
        _refuse_non_empty(path, overwrite)  # another run may have written there until we held it
    if overwrite:
        _remove_results(path)
    return path


def _refuse_non_empty(path: Path, overwrite: bool) -> None:
    if not overwrite and path.is_dir() and any(p.name != runlock.LOCK_FILE for p in path.iterdir()):
        raise UsageError(f"--out {path} exists and is not empty; choose another folder or pass --overwrite")


def _remove_results(path: Path) -> None:
    """Stale results of the previous run (its weights, metrics, evaluations, reports, explanations,
    exports and checkpoints) must not survive: ``--resume`` would otherwise continue the old run, and a
    report would sit beside results it does not describe. The lock file stays."""
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
    """The weights, final metrics and everything derived from them (``DERIVED``), which a resumed run is
    about to replace: until it does, none may sit beside a config and metrics they do not belong to."""
    stale = [path / WEIGHTS, path / METRICS_JSON, path / CALIBRATION]
    stale += [p for pattern in DERIVED for p in path.glob(pattern) if p.is_file() or p.is_symlink()]
    for file in stale:
        file.unlink(missing_ok=True)
    for name in DERIVED_FOLDERS:  # emptied folders go, deepest first; one with other files stays
        for folder in sorted((p for p in (path / name).glob("**/*") if p.is_dir()), reverse=True):
            with contextlib.suppress(OSError):
                folder.rmdir()
        with contextlib.suppress(OSError):
            (path / name).rmdir()


def write_json(path: Path, values: dict) -> None:
    """Strict JSON: a value that does not exist (NaN, an infinity) is written ``null``."""
    atomic_write_text(path, finite.dumps(values, indent=2) + "\n")


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """Write the weights, then record their SHA-256 in the meta.json beside them (both atomically), so
    that :func:`load_weights` can tell damaged weights from good ones."""
    from safetensors.torch import save_model

    atomic_write(path, lambda tmp: save_model(model, str(tmp)))
    meta_path = path.parent / META
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        meta[WEIGHTS_SHA256] = file_sha256(path)
        write_json(meta_path, meta)


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
    import torch
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
    def preprocessing(self) -> "Preprocessing":
        from .data.transforms import Preprocessing

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
    """Load ``path`` into ``model`` after checking it against the SHA-256 that the meta.json beside it
    recorded when it was written (runs written before imgtune recorded one load unchecked)."""
    from safetensors.torch import load_model

    _verify_weights(path)
    try:
        load_model(model, str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise ModelError(f"cannot load {path} into the model described by its run folder: {exc}") from exc
    bad = finite.nonfinite_tensors(model.state_dict())
    if bad:  # written before imgtune stopped diverging runs: every prediction would be the same class
        names = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
        raise ModelError(f"{path} holds weights that are NaN or infinite ({names}): the training that wrote it "
                         "diverged; train the run again with a lower --lr")


def _verify_weights(path: Path) -> None:
    try:
        expected = json.loads((path.parent / META).read_text()).get(WEIGHTS_SHA256)
    except (OSError, ValueError, AttributeError):
        expected = None
    if expected is None:
        log.debug("%s: no checksum in %s (written before imgtune recorded one); loading unchecked", path, META)
        return
    if file_sha256(path) != expected:
        raise ModelError(f"{path} is damaged: its SHA-256 differs from the one recorded in {path.parent / META} "
                         "when it was written. Train the run again, or rewrite the weights with `imgtune train "
                         f"--resume {path.parent}` if its checkpoints remain")
