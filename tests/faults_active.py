"""Fault cases of ``imgtune suggest``'s strategies (typical, badge, hybrid; see faultlib)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from datagen import write_images
from faultlib import Fault, Outcome, cli
from faults_suggest import _run


def _moved_training_images(tmp: Path) -> Outcome:
    """``typical`` reads where the run's training images are; gone, it warns and treats the data as unlabelled."""
    data, run = _run(tmp)
    write_images(tmp / "pool" / "a", "red_circle", 4, np.random.default_rng(1))
    data.rename(tmp / "moved")
    outcome = cli("suggest", str(run), str(tmp / "pool"), "--strategy", "typical", "--n", "2")
    if not (tmp / "pool" / "suggestions.csv").is_file():
        outcome.lost = "no suggestions.csv written"
    elif "not at their recorded paths" not in outcome.message:
        outcome.lost = "no warning that the run's training images are missing"
    return outcome


def _unknown_strategy(tmp: Path) -> Outcome:
    outcome = cli("suggest", str(tmp / "run"), str(tmp), "--strategy", "coreset")
    if "hybrid" not in outcome.message:
        outcome.lost = "the message does not list the strategies"
    return outcome


FAULTS = [
    Fault("suggest --strategy typical after the run's training images were moved", "unlabelled images", 0,
          _moved_training_images),
    Fault("suggest --strategy with an unknown name", "unlabelled images", 2, _unknown_strategy),
]
