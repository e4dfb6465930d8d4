"""Fault cases of the command line itself (see faultlib)."""

from __future__ import annotations

from pathlib import Path

from faultlib import Fault, Outcome, cli


def _missing_data(tmp: Path) -> Outcome:
    return cli("train", str(tmp / "nowhere"), "--out", str(tmp / "run"))


def _unknown_flag(tmp: Path) -> Outcome:
    return cli("train", str(tmp), "--no-such-flag")


FAULTS = [
    Fault("train on a folder that does not exist", "command line", 3, _missing_data),
    Fault("an unknown flag", "command line", 2, _unknown_flag),
]
