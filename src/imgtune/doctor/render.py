"""The doctor's outputs: doctor.json (everything, machine-readable), doctor.html (a page; its
``<section>`` is reused by the report) and the terminal summary."""

from __future__ import annotations

from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup

from .. import finite
from ..artifact import atomic_write_text
from ..data.decode import DecodeError, load_rgb
from ..encode import data_uri, image_jpeg
from . import Diagnosis

CHECKS = ("unreadable", "split", "leakage", "label-conflict", "label-error", "outlier", "imbalance", "duplicate")
TITLES = {"unreadable": "Files that cannot be used", "split": "Splitting", "leakage": "Leakage across splits",
          "label-conflict": "The same image under two classes", "label-error": "Likely label errors",
          "outlier": "Odd files", "imbalance": "Class imbalance", "duplicate": "Duplicates within a class"}
SHOWN = 50  # findings per check in the HTML; doctor.json has all


def environment() -> Environment:
    return Environment(loader=PackageLoader("imgtune", "templates"), autoescape=select_autoescape(["html", "j2"]))


def write_json(diagnosis: Diagnosis, path: Path) -> None:
    atomic_write_text(path, finite.dumps(diagnosis.to_dict(), indent=2, default=str) + "\n")


def html_section(diagnosis: Diagnosis) -> Markup:
    """The findings as one self-contained ``<section>`` (thumbnails embedded as data URIs)."""
    groups = {check: diagnosis.by_check(check) for check in CHECKS}
    if groups["label-error"]:
        groups["label-error"] = sorted(groups["label-error"], key=lambda f: f.details.get("rank", 0))
    shown = [f for found in groups.values() for f in found[:SHOWN]]
    thumbs = {p: thumbnail(p) for f in shown if f.check != "unreadable" for p in f.paths}
    template = environment().get_template("doctor_section.html.j2")
    return Markup(template.render(d=diagnosis, checks=CHECKS, counts=diagnosis.summary(), groups=groups,
                                  titles=TITLES, thumbs={p: t for p, t in thumbs.items() if t}, limit=SHOWN))


def write_html(diagnosis: Diagnosis, path: Path) -> None:
    page = environment().get_template("page.html.j2").render(title=f"imgtune doctor: {diagnosis.source}",
                                                             body=html_section(diagnosis))
    atomic_write_text(path, page)


def thumbnail(path: str, size: int = 96) -> str | None:
    try:
        image = load_rgb(path, draft_size=size)
    except DecodeError:
        return None
    image.thumbnail((size * 2, size))
    return data_uri(image_jpeg(image, quality=80), "image/jpeg")
