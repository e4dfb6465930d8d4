"""Per-epoch metrics beside metrics.csv (always written): TensorBoard event files with ``--log
tensorboard``, in ``RUN/tensorboard/``. Only rank 0 writes."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import UsageError

TENSORBOARD_HINT = "pip install 'imgtune[tensorboard]'"


def require(kind: str) -> None:
    """Checked before the run folder is created, so a missing package stops nothing half-way."""
    if kind == "tensorboard":
        _summary_writer()


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # torch raises ImportError when the tensorboard package is missing
        raise UsageError(f"--log tensorboard needs the tensorboard package: {TENSORBOARD_HINT} "
                         "(or pip install tensorboard); metrics.csv is written without it (--log csv)") from exc
    return SummaryWriter


def scalars(row: dict) -> dict[str, float]:
    """A metrics.csv row as TensorBoard tags: ``train/loss``, ``val/accuracy``, ``lr`` ..."""
    tags = {}
    for key, value in row.items():
        if key == "epoch" or isinstance(value, (str, bool)) or value is None:
            continue
        for prefix in ("train_", "val_"):
            if key.startswith(prefix):
                key = f"{prefix[:-1]}/{key[len(prefix):]}"
                break
        if math.isfinite(float(value)):
            tags[key] = float(value)
    return tags


@contextlib.contextmanager
def epoch_logger(kind: str, run_dir: Path, first_epoch: int = 1, enabled: bool = True
                 ) -> Iterator[Callable[[int, dict], None]]:
    """Yields ``log(epoch, row)``. A resumed run starts at ``first_epoch``: TensorBoard hides the events
    of that epoch and later that an interrupted run had written (``purge_step``)."""
    if kind != "tensorboard" or not enabled:
        yield lambda epoch, row: None
        return
    from . import artifact

    writer = _summary_writer()(log_dir=str(Path(run_dir) / artifact.TENSORBOARD),
                               purge_step=first_epoch if first_epoch > 1 else None)

    def log(epoch: int, row: dict) -> None:
        for tag, value in scalars(row).items():
            writer.add_scalar(tag, value, epoch)
        writer.flush()  # an interrupted run keeps its epochs

    try:
        yield log
    finally:
        writer.close()
