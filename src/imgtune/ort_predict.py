"""ONNX Runtime as the engine of ``imgtune predict`` and ``evaluate``: the run's export (``RUN/export/model.onnx``,
or ``model.int8.onnx`` with ``int8``) behind the same interface as the torch
:class:`~imgtune.predict.Predictor` (:class:`~imgtune.predictions.RunPredictor`).

Nothing here imports torch, torchvision or timm: ``imgtune predict RUN photo.jpg`` on this path starts in
about a second instead of eight. Images are decoded by imgtune's own guarded decoder (the same errors per
image as the torch engine) and resized and cropped by the export's consumer recipe, whose pixels equal
imgtune's (each export checks it). An export is used only while its ``weights_sha256`` equals the SHA-256 of
the run's model.safetensors: ``auto`` falls back to torch and says why, ``onnxruntime`` refuses.

The temperature: the graph's own (metadata ``temperature``, set by ``imgtune export --calibrated``) is
turned into the one asked for outside the graph, ``softmax(log(p) * T_graph / T_wanted)`` (exact up to
float32 rounding of p, since log softmax differs from the logits by a constant per image); so
``--calibrated`` works with any export and ``evaluate`` measures the model's own probabilities.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from . import artifact
from .cache import file_sha256
from .consumer_recipe import RESAMPLE, center_crop, resize_shorter_side
from .data.decode import load_rgb
from .data.image_ref import ImageRef, as_image_ref
from .errors import UsageError
from .export_card import EXPORT_DIR, INPUT_NAME, INT8_FILE, MODEL_FILE
from .predictions import Prediction, RunPredictor, batched_probabilities, rescale_temperature, top_predictions

log = logging.getLogger(__name__)

ENGINES = ("auto", "torch", "onnxruntime")
INSTALL_HINT = "pip install 'imgtune[export]'"


class ExportUnusable(UsageError):
    """The run has no export the ONNX Runtime engine may use (missing, or no onnxruntime)."""


class StaleExport(ExportUnusable):
    """The export was made from other weights than the run's current ones."""


def open_predictor(run_dir: str | Path, engine: str = "auto", device: str = "auto", calibrated: bool = False,
                   int8: bool = False) -> RunPredictor:
    """The predictor ``engine`` asks for. ``auto``: ONNX Runtime when the run's export matches its weights
    (and ``device`` is auto or cpu), else torch, logging why; ``int8`` always means ONNX Runtime."""
    if engine not in ENGINES:
        raise UsageError(f"--engine must be one of {', '.join(ENGINES)}; got {engine!r}")
    if engine == "torch" and int8:
        raise UsageError("--int8 runs the int8 ONNX export (model.int8.onnx) with ONNX Runtime; drop "
                         "--engine torch")
    if engine == "auto" and not int8:
        try:
            if device not in ("auto", "cpu"):
                raise ExportUnusable(f"--device {device}: the ONNX Runtime engine runs on the CPU")
            predictor = OrtPredictor.from_run(run_dir, calibrated=calibrated)
        except ExportUnusable as exc:
            # a stale export is worth a word; a run never exported is the ordinary case
            log.log(logging.INFO if isinstance(exc, StaleExport) else logging.DEBUG, "engine torch: %s", exc)
            return _torch_predictor(run_dir, device, calibrated)
        log.debug("engine onnxruntime: %s matches the run's weights", predictor.model_path)
        return predictor
    if engine == "torch":
        return _torch_predictor(run_dir, device, calibrated)
    if device not in ("auto", "cpu"):
        raise UsageError(f"the ONNX Runtime engine runs on the CPU; drop --device {device} or use --engine torch")
    return OrtPredictor.from_run(run_dir, calibrated=calibrated, int8=int8)


def _torch_predictor(run_dir: str | Path, device: str, calibrated: bool) -> RunPredictor:
    from .predict import Predictor

    return Predictor.from_run(run_dir, device, calibrated=calibrated)


