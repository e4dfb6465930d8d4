"""What the endpoints do, apart from HTTP: decode uploads off the event loop (imgtune's guarded decoder,
through the predictor's own ``load_one``), predict through the :class:`~imgtune.serve.batching.Batcher`,
explain with ``imgtune explain``'s default method, and describe the model (``/metadata``, the page).

Probabilities are the predictor's own, so they equal ``imgtune predict``'s (the same ``load_one`` and
``run_batch``); ``calibrated`` turns them into temperature-scaled ones with the run's fitted temperature
(:func:`~imgtune.predictions.rescale_temperature`, as the ONNX Runtime engine does), so one loaded model
answers both.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .. import __version__, artifact
from ..data.decode import DecodeError, load_rgb
from ..data.image_ref import ImageRef
from ..errors import DataError
from ..export_card import CARD_FILE, EXPORT_DIR, metrics_table, run_calibration, run_metrics
from ..predictions import RunPredictor, rescale_temperature, top_predictions
from .batching import Batcher
from .limits import ApiError, Limits, ServerState
from .metrics import ServeMetrics
from .uploads import Upload

log = logging.getLogger(__name__)

DEFAULT_METHOD = "gradcam"  # imgtune explain's default method (explain.DEFAULT_METHODS)
SERVED_METHODS = ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam")  # not scorecam: minutes per image
OVERLAY_MAX_SIDE = 1024


@dataclass(frozen=True)
class ServeOptions:
    """What ``imgtune serve``'s flags set, apart from where to listen."""

    max_batch: int = 32
    max_wait_ms: float = 5.0
    limits: Limits = field(default_factory=Limits)
    api_key: str | None = None
    decode_threads: int = field(default_factory=lambda: os.cpu_count() or 1)


