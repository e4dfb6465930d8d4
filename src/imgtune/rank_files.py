"""The files of a ranking: ``rank.json`` (every figure), ``rank.csv`` (one row per candidate),
``rank_pareto.png`` (accuracy against latency) and ``rank.html`` (the ranking as a page, whose
``<section>`` the report of a ``--model auto`` run reuses). Each is written atomically."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from markupsafe import Markup

from . import artifact, figures
from .artifact import atomic_write_bytes, atomic_write_text, write_json
from .encode import data_uri
from .errors import DataError
from .rank import Ranking

RANK_JSON, RANK_CSV, RANK_PNG, RANK_HTML = artifact.RANK, "rank.csv", "rank_pareto.png", "rank.html"
CSV_COLUMNS = ("rank", "model", "accuracy", "accuracy_low", "accuracy_high", "macro_f1", "macro_f1_low",
               "macro_f1_high", "val_accuracy", "score", "params", "flops", "latency_ms_b1", "images_per_s_b32",
               "img_size", "weights", "skipped_reason")


def write_all(ranking: Ranking, out: Path) -> dict[str, Path]:
    """rank.json, rank.csv, rank_pareto.png and rank.html in ``out`` (created if needed)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in (RANK_JSON, RANK_CSV, RANK_PNG, RANK_HTML)}
    write_json(paths[RANK_JSON], ranking.to_dict())
    atomic_write_text(paths[RANK_CSV], to_csv(ranking))
    png = pareto(ranking)
    if png is not None:
        atomic_write_bytes(paths[RANK_PNG], png)
    else:
        paths.pop(RANK_PNG)
    atomic_write_text(paths[RANK_HTML], page(ranking, png))
    return paths


def read(path: Path) -> Ranking:
    """A ranking written by :func:`write_all` (or by ``--model auto`` into a run folder)."""
    try:
        return Ranking.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise DataError(f"cannot read the ranking {path}: {exc}") from exc


def to_csv(ranking: Ranking) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    for place, r in enumerate(ranking.ranked, 1):
        writer.writerow([place, r.model, r.accuracy, *r.accuracy_ci95, r.macro_f1, *r.macro_f1_ci95,
                         "" if r.val_accuracy is None else r.val_accuracy, r.score, r.params,
                         "" if r.flops is None else r.flops, r.latency_ms_b1, r.images_per_s_b32, r.img_size,
                         r.weights, ""])
    for s in ranking.skipped:
        latency = "" if s.latency_ms_b1 is None else s.latency_ms_b1
        writer.writerow(["", s.model, *[""] * 10, latency, "", "", "", s.reason])
    return buffer.getvalue()


def pareto(ranking: Ranking) -> bytes | None:
    ranked = ranking.ranked
    if not ranked:
        return None
    return figures.pareto_png([r.model for r in ranked], [r.latency_ms_b1 for r in ranked],
                              [r.accuracy for r in ranked], [r.accuracy_ci95 for r in ranked],
                              f"{len(ranked)} candidates on {Path(ranking.data['source']).name}")


def section(ranking: Ranking, png: bytes | None = None, chosen: str | None = None) -> Markup:
    """The ranking as one self-contained ``<section>`` (the figure as a data: URI)."""
    from .doctor.render import environment

    png = png if png is not None else pareto(ranking)
    front = {ranking.ranked[i].model for i in figures.pareto_front(
        [(r.latency_ms_b1, r.accuracy) for r in ranking.ranked])}
    template = environment().get_template("rank_section.html.j2")
    return Markup(template.render(r=ranking, png=data_uri(png), front=front, chosen=chosen))


def page(ranking: Ranking, png: bytes | None = None) -> str:
    from .doctor.render import environment

    title = f"imgtune rank: {ranking.data['source']}"
    return environment().get_template("page.html.j2").render(title=title, body=section(ranking, png))
