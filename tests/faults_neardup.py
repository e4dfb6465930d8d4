"""Fault cases of the near-duplicate check (issue 12, item 9; see faultlib): ``imgtune train`` on
folders of distinct images of one kind must not call them near-duplicates (at most ``TARGET``
warnings), and a real near-duplicate across splits must still be reported."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

from PIL import Image

import lookalike
from datagen import SCRATCH_ARGS
from faultlib import Fault, Outcome

TARGET = 20  # near-duplicate warnings allowed on a folder of distinct images of one kind (the target)
FAST = (*SCRATCH_ARGS, "--epochs", "1", "--workers", "0", "--batch-size", "64")


def _train(data: Path, out: Path) -> tuple[Outcome, str]:
    """``imgtune train DATA`` in this process: the outcome and everything logged."""
    from imgtune.cli import main

    buffer = io.StringIO()
    with contextlib.redirect_stderr(buffer):
        code = main(["train", str(data), *FAST, "--out", str(out)])
    log = buffer.getvalue()
    lines = [line.strip() for line in log.splitlines() if line.strip() and not line.startswith(" ")]
    return Outcome(code, lines[-1] if lines else ""), log


def near_warnings(log: str) -> int:
    """Near-duplicate pairs ``train`` warned about: one line each for the first ten, then a count."""
    listed = sum("near-duplicate across splits:" in line for line in log.splitlines())
    more = re.search(r"and (\d+) more near-duplicate pair", log)
    return listed + (int(more.group(1)) if more else 0)


def _look_alikes(tmp: Path, images, labels, what: str) -> Outcome:
    lookalike.write_tree(tmp / "data", images, labels)
    outcome, log = _train(tmp / "data", tmp / "run")
    count = near_warnings(log)
    if count > TARGET:
        outcome.lost = (f"{count} near-duplicate warnings on {len(images)} distinct {what} "
                        f"(false alarms; at most {TARGET})")
    outcome.message = f"{count} near-duplicate warning(s) on {len(images)} distinct {what}"
    return outcome


def _digits(tmp: Path) -> Outcome:
    images, labels = lookalike.digits()
    return _look_alikes(tmp, images[:900], labels[:900], "digit scans")


def _xrays(tmp: Path) -> Outcome:
    return _look_alikes(tmp, *lookalike.generated("xray", 500), "X-ray-like images")


def _signs(tmp: Path) -> Outcome:
    return _look_alikes(tmp, *lookalike.generated("sign", 500), "sign images")


def _real_near_duplicate(tmp: Path) -> Outcome:
    """Recall kept: a half-size copy of a training image in val is still reported, naming both files."""
    images, labels = lookalike.generated("xray", 60, seed=3)
    for split, members in (("train", range(0, 48)), ("val", range(48, 60))):
        lookalike.write_tree(tmp / "data" / split, [images[i] for i in members], [labels[i] for i in members])
    source = next((tmp / "data" / "train" / "a").glob("*.png"))
    copy = tmp / "data" / "val" / "a" / "smaller.png"
    Image.open(source).resize((32, 32), Image.LANCZOS).save(copy)
    outcome, log = _train(tmp / "data", tmp / "run")
    warned = [line for line in log.splitlines() if "near-duplicate across splits:" in line]
    if not any(str(copy) in line and str(source) in line for line in warned):
        outcome.lost = f"the planted near-duplicate {copy.name} of {source.name} was not reported"
    outcome.message = warned[0].strip() if warned else outcome.message
    return outcome


FAULTS = [
    Fault("train on 900 distinct digit scans (scikit-learn, 32 px)", "near-duplicates", 0, _digits),
    Fault("train on 500 distinct X-ray-like images in one pose", "near-duplicates", 0, _xrays),
    Fault("train on 500 distinct photos of one kind of sign", "near-duplicates", 0, _signs),
    Fault("a half-size copy of a train image in val", "near-duplicates", 0, _real_near_duplicate),
]