class Service:
    """One loaded model and everything the endpoints share."""

    def __init__(self, predictor: RunPredictor, options: ServeOptions = ServeOptions()):
        if predictor.run is None:
            raise DataError("the server needs a predictor made from a run folder (Predictor.from_run)")
        self.predictor, self.options, self.run = predictor, options, predictor.run
        self.classes = list(predictor.classes)
        self.engine = "onnxruntime" if type(predictor).__name__ == "OrtPredictor" else "torch"
        self.metrics = ServeMetrics(options.max_batch)
        self.state = ServerState()
        self.batcher = Batcher(predictor.run_batch, options.max_batch, options.max_wait_ms, self.metrics.batch)
        self.decoder = ThreadPoolExecutor(max_workers=options.decode_threads, thread_name_prefix="imgtune-decode")
        calibration = run_calibration(self.run.path)
        self.temperature = float(calibration["temperature"]) if calibration else None
        self._explainer = None
        self._warmup: asyncio.Task | None = None
        self._pillow_limit = Image.MAX_IMAGE_PIXELS  # given back at stop()

    async def start(self) -> None:
        """Begin batching and warm the model up in the background (``/readyz`` says when it is done)."""
        self._pillow_limit = Image.MAX_IMAGE_PIXELS
        if Image.MAX_IMAGE_PIXELS and self.options.limits.max_pixels > Image.MAX_IMAGE_PIXELS:
            Image.MAX_IMAGE_PIXELS = self.options.limits.max_pixels  # Pillow would refuse what the user allows
        self.batcher.start()
        self._warmup = asyncio.create_task(self._warm_up())

    async def stop(self) -> None:
        if self._warmup is not None:
            self._warmup.cancel()
        await self.batcher.stop()
        self.decoder.shutdown(wait=False, cancel_futures=True)
        Image.MAX_IMAGE_PIXELS = self._pillow_limit

    async def _warm_up(self) -> None:
        from ..encode import image_png

        side = max(self.run.preprocessing.resize_size * 2, 8)
        grey = image_png(Image.new("RGB", (side, side), (128, 128, 128)))
        try:  # our own image: not held to --decode-timeout (a first decode on a cold machine can exceed it)
            item = await asyncio.wrap_future(self.decoder.submit(self.predictor.load_one,
                                                                 ImageRef.in_memory(grey, "warm-up")))
            await self.batcher.probabilities([item])
        except Exception:
            log.exception("the warm-up prediction failed: /readyz stays 503")
            raise
        self.state.ready = True
        log.info("model warmed up; ready")

    async def _off_loop(self, function, *args):
        """``function(*args)`` on a decoding thread, refused after the decode timeout (a thread cannot be
        stopped; the pixel limit bounds how long one can run)."""
        future = asyncio.wrap_future(self.decoder.submit(function, *args))
        return await asyncio.wait_for(future, self.options.limits.decode_timeout_s)

    def _checked(self, load, ref: ImageRef):
        """``load(ref)`` once the pixel count in the image's header (read without decoding) is within
        ``--max-pixels``; a DecodeError ``too-many-pixels`` otherwise."""
        try:
            with Image.open(io.BytesIO(ref.data)) as img:
                width, height = img.size
        except Exception:  # not an image Pillow knows, or over its own limit: load() says why
            width = height = 0
        limit = self.options.limits.max_pixels
        if width * height > limit:
            raise DecodeError(f"too many pixels: {width}x{height} = {width * height} is over the server's limit of "
                              f"{limit} (--max-pixels); send a smaller image", "too-many-pixels")
        return load(ref)

    async def _load(self, upload: Upload):
        """(what run_batch takes, None) or (None, (kind, message))."""
        if upload.error:
            return None, upload.error
        if not upload.data:
            return None, ("empty", "the file is empty (0 bytes)")
        try:
            ref = ImageRef.in_memory(upload.data, upload.name)
            return await self._off_loop(self._checked, self.predictor.load_one, ref), None
        except DecodeError as exc:
            return None, (exc.kind, str(exc))
        except asyncio.TimeoutError:
            return None, ("decode-timeout", f"decoding took longer than {self.options.limits.decode_timeout_s} s")
        except Exception as exc:  # a hostile file can make Pillow fail in ways it does not document
            log.debug("decoding %s failed", upload.name, exc_info=True)
            return None, ("corrupt", f"the file could not be decoded ({type(exc).__name__})")

    async def predict(self, uploads: list[Upload], top_k: int = 3, calibrated: bool = False) -> list[dict]:
        """One result per upload, in order: its top ``top_k`` labels, or ``error`` {kind, message}."""
        if calibrated and self.temperature is None:
            raise ApiError(400, "no-calibration", f"this run has no {artifact.CALIBRATION}; ask without "
                           "calibrated=true for the model's own probabilities")
        self._require_ready()
        loaded = await asyncio.gather(*(self._load(upload) for upload in uploads))
        good = [i for i, (_, error) in enumerate(loaded) if error is None]
        probs = np.full((len(uploads), len(self.classes)), np.nan)
        if good:
            rows = await self.batcher.probabilities([loaded[i][0] for i in good])
            probs[good] = rescale_temperature(rows, 1.0, self.temperature) if calibrated else rows
        for _, error in loaded:
            self.metrics.images.labels("ok" if error is None else "error").inc()
            if error is not None:
                self.metrics.error(error[0])
        names = [upload.name for upload in uploads]
        messages = [error[1] if error else None for _, error in loaded]
        results = []
        for index, (prediction, (_, error)) in enumerate(zip(
                top_predictions(names, probs, messages, self.classes, top_k), loaded)):
            values = prediction.to_dict()
            values = {"index": index, "name": values.pop("path"), **values}
            if error:
                values["error"] = {"kind": error[0], "message": error[1]}
            results.append(values)
        return results

    def _require_ready(self) -> None:
        if not self.state.ready:
            raise ApiError(503, "not-ready", "the model is still warming up; retry in a second",
                           {"Retry-After": "1"})

    async def explain(self, upload: Upload, class_name: str | None, method: str = DEFAULT_METHOD,
                      max_side: int = OVERLAY_MAX_SIDE) -> tuple[bytes, dict]:
        """The overlay PNG of ``method``'s heat map for ``class_name`` (default: the predicted class), and
        what it shows."""
        if method not in SERVED_METHODS:
            raise ApiError(400, "bad-method", f"method {method!r} is not served; use one of "
                           f"{', '.join(SERVED_METHODS)} (scorecam takes minutes: use `imgtune explain`)")
        if class_name is not None and class_name not in self.classes:
            raise ApiError(400, "unknown-class", f"unknown class {class_name!r}; this model's classes are: "
                           f"{', '.join(self.classes)}")
        self._require_ready()
        image = await self._image(upload)
        explainer = await self.batcher.call(self._explainer_now)
        index = None if class_name is None else self.classes.index(class_name)
        probs, (found,) = await self.batcher.call(explainer.explain, image, (method,), index)
        png = await self._off_loop(_overlay_png, image, found.heatmap, explainer.preprocessing, max_side)
        top = int(np.argmax(probs))
        return png, {"method": method, "predicted": self.classes[top], "predicted_prob": float(probs[top]),
                     "explained": found.class_name, "explained_prob": found.prob}

    async def _image(self, upload: Upload) -> Image.Image:
        if upload.error or not upload.data:
            kind, message = upload.error or ("empty", "the file is empty (0 bytes)")
            raise ApiError(400, kind, message)
        try:
            return await self._off_loop(self._checked, load_rgb, ImageRef.in_memory(upload.data, upload.name))
        except DecodeError as exc:
            raise ApiError(422, exc.kind, f"{upload.name}: {exc}") from exc
        except asyncio.TimeoutError as exc:
            raise ApiError(422, "decode-timeout", f"decoding took longer than "
                           f"{self.options.limits.decode_timeout_s} s") from exc
        except Exception as exc:
            raise ApiError(422, "corrupt", f"the file could not be decoded ({type(exc).__name__})") from exc

    def _explainer_now(self):
        """The explainer, built on first use: the torch predictor's own model, or (ONNX Runtime engine) the
        run's torch model loaded once."""
        from ..explain import Explainer

        if self._explainer is None:
            self._explainer = (Explainer.from_predictor(self.predictor) if self.engine == "torch"
                               else Explainer.from_run(self.run.path, "cpu"))
        return self._explainer

    def metadata(self) -> dict:
        """Classes, preprocessing, metrics with intervals, calibration, what it was trained on, the model
        card (the export's, when the run has one) and the server's limits."""
        card = self.run.path / EXPORT_DIR / CARD_FILE
        metrics, seen = run_metrics(self.run.path), trained_on(self.run.meta)
        return {"imgtune": __version__, "engine": self.engine, "classes": self.classes,
                "model": self.run.meta.get("model", {}), "preprocessing": self.run.meta.get("preprocessing"),
                "strategy": self.run.meta.get("strategy"), "trained_on": seen,
                "metrics": metrics, "calibration": run_calibration(self.run.path),
                "model_card": card.read_text(encoding="utf-8") if card.is_file() else
                run_card(self.run.meta, self.classes, seen, metrics),
                "limits": self.options.limits.to_dict(),
                "batching": {"max_batch": self.options.max_batch, "max_wait_ms": self.options.max_wait_ms}}


