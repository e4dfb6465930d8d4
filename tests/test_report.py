"""``imgtune report``: the page holds what ``evaluate`` measured, every image is embedded and decodes, many
classes get a table of top confusions instead of the matrix; and (slow) the hymenoptera and 40-class
reports render in headless Chromium with no console errors and every image loaded."""

from __future__ import annotations

import base64
import colorsys
import csv
import io
import json
import os
import re
import stat
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

import imgtune
from datagen import SCRATCH_ARGS, make_split_dataset
from imgtune.cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]
HYMENOPTERA = Path(os.environ.get("IMGTUNE_HYMENOPTERA", REPO_ROOT / ".." / "shared" / "datasets" / "hymenoptera"))
ARTIFACTS = Path(os.environ.get("IMGTUNE_TEST_ARTIFACTS", REPO_ROOT / "test-artifacts"))


class _Page(HTMLParser):
    """Every <img>'s src, every href/src that points anywhere, and the gallery's figures."""

    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.figures = 0
        self.ids: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        elif attrs.get("src") or attrs.get("href"):
            self.links.append(attrs.get("src") or attrs.get("href"))
        if tag == "figure":
            self.figures += 1
        if "id" in attrs:
            self.ids.append(attrs["id"])


def parse(path: Path) -> tuple[str, _Page]:
    html = path.read_text()
    page = _Page()
    page.feed(html)
    return html, page


def decode_all(sources: list[str]) -> list[tuple[int, int]]:
    sizes = []
    for src in sources:
        match = re.fullmatch(r"data:image/(png|jpeg);base64,([A-Za-z0-9+/=]+)", src)
        assert match, f"not an embedded image: {src[:60]}"
        with Image.open(io.BytesIO(base64.b64decode(match.group(2)))) as image:
            image.load()
            sizes.append(image.size)
    return sizes


def make_many_classes(root: Path, count: int = 40, train: int = 6, val: int = 3, size: int = 32) -> Path:
    """``count`` classes: a disc, square, triangle or bar (by class number) in a hue of its own."""
    rng = np.random.default_rng(0)
    for i in range(count):
        colour = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(i / count, 0.9, 0.9))
        for split, n in (("train", train), ("val", val)):
            folder = root / split / f"class_{i:02d}"
            folder.mkdir(parents=True)
            for j in range(n):
                image = Image.fromarray(np.clip(128 + rng.normal(0, 10, (size, size, 3)), 0, 255).astype(np.uint8))
                draw_shape(ImageDraw.Draw(image), i % 4, size / 2 + rng.uniform(-2, 2), size * 0.3, colour)
                image.save(folder / f"{j}.png")
    return root


