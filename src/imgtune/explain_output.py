"""The files of ``imgtune explain RUN IMAGE...``: one overlay PNG per image and method, and per image the
predicted and explained class, each method's seconds and, for ``--format json``, its heatmap pooled to a
grid of the model's view (with the view's box in the original pixels, :func:`imgtune.explain.crop_box`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .explain import DEFAULT_METHODS, Explainer, check_methods, crop_box, overlay, pool

if TYPE_CHECKING:
    from .anonymize import Anonymizer


def pooled_grid(heat: np.ndarray, cells: int) -> list[list[float]]:
    """The attribution grid of ``--format json``: :func:`pool` rounded to 4 digits."""
    return np.round(pool(heat, cells), 4).tolist()


@dataclass
class ExplainedFile:
    path: str
    predicted: str | None = None
    predicted_prob: float | None = None
    explained: str | None = None  # the class the heatmaps are for
    explained_prob: float | None = None
    files: dict[str, Path] | None = None  # method -> overlay PNG
    seconds: dict[str, float] | None = None  # method -> seconds on this image
    crop: list[float] | None = None  # the model's view in the original pixels: left, top, right, bottom
    grids: dict[str, list[list[float]]] | None = None  # method -> pooled heatmap on the model's view
    error: str | None = None

    def to_dict(self) -> dict:
        values = {k: v for k, v in vars(self).items() if v is not None}
        if self.files:
            values["files"] = {m: str(p) for m, p in self.files.items()}
        return values


def explain_files(explainer: Explainer, paths: list[Path], out: Path, methods: tuple[str, ...] = DEFAULT_METHODS,
                  class_name: str | None = None, grid: int | None = None,
                  anonymizer: "Anonymizer | None" = None) -> list[ExplainedFile]:
    """One overlay PNG per image and method in ``out`` (``<image stem>.<method>.png``; a number is added
    when two images share a stem), with each method's seconds and, when ``grid`` is given, its heatmap
    pooled to ``grid`` x ``grid`` cells. An image that cannot be read gets an error and the others go on.
    With ``anonymizer``: the image's token instead of its path and stem, and every PNG re-encoded from
    its pixels (no metadata)."""
    from . import artifact
    from .data.decode import DecodeError, load_rgb
    from .encode import image_png

    check_methods(methods)
    index = explainer.class_index(class_name) if class_name is not None else None
    out.mkdir(parents=True, exist_ok=True)
    stems: set[str] = set()
    results = []
    for path in paths:
        shown = anonymizer.token(path) if anonymizer else str(path)
        try:
            image = load_rgb(path)
        except DecodeError as exc:
            error = anonymizer.scrub_path(str(exc), path) if anonymizer else str(exc)
            results.append(ExplainedFile(shown, error=error))
            continue
        probs, found = explainer.explain(image, methods, index)
        stem = _unique_stem(shown if anonymizer else Path(path).stem, stems)
        files = {}
        for item in found:
            files[item.method] = out / f"{stem}.{item.method}.png"
            png = image_png(overlay(image, item.heatmap, explainer.preprocessing))
            artifact.atomic_write_bytes(files[item.method], anonymizer.image_bytes(png) if anonymizer else png)
        top = int(np.argmax(probs))
        results.append(ExplainedFile(
            shown, explainer.classes[top], float(probs[top]), found[0].class_name, found[0].prob, files,
            {e.method: round(e.seconds, 3) for e in found},
            [round(v, 2) for v in crop_box(image.size, explainer.preprocessing)] if grid is not None else None,
            {e.method: pooled_grid(e.heatmap, grid) for e in found} if grid is not None else None))
    return results


def _unique_stem(stem: str, taken: set[str]) -> str:
    candidate, number = stem, 1
    while candidate in taken:
        number += 1
        candidate = f"{stem}-{number}"
    taken.add(candidate)
    return candidate
