"""``imgtune export --int8``: ``model.int8.onnx`` beside ``model.onnx``, by ONNX Runtime's static
quantisation, and what it costs in accuracy.

Calibration: a seeded sample of up to :data:`CALIBRATION_IMAGES` of the run's training images, turned into
the graph's uint8 input by the consumer recipe (the same code a user runs). Quantisation: QDQ format,
MinMax calibration, int8 weights per output channel, uint8 activations; the uint8 -> float scaling and
normalisation in front of the first convolution and the final softmax stay float (docs/export.md says
why, with the figures). The accuracy change is measured on the run's val (and test) split through the
consumer recipe, fp32 file against int8 file, and stored under ``int8`` in export.json; a drop of more
than :data:`MAX_DROP_POINTS` is a warning, not a failure.
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
from pathlib import Path

import numpy as np

from . import artifact
from .consumer_recipe import preprocess as consumer_preprocess
from .data.image_ref import ImageRef
from .errors import DataError, ModelError
from .export_card import INT8_FILE

log = logging.getLogger(__name__)

CALIBRATION_IMAGES = 200  # at most; a seeded sample of the training split
CALIBRATION_SEED = 0
MAX_DROP_POINTS = 5.0  # an int8 top-1 accuracy this many points below fp32 or more gives a warning
PER_CHANNEL = True  # measured on hymenoptera (docs/export.md): per-tensor loses more accuracy
BATCH = 32


def quantize_export(run: artifact.RunInfo, fp32_path: Path, int8_path: Path, metadata: dict[str, str]) -> dict:
    """Write ``int8_path`` from ``fp32_path`` and return export.json's ``int8`` block."""
    pre = json.loads(metadata["preprocessing"])
    calibration = calibration_inputs(run, pre)
    quantization = {"method": "onnxruntime.quantization.quantize_static", "format": "QDQ",
                    "calibration_method": "MinMax", "per_channel": PER_CHANNEL, "activations": "uint8",
                    "weights": "int8", "calibration_images": len(calibration),
                    "calibration_source": f"seeded sample (seed {CALIBRATION_SEED}) of the run's train split",
                    "kept_float": "the uint8 -> float scaling and normalisation before the first Conv; Softmax"}
    try:
        quantize(fp32_path, int8_path, calibration, PER_CHANNEL)
    except Exception as exc:  # onnxruntime.quantization raises plain ValueError, RuntimeError, ...
        text = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise ModelError(f"int8 quantisation of {run.config.model.name} failed: {text}; "
                         "export without --int8 for the fp32 model alone") from exc
    _set_metadata(int8_path, {**metadata, "quantization": json.dumps(quantization)})
    splits = {name: compare_split(fp32_path, int8_path, run, name, pre) for name in _splits(run)}
    worst = max((s["drop_points"] for s in splits.values()), default=0.0)
    block = {"file": INT8_FILE, "quantization": quantization, "splits": splits,
             "max_drop_points": MAX_DROP_POINTS, "warning": None}
    if worst > MAX_DROP_POINTS:
        block["warning"] = (f"int8 top-1 accuracy is {worst:.2f} points below fp32 (more than the "
                            f"{MAX_DROP_POINTS:g}-point limit); prefer model.onnx")
        log.warning(block["warning"])
    return block


def calibration_inputs(run: artifact.RunInfo, pre: dict) -> list[np.ndarray]:
    """uint8 inputs of a seeded sample of the training images (unreadable ones skipped)."""
    from .evaluation import select_images

    try:
        images = select_images(run, None, "train").images
    except DataError as exc:
        raise DataError(f"{exc}; --int8 calibrates on the run's training images") from exc
    sample = random.Random(CALIBRATION_SEED).sample(images, min(CALIBRATION_IMAGES, len(images)))
    inputs = [x for x in (_pixels(ref, pre) for ref in sample) if x is not None]
    if not inputs:
        raise DataError(f"none of the {len(sample)} training image(s) sampled for int8 calibration could be read")
    return inputs


def _pixels(ref: ImageRef, pre: dict) -> np.ndarray | None:
    try:
        with ref.open() as handle:
            return consumer_preprocess(handle, pre)
    except (OSError, ValueError, SyntaxError) as exc:  # what Pillow raises for a broken file
        log.debug("skipped %s: %s", ref, exc)
        return None


