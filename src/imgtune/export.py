"""``imgtune export``: a run's model as an ONNX file that carries its own preprocessing, checked against
``imgtune predict`` before it is called done.

The contract (docs/export.md): the input ``images`` is a batch of uint8 RGB images, ``N x H x W x 3``,
already decoded, resized and centre-cropped by :func:`consumer_preprocess` (numpy + Pillow only, the
code printed in the model card); scaling to [0, 1], normalisation, the model, the temperature (with
``calibrated``) and softmax are inside the graph; the first output ``probabilities`` is ``N x classes``.
The file's ``metadata_props`` hold ``classes``, ``preprocessing``, ``temperature``, ``imgtune_version``
and ``weights_sha256``, each a JSON value as a string (``imgtune_version``: the bare version).

Every export is checked: the ONNX file in a fresh ``onnxruntime.InferenceSession``, fed by the consumer
recipe, against the torch :class:`~imgtune.predict.Predictor` on the run's val images (or given ones)
plus two synthetic phone-size JPEGs with an EXIF rotation. The export is written to a hidden temporary
folder and renamed at the end: a failed check leaves ``<out>.failed``, anything else leaves nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__, artifact, runlock
from .cache import file_sha256
from .export_card import (CARD_FILE, EXPORT_DIR, INPUT_NAME, INT8_FILE, LARGE_PHOTO_SIZE, MODEL_FILE, OUTPUT_NAME,
                          REPORT_FILE, build_report, model_card)
from .atomic import _UMASK
from .consumer_recipe import preprocess as consumer_preprocess
from .data.decode import DecodeError, load_rgb
from .data.image_ref import ImageRef
from .errors import DataError, ModelError, UsageError
from .onnx_trace import trace_to_onnx

log = logging.getLogger(__name__)

FORMATS = ("onnx",)
DEFAULT_OPSET = 18
OPSETS = range(9, 21)  # what the TorchScript-based exporter of torch 2.x writes
PROB_TOLERANCE = 1e-4  # the largest |probability difference| a passing export may have
METADATA_KEYS = ("classes", "preprocessing", "temperature", "imgtune_version", "weights_sha256")
INSTALL_HINT = "pip install 'imgtune[export]'"

__all__ = ["consumer_preprocess", "export_run", "ExportResult", "require_runtime"]


@dataclass
class ExportResult:
    path: Path  # the export folder
    report: dict  # what export.json holds


def require_runtime():
    """``(onnx, onnxruntime)``, or a UsageError saying how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise UsageError(f"exporting needs onnx and onnxruntime ({exc.name or exc} is not installed): "
                         f"{INSTALL_HINT}") from exc
    return onnx, onnxruntime


class WithPreprocessing(nn.Module):
    """uint8 ``N x H x W x 3`` -> probabilities: what eval_transform's ToDtype and Normalize do, the
    model, the temperature (when given) and softmax."""

    def __init__(self, model: nn.Module, mean, std, temperature: float | None):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.temperature = temperature

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).to(torch.float32) / 255.0
        logits = self.model((x - self.mean) / self.std)
        if self.temperature is not None:
            logits = logits / self.temperature
        return torch.softmax(logits, dim=1)


def export_run(run_dir: str | Path, out: str | Path | None = None, fmt: str = "onnx", opset: int = DEFAULT_OPSET,
               check_images: str | Path | None = None, calibrated: bool = False, int8: bool = False) -> ExportResult:
    """Export the run in ``run_dir`` to ``out`` (default ``RUN/export``) and check it; raises ModelError
    (leaving ``<out>.failed``) when the check fails. ``int8`` adds ``model.int8.onnx`` and its accuracy
    change (:mod:`imgtune.export_int8`)."""
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    if opset not in OPSETS:
        raise UsageError(f"--opset must be between {OPSETS[0]} and {OPSETS[-1]}; got {opset}")
    require_runtime()
    run = artifact.read_run(run_dir)
    final = Path(out) if out else run.path / EXPORT_DIR
    _check_target(final)
    holding = runlock.hold(run.path, "export") if runlock.inside(final, run.path) else contextlib.nullcontext()
    with holding:  # writing into the run folder: one writer at a time
        return _export(run, final, opset, check_images, calibrated, int8)


