"""One Predictor for everything that runs a trained model: ``predict``, ``evaluate`` and later
explanations, export checks and the server. It reads the model and its preprocessing from the run
folder, so inference can never disagree with training."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from . import artifact, models
from .data.decode import load_rgb
from .data.image_ref import ImageRef, as_image_ref
from .data.transforms import Preprocessing, eval_transform
from .inference import forward, select_device
from .errors import UsageError
from .predictions import Prediction, batched_probabilities, expand_paths, top_predictions  # noqa: F401 (also read as predict.X)

log = logging.getLogger(__name__)


class Predictor:
    """``calibrated``: probabilities softmax(logits / T) with the temperature T stored in the run folder
    (calibration.json, fitted on val after training); ``temperature`` gives T directly."""

    def __init__(self, model: torch.nn.Module, classes: list[str], preprocessing: Preprocessing,
                 device: str | torch.device = "auto", run: artifact.RunInfo | None = None,
                 calibrated: bool = False, temperature: float | None = None):
        if calibrated and temperature is None:
            if run is None:
                raise UsageError("calibrated=True needs the run folder (Predictor.from_run) or a temperature")
            temperature = float(artifact.read_calibration(run.path)["temperature"])
        if temperature is not None and not temperature > 0:
            raise UsageError(f"the temperature must be positive; got {temperature}")
        self.temperature = temperature
        self.device = device if isinstance(device, torch.device) else select_device(device)
        self.model = model.to(self.device, memory_format=torch.channels_last).eval()
        self.inference_model = _fuse_batch_norm(self.model)
        self.classes = classes
        self.preprocessing = preprocessing
        self.transform = eval_transform(preprocessing)
        self.run = run

    @classmethod
    def from_run(cls, path: str | Path, device: str = "auto", calibrated: bool = False) -> "Predictor":
        run = artifact.read_run(path)
        if calibrated:
            artifact.read_calibration(run.path)  # before the model is built: a missing file fails fast
        built = models.create(run.config.model, len(run.classes), load_pretrained=False)
        artifact.load_weights(built.model, run.path / artifact.WEIGHTS)
        return cls(built.model, run.classes, run.preprocessing, device, run, calibrated)

    def probabilities(self, paths: list[str | Path | ImageRef], batch_size: int = 32,
                      tta: bool = False) -> tuple[np.ndarray, list[str | None]]:
        """Class probabilities for each image (a path or an :class:`~imgtune.data.image_ref.ImageRef`;
        rows of NaN where it failed) and the errors; ``tta``: averaged with the mirror image's."""
        return batched_probabilities(paths, self.load_one, self.run_batch, len(self.classes), batch_size,
                                     flip=self.flip_one if tta else None)

    def predict(self, paths: Iterable[str | Path | ImageRef], top_k: int = 3, batch_size: int = 32,
                tta: bool = False) -> list[Prediction]:
        """Top ``top_k`` classes of each image; ``Prediction.path`` is its path (or an ImageRef's name)."""
        paths = [as_image_ref(p) for p in paths]
        probs, errors = self.probabilities(paths, batch_size, tta)
        return top_predictions(paths, probs, errors, self.classes, top_k)

    def load_one(self, source: str | Path | ImageRef) -> torch.Tensor:
        """One image as the model takes it (raises DecodeError); the server decodes with it off its event loop."""
        return self.transform(load_rgb(source, self.preprocessing.resize_size))

    @staticmethod
    def flip_one(tensor: torch.Tensor) -> torch.Tensor:
        """A :meth:`load_one` result (C, H, W) mirrored left to right."""
        return torch.flip(tensor, dims=[-1])

    def run_batch(self, tensors: list[torch.Tensor]) -> np.ndarray:
        """Probabilities of a batch of :meth:`load_one` results (the server's dynamic batches use it)."""
        logits = forward(self.inference_model, torch.stack(tensors), self.device)
        if self.temperature is not None:
            logits = logits / self.temperature
        return torch.softmax(logits, dim=1).numpy()


def _fuse_batch_norm(model: torch.nn.Module) -> torch.nn.Module:
    """An inference copy with batch norm folded into the convolutions before it (torch.fx): about 30%
    less time per image for MobileNetV2 on a CPU (docs/performance.md). Models that cannot be traced
    symbolically run as they are."""
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(model).to(memory_format=torch.channels_last)
    except Exception as exc:  # tracing fails on data-dependent control flow, in many ways
        log.debug("batch-norm fusion not possible for this model (%s); running it as it is", exc)
        return model
