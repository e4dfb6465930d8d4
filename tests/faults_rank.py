"""Fault cases of ``imgtune rank`` and ``imgtune train --model auto`` (issue 16; see faultlib): bad
candidates, options and data stop with the documented exit code before any model is built (or after
writing the ranking's reasons), and nothing the user had is lost."""

from __future__ import annotations

import json
from pathlib import Path

from datagen import make_split_dataset
from faultlib import Fault, Outcome, cli


def _data(tmp: Path, train: int = 4) -> Path:
    return make_split_dataset(tmp / "data", train=train, val=2, size=24)


def _only_bad_names(tmp: Path) -> Outcome:
    """Every candidate fails: exit 4, and rank.json still lists each one with its reason."""
    outcome = cli("rank", str(_data(tmp)), "--models", "no_such_net,timm:no_such_either", "--offline",
                  "--out", str(tmp / "out"))
    found = json.loads((tmp / "out" / "rank.json").read_text()) if (tmp / "out" / "rank.json").is_file() else {}
    if [s["model"] for s in found.get("skipped", [])] != ["no_such_net", "timm:no_such_either"]:
        outcome.lost = "rank.json does not list both skipped candidates with their reasons"
    return outcome


def _one_fold(tmp: Path) -> Outcome:
    return cli("rank", str(_data(tmp)), "--folds", "1", "--out", str(tmp / "out"))


def _negative_budget(tmp: Path) -> Outcome:
    return cli("rank", str(_data(tmp)), "--budget-ms", "-5", "--out", str(tmp / "out"))


def _missing_data(tmp: Path) -> Outcome:
    return cli("rank", str(tmp / "nowhere"), "--out", str(tmp / "out"))


def _out_is_a_file(tmp: Path) -> Outcome:
    target = tmp / "notes.txt"
    target.write_text("mine")
    outcome = cli("rank", str(_data(tmp)), "--out", str(target))
    if target.read_text() != "mine":
        outcome.lost = f"{target} was changed"
    return outcome


def _one_image_per_class(tmp: Path) -> Outcome:
    return cli("rank", str(_data(tmp, train=1)), "--models", "mobilenet_v2", "--offline", "--out", str(tmp / "out"))


def _auto_with_scratch(tmp: Path) -> Outcome:
    outcome = cli("train", str(_data(tmp)), "--model", "auto", "--strategy", "scratch", "--out", str(tmp / "run"))
    if (tmp / "run").exists() and any((tmp / "run").iterdir()):
        outcome.lost = "a run folder was written"
    return outcome


def _budget_without_auto(tmp: Path) -> Outcome:
    return cli("train", str(_data(tmp)), "--model", "mobilenet_v2", "--budget-ms", "10", "--out", str(tmp / "run"))


FAULTS = [
    Fault("rank with only unknown model names", "rank", 4, _only_bad_names),
    Fault("rank --folds 1", "rank", 2, _one_fold),
    Fault("rank --budget-ms -5", "rank", 2, _negative_budget),
    Fault("rank a folder that does not exist", "rank", 3, _missing_data),
    Fault("rank --out naming an existing file", "rank", 2, _out_is_a_file),
    Fault("rank with one training image in a class", "rank", 3, _one_image_per_class),
    Fault("train --model auto --strategy scratch", "rank", 2, _auto_with_scratch),
    Fault("train --model mobilenet_v2 --budget-ms 10 (budget without auto)", "rank", 2, _budget_without_auto),
]