def _export(run: artifact.RunInfo, final: Path, opset: int, check_images, calibrated: bool,
            int8: bool) -> ExportResult:
    from .predict import Predictor

    predictor = Predictor.from_run(run.path, "cpu", calibrated=calibrated)
    images, source = _parity_images(run, check_images)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    tmp.chmod(0o777 & ~_UMASK)  # mkdtemp's folder is private; the export folder is an ordinary one
    try:
        metadata = onnx_metadata(run, predictor)
        write_onnx(predictor, tmp / MODEL_FILE, opset, metadata, str(run.config.model.name))
        with tempfile.TemporaryDirectory() as scratch:
            large = write_large_photos(images[:2], Path(scratch))
            parity = check_parity(tmp / MODEL_FILE, predictor, images + large)
        parity.update(source=source, synthetic_large_photos=len(large))
        report = build_report(run, predictor, metadata, opset, parity)
        if int8 and parity["passed"]:
            from .export_int8 import quantize_export

            report["int8"] = quantize_export(run, tmp / MODEL_FILE, tmp / INT8_FILE, metadata)
        artifact.write_json(tmp / REPORT_FILE, report)
        artifact.atomic_write_text(tmp / CARD_FILE, model_card(report))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    failed = final.with_name(final.name + ".failed")
    if not parity["passed"]:
        _replace_folder(tmp, failed)
        raise ModelError(f"the exported model disagrees with imgtune predict: {parity_text(parity)}; "
                         f"the export is kept for inspection in {failed}, not in {final}")
    _replace_folder(tmp, final)
    shutil.rmtree(failed, ignore_errors=True)  # an older failure is superseded
    return ExportResult(final, report)


def _check_target(final: Path) -> None:
    if final.exists() and not final.is_dir():
        raise UsageError(f"--out {final} is a file, not a folder")
    if final.is_dir() and any(final.iterdir()) and not (final / REPORT_FILE).is_file():
        raise UsageError(f"--out {final} exists and is not an imgtune export folder; choose another folder")