def _runtime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise ExportUnusable(f"the ONNX Runtime engine needs onnxruntime, which is not installed: "
                             f"{INSTALL_HINT}") from exc
    return onnxruntime


class OrtPredictor:
    """``model_path``: an imgtune ONNX export (its metadata_props say the classes, preprocessing and
    temperature); ``temperature``: the one wanted (None: the model's own probabilities)."""

    def __init__(self, model_path: str | Path, run: artifact.RunInfo | None = None,
                 temperature: float | None = None):
        if temperature is not None and not temperature > 0:
            raise UsageError(f"the temperature must be positive; got {temperature}")
        ort = _runtime()
        self.model_path = Path(model_path)
        self.session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        try:
            self.classes = list(json.loads(meta["classes"]))
            self.pre = json.loads(meta["preprocessing"])
            self.graph_temperature = json.loads(meta.get("temperature", "null"))
        except (KeyError, ValueError) as exc:
            raise ExportUnusable(f"{model_path} is not an imgtune export (its metadata lacks {exc}); "
                                 "make it with `imgtune export RUN`") from exc
        self.weights_sha256 = meta.get("weights_sha256")
        self.run = run
        self.temperature = temperature
        self.resample = RESAMPLE[self.pre["interpolation"]]

    @classmethod
    def from_run(cls, path: str | Path, calibrated: bool = False, int8: bool = False) -> "OrtPredictor":
        """The run's export, refused (:class:`ExportUnusable`) when missing or made from other weights."""
        run = artifact.read_run(path)
        model_path = run.path / EXPORT_DIR / (INT8_FILE if int8 else MODEL_FILE)
        how = f"imgtune export {run.path}" + (" --int8" if int8 else "")
        if not model_path.is_file():
            raise ExportUnusable(f"{run.path} has no {'int8 ' if int8 else ''}ONNX export ({model_path}); "
                                 f"make one with `{how}`")
        temperature = float(artifact.read_calibration(run.path)["temperature"]) if calibrated else None
        predictor = cls(model_path, run, temperature)
        if predictor.weights_sha256 != file_sha256(run.path / artifact.WEIGHTS):
            raise StaleExport(f"{model_path} was made from other weights than the run's current "
                              f"{artifact.WEIGHTS} (trained again since?); make it again with `{how}`")
        return predictor

    def probabilities(self, paths: list[str | Path | ImageRef], batch_size: int = 32,
                      tta: bool = False) -> tuple[np.ndarray, list[str | None]]:
        """Class probabilities for each image (rows of NaN where it failed) and the errors; ``tta``:
        averaged with the mirror image's."""
        return batched_probabilities(paths, self.load_one, self.run_batch, len(self.classes), batch_size,
                                     flip=self.flip_one if tta else None)

    @staticmethod
    def flip_one(pixels: np.ndarray) -> np.ndarray:
        """A :meth:`load_one` result (H, W, C) mirrored left to right."""
        return np.ascontiguousarray(pixels[:, ::-1])

    def run_batch(self, pixels: list[np.ndarray]) -> np.ndarray:
        """Probabilities of a batch of :meth:`load_one` results."""
        out = self.session.run(None, {INPUT_NAME: np.stack(pixels)})[0]
        return rescale_temperature(out.astype(np.float64), self.graph_temperature or 1.0, self.temperature or 1.0)

    def predict(self, paths: Iterable[str | Path | ImageRef], top_k: int = 3, batch_size: int = 32,
                tta: bool = False) -> list[Prediction]:
        paths = [as_image_ref(p) for p in paths]
        probs, errors = self.probabilities(paths, batch_size, tta)
        return top_predictions(paths, probs, errors, self.classes, top_k)

    def load_one(self, source: str | Path | ImageRef) -> np.ndarray:
        """One image as the graph takes it (uint8 HWC); raises DecodeError."""
        img = load_rgb(source, self.pre["resize_size"])
        img = resize_shorter_side(img, self.pre["resize_size"], self.resample)
        return center_crop(np.asarray(img), self.pre["input_size"])
