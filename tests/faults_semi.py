"""Fault cases of ``imgtune train --unlabeled DIR`` (semi-supervised training; see faultlib)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np

from datagen import PRETRAINED_ARGS, make_split_dataset, write_images, write_unreadable
from faultlib import Fault, Outcome, cli

PROBE = ("--strategy", "linear-probe", "--epochs", "1", *PRETRAINED_ARGS)


def _train(tmp: Path, pool: Path, *extra: str) -> Outcome:
    """``imgtune train`` with ``--unlabeled pool``; a run folder left behind by a refused run is lost work."""
    outcome = cli("train", str(tmp / "data"), "--unlabeled", str(pool), "--out", str(tmp / "run"),
                  "--cache-dir", str(tmp / "cache"), *PROBE, *extra)
    if outcome.exit_code and (tmp / "run").exists() and any((tmp / "run").iterdir()):
        outcome.lost = "a run folder was written before the error"
    return outcome


def _empty(tmp: Path) -> Outcome:
    make_split_dataset(tmp / "data", train=3, val=2)
    (tmp / "pool" / "nested").mkdir(parents=True)
    (tmp / "pool" / "notes.txt").write_text("no images here\n")
    return _train(tmp, tmp / "pool")


def _all_unreadable(tmp: Path) -> Outcome:
    make_split_dataset(tmp / "data", train=3, val=2)
    for name in ("a.jpg", "b.png"):
        write_unreadable(tmp / "pool" / name)
    return _train(tmp, tmp / "pool")


def _only_val_copies(tmp: Path) -> Outcome:
    data = make_split_dataset(tmp / "data", train=3, val=2)
    (tmp / "pool").mkdir()
    for i, image in enumerate(sorted((data / "val").rglob("*.png"))[:3]):
        shutil.copy(image, tmp / "pool" / f"u{i}.png")
    return _train(tmp, tmp / "pool")


def _some_leak(tmp: Path) -> Outcome:
    """Copies of val images among good unlabelled ones: skipped with a warning naming them, the run goes on."""
    data = make_split_dataset(tmp / "data", train=3, val=2)
    write_images(tmp / "pool", "green_square", 4, np.random.default_rng(3))
    leak = sorted((data / "val" / "red_circle").glob("*.png"))[0]
    shutil.copy(leak, tmp / "pool" / "leak.png")
    from imgtune.cli import main

    buffer = io.StringIO()
    with contextlib.redirect_stderr(buffer):
        code = main(["train", str(data), "--unlabeled", str(tmp / "pool"), "--out", str(tmp / "run"),
                     "--cache-dir", str(tmp / "cache"), *PROBE])
    warned = [line for line in buffer.getvalue().splitlines() if "leak.png" in line]
    outcome = Outcome(code, warned[0] if warned else "no warning about leak.png")
    metrics = tmp / "run" / "metrics.json"
    skipped = json.loads(metrics.read_text())["semi"]["unlabelled"]["skipped_leaking"] if metrics.is_file() else []
    if not warned or [Path(s["path"]).name for s in skipped] != ["leak.png"]:
        outcome.lost = "the copy of a val image was not named, or not left out of training"
    return outcome


def _semi_without_unlabeled(tmp: Path) -> Outcome:
    data = make_split_dataset(tmp / "data", train=3, val=2)
    return cli("train", str(data), "--semi", "self-training", "--out", str(tmp / "run"), *PROBE)


FAULTS = [
    Fault("train --unlabeled with a folder holding no images", "unlabelled images", 3, _empty),
    Fault("train --unlabeled with a folder whose images are all unreadable", "unlabelled images", 3, _all_unreadable),
    Fault("train --unlabeled with a folder of copies of val images only", "unlabelled images", 3, _only_val_copies),
    Fault("train --unlabeled with a copy of a val image among the unlabelled", "unlabelled images", 0, _some_leak),
    Fault("train --semi self-training without --unlabeled", "unlabelled images", 2, _semi_without_unlabeled),
]