def draw_shape(draw: ImageDraw.ImageDraw, kind: int, centre: float, radius: float, colour) -> None:
    low, high = centre - radius, centre + radius
    if kind == 0:
        draw.ellipse([low, low, high, high], fill=colour)
    elif kind == 1:
        draw.rectangle([low, low, high, high], fill=colour)
    elif kind == 2:
        draw.polygon([(centre, low), (low, high), (high, high)], fill=colour)
    else:
        draw.rectangle([low, centre - radius / 3, high, centre + radius / 3], fill=colour)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    data = make_split_dataset(tmp_path_factory.mktemp("data"), train=8, val=4)
    out = tmp_path_factory.mktemp("runs") / "small"
    assert main(["-q", "train", str(data), *SCRATCH_ARGS, "--epochs", "2", "--workers", "0", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def many_run(tmp_path_factory) -> Path:
    data = make_many_classes(tmp_path_factory.mktemp("many"))
    out = tmp_path_factory.mktemp("runs") / "many"
    assert main(["-q", "train", str(data), *SCRATCH_ARGS, "--epochs", "3", "--workers", "0", "--out", str(out)]) == 0
    return out


def test_report_holds_what_evaluate_measured(small_run, capsys):
    assert main(["report", str(small_run)]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == small_run / "report.html"
    html, page = parse(path)
    evaluation = imgtune.evaluate(small_run, device="cpu").report
    assert {"summary", "run", "training", "confusion", "per-class", "roc", "calibration", "mistakes"} <= set(page.ids)
    assert f"accuracy <b>{evaluation['accuracy']:.3f}</b>" in html
    for name, row in evaluation["per_class"].items():
        low, high = row["ci95"]["f1"]
        assert f"{row['f1']:.3f} <span class=\"ci\">({low:.2f}–{high:.2f})</span>" in html
    matrix = np.array(evaluation["confusion_matrix"])
    wrong = int(matrix.sum() - np.trace(matrix))
    assert page.figures == min(wrong, 12)
    assert f"ECE <b>{evaluation['calibration']['ece']:.3f}</b>" in html
    # curves, confusion, ROC/PR, reliability, and one overlay per mistake: all embedded and decodable
    assert len(page.images) == 4 + page.figures
    decode_all(page.images)
    assert page.links == []  # no stylesheet, script or link to fetch
    assert stat.S_IMODE(path.stat().st_mode) & 0o044  # readable by others under the usual umask, not 0600


def test_report_out_and_gallery_options(small_run, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", str(small_run), "--out", str(out), "--gallery", "0"]) == 0
    assert Path(capsys.readouterr().out.strip()) == out
    html, page = parse(out)
    assert page.figures == 0 and len(page.images) == 4


def test_report_on_other_data_uses_its_test_split(small_run, tmp_path, capsys):
    other = make_split_dataset(tmp_path / "other", train=2, val=2, test=3, seed=7)
    assert main(["report", str(small_run), str(other)]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == small_run / "report_test.html"
    html, _ = parse(path)
    assert "Evaluated on other data" in html and str(other) in html and "(9 images)" in html


def test_gallery_shows_the_most_confident_mistakes_with_overlays(small_run, tmp_path, capsys):
    """Data whose folders are renamed around (every label wrong): the gallery holds the 12 most confident
    mistakes, each an embedded Grad-CAM overlay, in falling order of probability."""
    swapped = make_split_dataset(tmp_path / "swapped", train=1, val=5, seed=3)
    names = sorted(p.name for p in (swapped / "val").iterdir())
    for old, new in zip(names, names[1:] + names[:1]):
        (swapped / "val" / old).rename(swapped / "val" / f"{new}.tmp")
    for folder in (swapped / "val").iterdir():
        folder.rename(folder.with_suffix(""))
    assert main(["report", str(small_run), str(swapped), "--split", "val"]) == 0
    html, page = parse(Path(capsys.readouterr().out.strip().splitlines()[-1]))
    evaluation = imgtune.evaluate(small_run, swapped, "val", device="cpu").report
    matrix = np.array(evaluation["confusion_matrix"])
    assert page.figures == min(12, matrix.sum() - np.trace(matrix)) > 0
    overlays = [src for src in page.images if src.startswith("data:image/jpeg")]
    assert len(overlays) == page.figures
    assert all(size[0] <= 320 and size[1] <= 320 for size in decode_all(overlays))
    probs = [float(p) for p in re.findall(r"<figcaption><b>[a-z_]+</b> ([0-9.]+)", html)]
    assert probs == sorted(probs, reverse=True) and len(probs) == page.figures


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every file but the lock file, which records each writer that held the folder (imgtune.runlock)."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*")
            if p.is_file() and p.name != ".imgtune.lock"}


def test_report_writes_only_the_report(small_run, tmp_path, capsys):
    """The report measures without writing evaluate's files (nor touching any other file of the run)."""
    other = make_split_dataset(tmp_path / "other", train=1, val=2, test=2, seed=11)
    for argv, name in (([str(small_run)], "report.html"), ([str(small_run), str(other)], "report_test.html")):
        before = snapshot(small_run)
        assert main(["-q", "report", *argv]) == 0
        after = snapshot(small_run)
        changed = {key for key in after if before.get(key) != after[key]}
        assert changed == {name} and set(before) <= set(after)
    capsys.readouterr()


def test_report_builds_one_model_on_the_requested_device(small_run, tmp_path, monkeypatch):
    """One model, built on --device, measures and explains: the Grad-CAM gallery used to build a second
    copy on the CPU whatever --device said."""
    import torch

    import imgtune.explain
    import imgtune.models
    import imgtune.predict
    from imgtune.report import write_report

    builds, devices, explained = [], [], []
    create, explain_tensor = imgtune.models.create, imgtune.explain.explain_tensor
    monkeypatch.setattr(imgtune.models, "create", lambda *a, **k: builds.append(a) or create(*a, **k))
    # the device is asked for by name; this machine may have no GPU, so every name gives the CPU
    monkeypatch.setattr(imgtune.predict, "select_device", lambda name: devices.append(name) or torch.device("cpu"))
    monkeypatch.setattr(imgtune.explain, "explain_tensor",
                        lambda model, *a, **k: explained.append(model) or explain_tensor(model, *a, **k))
    swapped = make_split_dataset(tmp_path / "swapped", train=1, val=2, seed=4)
    names = sorted(p.name for p in (swapped / "val").iterdir())
    for old, new in zip(names, names[1:] + names[:1]):  # every label wrong: a full gallery
        (swapped / "val" / old).rename(swapped / "val" / f"{new}.tmp")
    for folder in (swapped / "val").iterdir():
        folder.rename(folder.with_suffix(""))
    write_report(small_run, swapped, "val", tmp_path / "r.html", device="cuda", gallery=3)
    assert len(builds) == 1 and devices == ["cuda"]
    assert len(explained) == 3 and all(model is explained[0] for model in explained)


def test_report_of_a_missing_run_fails_clearly(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nothing")]) == 3
    assert "does not exist" in capsys.readouterr().err


def test_forty_classes_get_a_table_of_top_confusions(many_run, capsys):
    assert main(["report", str(many_run)]) == 0
    html, page = parse(Path(capsys.readouterr().out.strip()))
    assert "confusion matrix, counts and row-normalised" not in html and "40 classes (more than 30)" in html
    assert "writes the full matrix to <code>confusion_matrix_val.csv</code>" in html
    assert main(["-q", "evaluate", str(many_run)]) == 0  # which writes the CSV the page names
    with (many_run / "confusion_matrix_val.csv").open(newline="") as handle:
        header, *rows = csv.reader(handle)
    cells = sorted(((int(v), r[0], header[j + 1]) for r in rows for j, v in enumerate(r[1:])
                    if r[0] != header[j + 1] and int(v) > 0), key=lambda c: -c[0])
    shown = re.findall(r"<tr><td>(class_\d+)</td><td>(class_\d+)</td><td>(\d+)</td>", html)
    assert len(shown) == min(30, len(cells)) > 0
    assert [int(n) for _, _, n in shown] == [c[0] for c in cells[:len(shown)]]
    for true, predicted, n in shown:
        assert int(rows[header.index(true) - 1][header.index(predicted)]) == int(n)
    assert len(re.findall(r"<tr class=\"(?:weak)?\"><td>class_", html)) == 40  # the per-class table
    decode_all(page.images)


# --- headless Chromium (slow) --------------------------------------------------------------------

def chromium_or_skip() -> str:
    from browser import find_chromium

    found = find_chromium(install=bool(os.environ.get("CI")))
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed and could not be installed (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return found


def open_in_chromium(report: Path, name: str) -> None:
    from browser import check_page

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / f"report-{name}.png"
    _, page = parse(report)
    result = check_page(report, shot, chromium=chromium_or_skip())
    assert result.console_errors == [] and result.network_requests == [] and result.broken_images == []
    assert result.image_count == len(page.images) > 0
    with Image.open(shot) as image:
        assert image.width == 1280 and image.height > 2000  # the whole page, not the first screen
    print(f"screenshot: {shot}")


@pytest.fixture(scope="module")
def hymenoptera_run(tmp_path_factory) -> Path:
    if not HYMENOPTERA.is_dir():
        pytest.skip(f"{HYMENOPTERA} not found (set IMGTUNE_HYMENOPTERA)")
    out = tmp_path_factory.mktemp("runs") / "hymenoptera"
    # at the model's own 224 px, as a user would run it (PRETRAINED_ARGS' 64 px is for speed elsewhere)
    assert main(["-q", "train", str(HYMENOPTERA), "--model", "mobilenet_v2", "--offline", "--strategy",
                 "linear-probe", "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_gradcam_points_at_the_hand_boxed_insects(hymenoptera_run):
    """bench/gradcam_boxes.json: for at least 15 of the 20 photos the share of Grad-CAM heat (true class)
    inside the hand-drawn box exceeds the box's share of the image (bench/gradcam_boxes.py prints more)."""
    from imgtune.data.decode import load_rgb
    from imgtune.explain import Explainer, explain_tensor, model_input, to_original

    explainer = Explainer.from_run(hymenoptera_run, "cpu")
    hits = 0
    for entry in json.loads((REPO_ROOT / "bench" / "gradcam_boxes.json").read_text())["images"]:
        image = load_rgb(HYMENOPTERA / entry["path"])
        heat, _ = explain_tensor(explainer.model, explainer.preprocessing, model_input(image, explainer.preprocessing),
                                 explainer.class_index(entry["path"].split("/")[1]), "gradcam", explainer.layer)
        full = to_original(heat, image.size, explainer.preprocessing)
        left, top, right, bottom = entry["box"]
        hits += full[top:bottom, left:right].sum() / full.sum() > (right - left) * (bottom - top) / full.size
    assert hits >= 15


@pytest.mark.slow
def test_hymenoptera_report_renders_in_chromium(hymenoptera_run, capsys):
    out = hymenoptera_run
    capsys.readouterr()
    assert main(["-q", "report", str(out)]) == 0
    report = Path(capsys.readouterr().out.strip())
    html, page = parse(report)
    assert "397 JPEG, 1 GIF" in html  # the data summary names the GIF
    open_in_chromium(report, "hymenoptera")


@pytest.mark.slow
def test_forty_class_report_renders_in_chromium(many_run, capsys):
    assert main(["-q", "report", str(many_run)]) == 0
    open_in_chromium(Path(capsys.readouterr().out.strip()), "forty-classes")
