"""Fault cases of the time plan (``--time-budget``, issue 13; see faultlib): a budget that is not a
duration stops with exit 2 before anything is written, and an existing run folder is left as it was."""

from __future__ import annotations

from pathlib import Path

from datagen import PRETRAINED_ARGS, make_split_dataset
from faultlib import Fault, Outcome, cli


def _data(tmp: Path) -> Path:
    return make_split_dataset(tmp / "data", train=4, val=2, size=24)


def _refused(tmp: Path, *args: str) -> Outcome:
    """Train into a folder that holds an earlier run's file; it must be there, unchanged, afterwards."""
    out = tmp / "run"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"earlier run")
    outcome = cli("train", str(_data(tmp)), *PRETRAINED_ARGS, *args, "--out", str(out), "--overwrite")
    if (out / "model.safetensors").read_bytes() != b"earlier run" or len(list(out.iterdir())) != 1:
        outcome.lost = "the run folder was changed by a refused run"
    return outcome


def _not_a_duration(tmp: Path) -> Outcome:
    return _refused(tmp, "--time-budget", "soon")


def _zero(tmp: Path) -> Outcome:
    return _refused(tmp, "--time-budget", "0m")


def _number_in_yaml(tmp: Path) -> Outcome:
    config = tmp / "config.yaml"
    config.write_text("train:\n  time_budget: 10\n")
    return _refused(tmp, "--config", str(config))


FAULTS = [
    Fault("train --time-budget soon", "time plan", 2, _not_a_duration),
    Fault("train --time-budget 0m", "time plan", 2, _zero),
    Fault("train with time_budget: 10 (a number) in the YAML config", "time plan", 2, _number_in_yaml),
]
