"""The files of ``imgtune explain RUN --evaluate``: ``explain_eval.json`` (every number, strict JSON) and
``explain_eval.html`` (the table, the curves and every method's overlay side by side for a few images,
self-contained like ``imgtune report``), both written atomically; and the table read back for the report."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from . import figures, finite
from .atomic import atomic_write_text
from .encode import data_uri, image_jpeg
from .explain import Explainer, overlay
from .explain_eval import EvalResult

if TYPE_CHECKING:
    from .anonymize import Anonymizer

log = logging.getLogger(__name__)

EVAL_JSON = "explain_eval.json"
EVAL_HTML = "explain_eval.html"
THUMBNAIL_SIDE = 320


def write_evaluation(result: EvalResult, explainer: Explainer, out: Path,
                     anonymizer: "Anonymizer | None" = None) -> dict[str, Path]:
    """``explain_eval.json`` and ``explain_eval.html`` in ``out``; returns their paths. With
    ``anonymizer`` both hold tokens for paths (:func:`anonymised_summary`) and the page's images are
    re-encoded without metadata."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / EVAL_JSON, "html": out / EVAL_HTML}
    html = render(result, explainer, anonymizer)  # before anything is written: a failure leaves the old files whole
    summary = result.summary if anonymizer is None else anonymised_summary(result.summary, anonymizer)
    atomic_write_text(paths["json"], finite.dumps(summary, indent=2) + "\n")
    atomic_write_text(paths["html"], html)
    log.info("explanation evaluation written to %s", out)
    return paths


def anonymised_summary(summary: dict, anonymizer: "Anonymizer") -> dict:
    """explain_eval.json's content with the run, the data and every image (measured or skipped) a token."""
    for key in ("run", "source"):
        if summary.get(key):
            anonymizer.folder(summary[key])
    anonymizer.remember([*summary.get("images", []), *(s[0] for s in summary.get("skipped", []))])
    tokens = {key: anonymizer.token(summary[key]) for key in ("run", "source") if summary.get(key)}
    return anonymizer.clean({**summary, **tokens, "images": [anonymizer.token(p) for p in summary.get("images", [])]})


def render(result: EvalResult, explainer: Explainer, anonymizer: "Anonymizer | None" = None) -> str:
    from .doctor.render import environment

    summary = finite.json_ready(result.summary)
    gallery = _gallery(result, explainer)
    if anonymizer is not None:
        summary = anonymised_summary(summary, anonymizer)
        gallery = [{**row, "path": anonymizer.token(row["path"])} for row in gallery]
    page = environment().get_template("explain_eval.html.j2").render(
        title=f"imgtune explain --evaluate: {Path(summary['run']).name}", ev=summary,
        curves_png=data_uri(figures.explanation_curves_png(summary["methods"])), gallery=gallery)
    return page if anonymizer is None else anonymizer.page(page)


def _gallery(result: EvalResult, explainer: Explainer) -> list[dict]:
    """Per gallery image: its path, explained class and each method's overlay as a data: URI."""
    rows = []
    for i, item in enumerate(result.loaded):
        overlays = {}
        for method, record in result.records.items():
            if i < len(record.heatmaps):
                picture = overlay(item.image, record.heatmaps[i], explainer.preprocessing)
                picture.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
                overlays[method] = data_uri(image_jpeg(picture, quality=85), "image/jpeg")
        if not overlays:
            break
        rows.append({"path": item.path, "explained": explainer.classes[item.class_index], "prob": item.prob,
                     "overlays": overlays})
    return rows


def read_table(run_dir: str | Path) -> dict | None:
    """The run's ``explain_eval.json`` for the report, or None when there is none (or it cannot be read)."""
    path = Path(run_dir) / EVAL_JSON
    if not path.is_file():
        return None
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return None
    return found if isinstance(found, dict) and isinstance(found.get("methods"), dict) else None