class _Reader:
    """A ``CalibrationDataReader``: the calibration inputs in batches of :data:`BATCH`."""

    def __init__(self, inputs: list[np.ndarray], input_name: str):
        self._batches = iter([{input_name: np.stack(inputs[i:i + BATCH])} for i in range(0, len(inputs), BATCH)])

    def get_next(self):
        return next(self._batches, None)


def quantize(fp32_path: Path, int8_path: Path, inputs: list[np.ndarray], per_channel: bool,
             keep_float: bool = True) -> None:
    """Static QDQ quantisation of ``fp32_path`` (after ``quant_pre_process``) calibrated on ``inputs``;
    ``keep_float`` leaves the nodes in front of the first Conv and the Softmax unquantised."""
    quiet = logging.getLogger("onnxruntime.quantization")  # its INFO lines are about its own steps
    level = quiet.level
    quiet.setLevel(max(level, logging.WARNING))
    try:
        _quantize(fp32_path, int8_path, inputs, per_channel, keep_float)
    finally:
        quiet.setLevel(level)


def _quantize(fp32_path: Path, int8_path: Path, inputs: list[np.ndarray], per_channel: bool,
              keep_float: bool) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        model = onnx.load(str(prepared))
        excluded = float_nodes(model) if keep_float else []
        quantize_static(str(prepared), str(int8_path), _Reader(inputs, model.graph.input[0].name),
                        quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=excluded)


def float_nodes(model) -> list[str]:
    """Names of the nodes before the first Conv (the graph is in topological order) and of Softmax."""
    names, before = [], True
    for node in model.graph.node:
        before = before and node.op_type != "Conv"
        if before or node.op_type == "Softmax":
            names.append(node.name)
    return names


def _set_metadata(path: Path, metadata: dict[str, str]) -> None:
    import onnx

    from . import __version__

    model = onnx.load(str(path))
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, metadata)
    model.producer_name, model.producer_version = "imgtune", __version__
    onnx.save(model, str(path))


def _splits(run: artifact.RunInfo) -> list[str]:
    """val, and test when the run's data has one."""
    from .evaluation import select_images

    found = []
    for name in ("val", "test"):
        try:
            select_images(run, None, name)
        except DataError:
            continue
        found.append(name)
    return found


def compare_split(fp32_path: Path, int8_path: Path, run: artifact.RunInfo, split: str, pre: dict) -> dict:
    """Top-1 accuracy of both files on the split (consumer recipe, fresh sessions), the difference in
    points, their top-1 agreement and the largest |probability difference|."""
    from .evaluation import select_images

    chosen = select_images(run, None, split)
    index = {name: i for i, name in enumerate(run.classes)}
    pixels = [_pixels(ref, pre) for ref in chosen.images]
    usable = [i for i, x in enumerate(pixels) if x is not None]
    if not usable:
        raise DataError(f"none of the {len(pixels)} {split} image(s) could be read to measure the int8 model")
    labels = np.array([index[chosen.labels[i]] for i in usable])
    batch = np.stack([pixels[i] for i in usable])
    fp32, int8 = (run_session(path, batch) for path in (fp32_path, int8_path))
    acc32, acc8 = float(np.mean(fp32.argmax(1) == labels)), float(np.mean(int8.argmax(1) == labels))
    return {"images": len(usable), "unreadable": len(pixels) - len(usable), "fp32_accuracy": acc32,
            "int8_accuracy": acc8, "drop_points": round((acc32 - acc8) * 100, 6),
            "top1_agreement": float(np.mean(fp32.argmax(1) == int8.argmax(1))),
            "max_abs_prob_diff": float(np.max(np.abs(fp32 - int8)))}


def run_session(path: Path, batch: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: batch[i:i + BATCH]})[0] for i in range(0, len(batch), BATCH)])


def int8_text(block: dict) -> str:
    """One line per split for the CLI."""
    q = block["quantization"]
    lines = [f"int8 ({q['format']}, {'per-channel' if q['per_channel'] else 'per-tensor'}, "
             f"calibrated on {q['calibration_images']} training images): {block['file']}"]
    for name, s in block["splits"].items():
        change = (s["int8_accuracy"] - s["fp32_accuracy"]) * 100
        lines.append(f"  {name} ({s['images']} images): top-1 accuracy fp32 {s['fp32_accuracy']:.4f}, int8 "
                     f"{s['int8_accuracy']:.4f} ({change:+.2f} points); top-1 agreement "
                     f"{s['top1_agreement']:.1%}; max |prob difference| {s['max_abs_prob_diff']:.2e}")
    if block["warning"]:
        lines.append(f"  WARNING: {block['warning']}")
    return "\n".join(lines)