def _replace_folder(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; a previous ``target`` is moved aside first and removed after.
    If the renames fail (another export got there first), ``new`` is removed."""
    old = None
    try:
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
            os.replace(target, old / target.name)
        os.replace(new, target)
    except OSError:
        shutil.rmtree(new, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def preprocessing_contract(predictor) -> dict:
    """The ``preprocessing`` metadata: what :func:`consumer_preprocess` reads, and what the graph expects."""
    pre = predictor.preprocessing
    return {"input_size": pre.img_size, "resize_size": pre.resize_size, "interpolation": pre.interpolation,
            "mean": list(pre.mean), "std": list(pre.std), "input_dtype": "uint8", "input_layout": "NHWC",
            "channels": "RGB", "normalised_in_graph": True, "softmax_in_graph": True,
            "exif_orientation": True, "alpha_background": [255, 255, 255],
            "jpeg_draft": "JPEGs whose shorter side is over 2 x resize_size are decoded at reduced size "
                          "(Pillow draft) to at least resize_size, as imgtune does"}


def onnx_metadata(run: artifact.RunInfo, predictor) -> dict[str, str]:
    """``metadata_props``: every value a JSON text except imgtune_version and weights_sha256."""
    return {"classes": json.dumps(run.classes), "preprocessing": json.dumps(preprocessing_contract(predictor)),
            "temperature": json.dumps(predictor.temperature), "imgtune_version": __version__,
            "weights_sha256": file_sha256(run.path / artifact.WEIGHTS)}


def write_onnx(predictor, path: Path, opset: int, metadata: dict[str, str], model_name: str) -> None:
    import onnx

    pre = predictor.preprocessing
    wrapped = WithPreprocessing(predictor.model, pre.mean, pre.std, predictor.temperature).eval()
    example = torch.zeros(2, pre.img_size, pre.img_size, 3, dtype=torch.uint8)
    trace_to_onnx(wrapped, example, path, opset, INPUT_NAME, OUTPUT_NAME, model_name)
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, metadata)
    model.producer_name, model.producer_version = "imgtune", __version__
    model.doc_string = (f"{model_name} trained with imgtune; input uint8 NHWC RGB, already resized and "
                        "centre-cropped (metadata_props['preprocessing']); output class probabilities")
    onnx.save(model, str(path))


def _parity_images(run: artifact.RunInfo, check_images: str | Path | None) -> tuple[list[ImageRef], str]:
    from .evaluation import select_images
    from .predict import expand_paths

    if check_images is not None:
        if not Path(check_images).is_dir():
            raise DataError(f"--check-images {check_images} is not a folder")
        return [ImageRef.file(p) for p in expand_paths([check_images])], str(check_images)
    try:
        chosen = select_images(run, None, "val")
    except DataError as exc:
        raise DataError(f"{exc}; the export check needs images: pass --check-images DIR") from exc
    return chosen.images, f"val split of {run.config.data.source}"


def write_large_photos(images: list[ImageRef], folder: Path) -> list[ImageRef]:
    """Phone-size JPEGs (3024 x 4032, EXIF orientation 6 or 8) made from ``images``: they take the
    reduced-size decoding and the EXIF rotation that small files never reach."""
    from PIL import Image

    made = []
    for i, ref in enumerate(images):
        try:
            photo = load_rgb(ref).resize(LARGE_PHOTO_SIZE, Image.Resampling.BICUBIC)
        except DecodeError:
            continue
        exif = Image.Exif()
        exif[0x0112] = 6 if i % 2 == 0 else 8  # Orientation: rotate 90 degrees one way or the other
        path = folder / f"large_photo_{i}.jpg"
        photo.save(path, quality=90, exif=exif)
        made.append(ImageRef.file(path))
    return made


def check_parity(model_path: Path, predictor, images: list[ImageRef], batch_size: int = 32) -> dict:
    """The ONNX file in a fresh InferenceSession fed by :func:`consumer_preprocess`, against
    ``predictor.probabilities``; also how many consumer inputs equal imgtune's own uint8 pixels."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    pre = json.loads(session.get_modelmeta().custom_metadata_map["preprocessing"])
    reference, errors = predictor.probabilities(images, batch_size)
    usable = [i for i, error in enumerate(errors) if error is None]
    if not usable:
        raise DataError(f"none of the {len(images)} check image(s) could be read; pass --check-images DIR")
    exported = np.zeros((len(usable), reference.shape[1]), dtype=np.float64)
    identical = 0
    for start in range(0, len(usable), batch_size):
        chunk = usable[start:start + batch_size]
        pixels = [_consumer_pixels(images[i], pre) for i in chunk]
        identical += sum(np.array_equal(p, _imgtune_pixels(images[i], predictor)) for p, i in zip(pixels, chunk))
        exported[start:start + len(chunk)] = session.run(None, {INPUT_NAME: np.stack(pixels)})[0]
    ours = reference[usable]
    agreement = float(np.mean(ours.argmax(1) == exported.argmax(1)))
    max_diff = float(np.max(np.abs(ours - exported)))
    return {"images": len(usable), "unreadable": len(images) - len(usable), "top1_agreement": agreement,
            "max_abs_prob_diff": max_diff, "tolerance": PROB_TOLERANCE, "input_pixels_identical": identical,
            "passed": agreement == 1.0 and max_diff <= PROB_TOLERANCE}


def _consumer_pixels(ref: ImageRef, pre: dict) -> np.ndarray:
    with ref.open() as handle:
        return consumer_preprocess(handle, pre)


def _imgtune_pixels(ref: ImageRef, predictor) -> np.ndarray:
    """imgtune's own uint8 input: load_rgb as predict calls it, then eval_transform's resize and crop."""
    resize, crop = predictor.transform.transforms[:2]
    return np.asarray(crop(resize(load_rgb(ref, predictor.preprocessing.resize_size))))


def parity_text(parity: dict) -> str:
    return (f"{parity['images']} image(s) ({parity['source']}; {parity['synthetic_large_photos']} of them synthetic "
            f"{LARGE_PHOTO_SIZE[0]}x{LARGE_PHOTO_SIZE[1]} EXIF-rotated JPEGs): top-1 agreement "
            f"{parity['top1_agreement']:.1%}, max |prob difference| {parity['max_abs_prob_diff']:.2e} "
            f"(limit {parity['tolerance']:.0e}), input pixels identical in {parity['input_pixels_identical']}")
