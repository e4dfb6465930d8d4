"""``imgtune report``: one self-contained HTML page about a trained run (every figure embedded, nothing
fetched when it is opened).

It measures the run as ``imgtune evaluate`` does (:func:`imgtune.evaluation.measure`, so the numbers
agree), with one model, built on the requested device, for both the measuring and the Grad-CAM gallery,
and writes nothing but the HTML file. It shows: configuration and data, training curves, the confusion
matrix (a table of the top confusions above :data:`MATRIX_LIMIT` classes), per-class precision/recall/F1
with bootstrap intervals, ROC and precision-recall curves, the reliability diagram, and the most
confident mistakes with their Grad-CAM overlays; and, when ``imgtune explain --evaluate`` has written
``RUN/explain_eval.json``, its table of which explanation method reflects the model. The page comes
from ``templates/report.html.j2``; figures
from :mod:`imgtune.figures`, encoded by :mod:`imgtune.encode`.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import artifact, figures, runlock
from .encode import data_uri, image_jpeg
from .evaluation import EvaluationResult, evaluation_files, measure

if TYPE_CHECKING:
    from .anonymize import Anonymizer
    from .predict import Predictor

log = logging.getLogger(__name__)

MATRIX_LIMIT = 30  # above this many classes the confusion matrix is replaced by a table of top confusions
GALLERY_SIZE = 12
THUMBNAIL_SIDE = 320
CONFIG_PATHS = ("source", "cache_dir", "extra_labels", "weights", "out")  # config.yaml keys that hold paths


@dataclass
class Mistake:
    path: str
    true: str
    predicted: str
    prob: float  # of the predicted class
    true_prob: float
    image: str | None  # data: URI of the Grad-CAM overlay (None when the image could not be read again)
    note: str = ""


def write_report(run_dir: str | Path, data: str | None = None, split: str | None = None, out: str | Path | None = None,
                 device: str = "auto", gallery: int = GALLERY_SIZE, anonymizer: "Anonymizer | None" = None) -> Path:
    """Measure the run (its own val split by default; see :func:`imgtune.evaluation.select_images`) and
    write the report, the only file written; returns its path (default ``RUN/report.html``,
    ``RUN/report_<split>.html`` for another split or other data). With ``anonymizer``: no path or file
    name on the page (:func:`anonymised`), every image re-encoded without metadata, and a note."""
    into_run = out is None or runlock.inside(out, run_dir)  # then held against other writers (runlock)
    with runlock.hold(run_dir, "report") if into_run else contextlib.nullcontext():
        return _write_report(run_dir, data, split, out, device, gallery, anonymizer)


def _write_report(run_dir: str | Path, data: str | None, split: str | None, out: str | Path | None, device: str,
                  gallery: int, anonymizer: "Anonymizer | None") -> Path:
    from .explain_page import EVAL_HTML, read_table
    from .predict import Predictor

    started = time.perf_counter()
    predictor = Predictor.from_run(run_dir, device)
    result = measure(predictor, data, split)
    run = predictor.run
    path = Path(out) if out else run.path / ("report.html" if data is None and split is None else
                                             f"report_{result.split}.html")
    context = _context(run, result, _mistakes(predictor, result, gallery))
    context["explain_eval"] = read_table(run.path)  # imgtune explain --evaluate's table, when it was run
    context["explain_eval_href"] = Path(os.path.relpath(run.path / EVAL_HTML, path.absolute().parent)).as_posix()
    context["seconds"] = time.perf_counter() - started
    html = render(context) if anonymizer is None else anonymizer.page(render(anonymised(context, anonymizer)))
    artifact.atomic_write_text(path, html)
    log.info("report written to %s (%.0f KB)", path, len(html.encode()) / 1024)
    return path


def render(context: dict) -> str:
    from .doctor.render import environment

    return environment().get_template("report.html.j2").render(**context)


def _context(run: artifact.RunInfo, result: EvaluationResult, mistakes: list[Mistake]) -> dict:
    classes = run.classes
    report = result.report
    matrix = np.array(report["confusion_matrix"])
    curves = figures.roc_pr(result.y_true, result.probs, classes)
    cal = report["calibration"]
    return {
        "title": f"imgtune report: {run.path.name}",
        "run": run, "meta": run.meta, "classes": classes, "result": result, "report": report,
        "evaluated_on": f"{result.split} split of {result.source}" if result.split != "all" else result.source,
        "settings": _settings(run.meta),
        "config_text": (run.path / artifact.CONFIG).read_text(),
        "data": run.meta["data"], "other_data": not result.own_data,
        "curves_png": data_uri(figures.training_curves(_metrics_rows(run.path))),
        "matrix_limit": MATRIX_LIMIT, "matrix_csv": evaluation_files(result)["csv"].name,
        "confusion_png": data_uri(figures.confusion_png(matrix, classes, f"Confusion matrix ({result.split})"))
        if len(classes) <= MATRIX_LIMIT else None,
        "top_confusions": figures.top_confusions(matrix, classes, limit=30),
        "roc": curves, "roc_png": data_uri(curves["png"]),
        "reliability_png": data_uri(figures.reliability_png(cal["reliability"], cal["ece"],
                                                            f"Reliability ({result.split})",
                                                            cal.get("reliability_calibrated"), cal["temperature"])),
        "calibration": cal, "held_out_calibration": _saved_metrics(run.path).get("calibration"),
        "semi": _saved_metrics(run.path).get("semi"),
        "mistakes": mistakes, "n_mistakes": int((result.probs.argmax(1) != result.y_true).sum()),
        "skipped": result.skipped, "ranking_html": _ranking(run),
    }


def anonymised(context: dict, anonymizer: "Anonymizer") -> dict:
    """The report's context with every path and file name replaced by its token: the run, the data, each
    image measured or skipped, the config's paths, the mistakes, the explanation table and the ranking."""
    from .explain_page import anonymised_summary

    run, result = context["run"], context["result"]
    for folder in (run.path, result.source, run.config.data.source):
        anonymizer.folder(folder)
    anonymizer.remember([*(m.path for m in context["mistakes"]), *(p for p, _ in result.skipped),
                         *(s["path"] for s in context["data"].get("skipped", []))])  # what the page names
    if (run.meta.get("weights") or {}).get("path"):
        anonymizer.token(run.meta["weights"]["path"])
    source = anonymizer.token(result.source)
    explain_eval = context["explain_eval"]
    matrix_csv = context["matrix_csv"] if result.own_data else "confusion_matrix_<split>_<data>.csv"
    return {**context, **anonymizer.clean({key: context[key] for key in ("settings", "data", "skipped")}),
            "title": f"imgtune report: {anonymizer.token(run.path)}", "result": replace(result, source=source),
            "evaluated_on": f"{result.split} split of {source}" if result.split != "all" else source,
            "config_text": _config_text(context["config_text"], anonymizer),
            "matrix_csv": matrix_csv,
            "mistakes": [replace(m, path=anonymizer.token(m.path), note=anonymizer.scrub(m.note))
                         for m in context["mistakes"]],
            "explain_eval": explain_eval and anonymised_summary(explain_eval, anonymizer),
            "explain_eval_href": None if "/" in context["explain_eval_href"] else context["explain_eval_href"],
            "ranking_html": _ranking(run, anonymizer)}


