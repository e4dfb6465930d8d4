"""Fault cases of the input size chosen from the data and of ``--unfreeze top:K`` (see faultlib)."""

from __future__ import annotations

from pathlib import Path

from datagen import PRETRAINED_ARGS, make_split_dataset
from faultlib import Fault, Outcome, cli

GRADUAL = ("--strategy", "gradual", "--epochs", "2", "--freeze-epochs", "1", *PRETRAINED_ARGS)


def _nothing_written(outcome: Outcome, run: Path) -> Outcome:
    if run.exists() and any(run.iterdir()):
        outcome.lost = "a run folder was written before the error"
    return outcome


def _train(tmp: Path, *args: str) -> Outcome:
    data = make_split_dataset(tmp / "data", train=4, val=2)
    return _nothing_written(cli("train", str(data), "--out", str(tmp / "run"), "--cache-dir", str(tmp / "cache"),
                                *args), tmp / "run")


def _malformed_unfreeze(tmp: Path) -> Outcome:
    return _train(tmp, *GRADUAL, "--unfreeze", "top:zero")


def _too_many_blocks(tmp: Path) -> Outcome:
    return _train(tmp, *GRADUAL, "--unfreeze", "top:40")


def _unfreeze_with_probe(tmp: Path) -> Outcome:
    return _train(tmp, *PRETRAINED_ARGS, "--strategy", "linear-probe", "--unfreeze", "top:2")


def _unknown_size_source(tmp: Path) -> Outcome:
    return _train(tmp, *PRETRAINED_ARGS, "--size-from", "largest")


def _damaged_activation(tmp: Path) -> Outcome:
    """A cached activation with a flipped byte is named in a warning and computed again; the run succeeds."""
    data = make_split_dataset(tmp / "data", train=4, val=2)
    args = ("--out", str(tmp / "run"), "--cache-dir", str(tmp / "cache"), *GRADUAL, "--unfreeze", "top:2")
    first = cli("-q", "train", str(data), *args)
    assert first.exit_code == 0, first.message
    entry = sorted((tmp / "cache").glob("activations/*/*/*.arr"))[0]
    raw = bytearray(entry.read_bytes())
    raw[-3] ^= 0xFF
    entry.write_bytes(bytes(raw))
    outcome = cli("train", str(data), *args, "--overwrite")
    if not (tmp / "run" / "model.safetensors").is_file():
        outcome.lost = "the second run wrote no weights"
    return outcome


FAULTS = [
    Fault("train --unfreeze top:zero (not a number of blocks)", "training", 2, _malformed_unfreeze),
    Fault("train --unfreeze top:40 on a body of 19 blocks", "training", 2, _too_many_blocks),
    Fault("train --strategy linear-probe --unfreeze top:2", "training", 2, _unfreeze_with_probe),
    Fault("train --size-from largest (not a choice)", "training", 2, _unknown_size_source),
    Fault("a damaged cached activation (a flipped byte)", "caches", 0, _damaged_activation),
]