def trained_on(meta: dict) -> dict:
    """Images per split and class, from meta.json's data summary (no paths: they are the trainer's)."""
    data = meta.get("data") if isinstance(meta.get("data"), dict) else {}
    counts = data.get("counts") or {}
    return {"layout": data.get("layout"), "counts": counts,
            "images": {split: sum(per_class.values()) for split, per_class in counts.items()}}


def run_card(meta: dict, classes: list[str], seen: dict, metrics: dict) -> str:
    """A short model card (Markdown) for a run without an export (whose card, model_card.md, is fuller)."""
    model = meta.get("model", {}).get("name", "model")
    images = ", ".join(f"{n} {split}" for split, n in seen.get("images", {}).items()) or "unknown"
    return "\n".join([f"# {model}, trained by imgtune", "", f"Classes: {', '.join(f'`{c}`' for c in classes)}.",
                      f"Images: {images}. Strategy: {meta.get('strategy', 'unknown')}.", "",
                      "## Metrics of the run", "", *metrics_table(metrics), ""])


def _overlay_png(image: Image.Image, heat: np.ndarray, preprocessing, max_side: int) -> bytes:
    """The overlay on the image shrunk to ``max_side`` (the crop box scales with it), as PNG."""
    from ..encode import image_png
    from ..explain import overlay

    if max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side), Image.BILINEAR)
    return image_png(overlay(image, heat, preprocessing))