def _config_text(text: str, anonymizer: "Anonymizer") -> str:
    """config.yaml with the value of every path key (:data:`CONFIG_PATHS`) a token, the rest scrubbed."""
    import yaml

    values = yaml.safe_load(text) or {}
    for section in (values, *(v for v in values.values() if isinstance(v, dict))):
        for key in CONFIG_PATHS:
            if isinstance(section.get(key), str) and section[key]:
                section[key] = anonymizer.token(section[key])
    return yaml.safe_dump(anonymizer.clean(values), sort_keys=False)


def _ranking(run: artifact.RunInfo, anonymizer: "Anonymizer | None" = None):
    """A ``--model auto`` run's ranking (its rank.json) as the ranking page's section, the choice marked."""
    chosen = run.meta["model"].get("chosen_by")
    path = run.path / artifact.RANK
    if not chosen or not path.is_file():
        return None
    from . import rank_files

    model, ranking = run.meta["model"], rank_files.read(path)
    if anonymizer is not None:
        ranking = replace(ranking, data=anonymizer.clean({**ranking.data,
                                                          "source": anonymizer.token(ranking.data["source"])}))
    return rank_files.section(ranking, chosen=f"{model['library']}:{model['name']}")


def _settings(meta: dict) -> list[tuple[str, str]]:
    config, model = meta["config"], meta["model"]
    train = config.get("train", {})
    weights = meta.get("weights")
    rows = [("model", f"{model['name']} ({model['library']}; asked for {model['requested']}), "
                      f"body {model['body']}, head {model['head']}"),
            *([("chosen by --model auto", model["chosen_by"]["reason"])] if model.get("chosen_by") else []),
            ("weights", f"{weights.get('tag') or weights.get('path')} from {weights.get('source')}" if weights
             else "none (random initialisation)"),
            ("strategy", str(meta.get("strategy"))),
            ("input", "{img_size} px centre crop of the image resized to {resize_size} px".format(**meta["preprocessing"]))]
    rows += [(key, str(train[key])) for key in ("epochs", "freeze_epochs", "lr", "backbone_lr_factor", "optimizer",
                                                "balance", "seed") if key in train]
    versions = meta.get("versions", {})
    rows.append(("versions", ", ".join(f"{k} {v}" for k, v in versions.items())))
    return rows


def _metrics_rows(run_dir: Path) -> list[dict]:
    path = run_dir / artifact.METRICS_CSV
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _saved_metrics(run_dir: Path) -> dict:
    """metrics.json as training wrote it (held-out calibration; the semi-supervised report)."""
    path = run_dir / artifact.METRICS_JSON
    return json.loads(path.read_text()) if path.is_file() else {}


def _mistakes(predictor: "Predictor", result: EvaluationResult, limit: int) -> list[Mistake]:
    """The ``limit`` most confident wrong predictions, each with a Grad-CAM overlay of the predicted class
    (what the model took for evidence), from the predictor's own (unfused) model on its device."""
    predicted = result.probs.argmax(axis=1)
    wrong = np.flatnonzero(predicted != result.y_true)
    wrong = wrong[np.argsort(-result.probs[wrong, predicted[wrong]], kind="stable")][:limit]
    if not len(wrong):
        return []
    from .data.decode import DecodeError, load_rgb
    from .explain import Explainer, explain_tensor, model_input, overlay

    explainer = Explainer.from_predictor(predictor)
    classes, found = result.classes, []
    for i in wrong:
        mistake = Mistake(str(result.images[i]), classes[result.y_true[i]], classes[predicted[i]],
                          float(result.probs[i, predicted[i]]), float(result.probs[i, result.y_true[i]]), None)
        try:
            image = load_rgb(result.images[i])
        except DecodeError as exc:
            mistake.note = f"could not be read again: {exc}"
            found.append(mistake)
            continue
        heat, _ = explain_tensor(explainer.model, explainer.preprocessing, model_input(image, explainer.preprocessing),
                                 int(predicted[i]), "gradcam", explainer.layer)
        picture = overlay(image, heat, explainer.preprocessing)
        picture.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        mistake.image = data_uri(image_jpeg(picture, quality=85), "image/jpeg")
        found.append(mistake)
    return found
