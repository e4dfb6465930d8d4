"""The doctor's outputs: doctor.json (everything, machine-readable), doctor.html (a page; its
``<section>`` is reused by the report) and the terminal summary."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup

from .. import finite
from ..artifact import atomic_write_text
from ..data.decode import DecodeError, load_rgb
from ..encode import data_uri, image_jpeg
from . import Diagnosis

if TYPE_CHECKING:
    from ..anonymize import Anonymizer

CHECKS = ("unreadable", "split", "leakage", "label-conflict", "label-error", "outlier", "imbalance", "duplicate")
TITLES = {"unreadable": "Files that cannot be used", "split": "Splitting", "leakage": "Leakage across splits",
          "label-conflict": "The same image under two classes", "label-error": "Likely label errors",
          "outlier": "Odd files", "imbalance": "Class imbalance", "duplicate": "Duplicates within a class"}
SHOWN = 50  # findings per check in the HTML; doctor.json has all


def environment() -> Environment:
    return Environment(loader=PackageLoader("imgtune", "templates"), autoescape=select_autoescape(["html", "j2"]))


def write_json(diagnosis: Diagnosis, path: Path) -> None:
    atomic_write_text(path, finite.dumps(diagnosis.to_dict(), indent=2, default=str) + "\n")


def html_section(diagnosis: Diagnosis, thumbs: dict[str, str] | None = None) -> Markup:
    """The findings as one self-contained ``<section>`` (thumbnails embedded as data URIs; ``thumbs``:
    those of :func:`thumbnails` already made, by the paths the findings name)."""
    groups = _groups(diagnosis)
    thumbs = thumbnails(diagnosis) if thumbs is None else thumbs
    template = environment().get_template("doctor_section.html.j2")
    return Markup(template.render(d=diagnosis, checks=CHECKS, counts=diagnosis.summary(), groups=groups,
                                  titles=TITLES, thumbs=thumbs, limit=SHOWN))


def _groups(diagnosis: Diagnosis) -> dict[str, list]:
    groups = {check: diagnosis.by_check(check) for check in CHECKS}
    if groups["label-error"]:
        groups["label-error"] = sorted(groups["label-error"], key=lambda f: f.details.get("rank", 0))
    return groups


def thumbnails(diagnosis: Diagnosis) -> dict[str, str]:
    """A thumbnail (data: URI) of each readable file the shown findings name, by its path."""
    shown = [f for found in _groups(diagnosis).values() for f in found[:SHOWN] if f.check != "unreadable"]
    thumbs = {p: thumbnail(p) for f in shown for p in f.paths}
    return {p: t for p, t in thumbs.items() if t}


def write_html(diagnosis: Diagnosis, path: Path, anonymizer: "Anonymizer | None" = None) -> None:
    """``doctor.html``; with ``anonymizer`` the page of :func:`anonymised` (the thumbnails made from the
    real files first, then keyed by token) finished by :meth:`~imgtune.anonymize.Anonymizer.page`."""
    thumbs = thumbnails(diagnosis)
    if anonymizer is not None:
        diagnosis = anonymised(diagnosis, anonymizer)
        thumbs = {anonymizer.token(p): t for p, t in thumbs.items()}
    page = environment().get_template("page.html.j2").render(title=f"imgtune doctor: {diagnosis.source}",
                                                             body=html_section(diagnosis, thumbs))
    atomic_write_text(path, anonymizer.page(page) if anonymizer is not None else page)


def anonymised(diagnosis: Diagnosis, anonymizer: "Anonymizer") -> Diagnosis:
    """A copy with the data folder and every file a finding names replaced by tokens, in its paths,
    its message and its details (doctor.json, doctor.html and the terminal all show this copy)."""
    anonymizer.folder(diagnosis.source)
    anonymizer.remember(p for f in diagnosis.findings for p in f.paths)
    findings = [replace(f, message=anonymizer.scrub(f.message), paths=[anonymizer.token(p) for p in f.paths],
                        details=anonymizer.clean(f.details)) for f in diagnosis.findings]
    return replace(diagnosis, source=anonymizer.token(diagnosis.source), findings=findings,
                   label_errors=anonymizer.clean(diagnosis.label_errors))


def thumbnail(path: str, size: int = 96) -> str | None:
    try:
        image = load_rgb(path, draft_size=size)
    except DecodeError:
        return None
    image.thumbnail((size * 2, size))
    return data_uri(image_jpeg(image, quality=80), "image/jpeg")
