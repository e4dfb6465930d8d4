"""Fault cases of ``imgtune suggest``, ``--extra-labels`` and the ONNX Runtime feature path (see faultlib)."""

from __future__ import annotations

import contextlib
import hashlib
import io
from pathlib import Path

import numpy as np

from datagen import PRETRAINED_ARGS, make_split_dataset, write_images, write_unreadable
from faultlib import Fault, Outcome, cli

PROBE = ("--strategy", "linear-probe", "--epochs", "1", *PRETRAINED_ARGS)


def _run(tmp: Path) -> tuple[Path, Path]:
    data = make_split_dataset(tmp / "data", train=4, val=2)
    outcome = cli("-q", "train", str(data), "--out", str(tmp / "run"), "--cache-dir", str(tmp / "cache"), *PROBE)
    assert outcome.exit_code == 0, outcome.message
    return data, tmp / "run"


def _filled_csv_kept(tmp: Path) -> Outcome:
    _, run = _run(tmp)
    write_images(tmp / "pool" / "a", "red_circle", 3, np.random.default_rng(1))
    filled = tmp / "pool" / "suggestions.csv"
    filled.write_text("path,label,guess,prob\na/red_circle_000.png,red_circle,red_circle,0.9\n")
    before = filled.read_bytes()
    outcome = cli("suggest", str(run), str(tmp / "pool"))
    if filled.read_bytes() != before:
        outcome.lost = "the filled-in suggestions.csv was replaced"
    return outcome


def _unknown_class(tmp: Path) -> Outcome:
    data = make_split_dataset(tmp / "data", train=4, val=2)
    labels = tmp / "data" / "labels.csv"
    image = sorted((data / "train" / "red_circle").glob("*"))[0].relative_to(tmp / "data")
    labels.write_text(f"path,label\n{image},red_circle\n{image},purple_star\n")
    outcome = cli("train", str(data), "--out", str(tmp / "run"), "--extra-labels", str(labels), *PROBE)
    if (tmp / "run").exists() and any((tmp / "run").iterdir()):
        outcome.lost = "a run folder was written before the error"
    return outcome


def _all_unreadable(tmp: Path) -> Outcome:
    _, run = _run(tmp)
    for name in ("a.jpg", "b.png"):
        write_unreadable(tmp / "pool" / name)
    return cli("suggest", str(run), str(tmp / "pool"))


def _damaged_body(tmp: Path) -> Outcome:
    data, _ = _run(tmp)
    (body,) = (tmp / "cache").glob("features/*/body-*.onnx")
    raw = bytearray(body.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    body.write_bytes(bytes(raw))
    for entry in (tmp / "cache").glob("features/*/??/*.arr"):
        entry.unlink()  # so the features are computed again, by the body
    from imgtune.cli import main

    buffer = io.StringIO()
    with contextlib.redirect_stderr(buffer):
        code = main(["train", str(data), "--out", str(tmp / "again"), "--cache-dir", str(tmp / "cache"), *PROBE])
    warned = [line for line in buffer.getvalue().splitlines() if "damaged cache entry" in line]
    outcome = Outcome(code, warned[0] if warned else "no warning")
    bodies = list((tmp / "cache").glob("features/*/body-*.onnx"))
    good = [p for p in bodies if hashlib.sha256(p.read_bytes()).hexdigest()[:16] == p.stem.removeprefix("body-")]
    if not warned or len(good) != len(bodies) or not good:
        outcome.lost = "the damaged body was used or kept silently, or no good one was written"
    return outcome


FAULTS = [
    Fault("suggest when DIR/suggestions.csv exists (labels filled in)", "unlabelled images", 2, _filled_csv_kept),
    Fault("train --extra-labels with a row of an unknown class", "unlabelled images", 3, _unknown_class),
    Fault("suggest on a folder whose images are all unreadable", "unlabelled images", 3, _all_unreadable),
    Fault("a damaged exported body (body-*.onnx) in the feature cache", "caches", 0, _damaged_body),
]
