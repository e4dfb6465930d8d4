"""Fault cases of the training extras: --ema, --mixup/--cutmix, --lr auto, imgtune lr-find and --tta (see
faultlib)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from unittest import mock

from datagen import SCRATCH_ARGS, make_split_dataset, write_unreadable
from faultlib import Fault, Outcome
from faultlib import cli as _cli
from faults_diverge import _private_cache, cli  # the cache kept private; stdout kept out of the fault table

FAST = (*SCRATCH_ARGS, "--workers", "0", "--batch-size", "6", "--epochs", "1")


def _data(tmp: Path) -> Path:
    return make_split_dataset(tmp / "data", train=6, val=3)


def _nothing_in(folder: Path) -> str | None:
    return f"{folder} was written before the error" if folder.exists() and any(folder.iterdir()) else None


def _refused_flag(*flags: str):
    def case(tmp: Path) -> Outcome:
        outcome = cli("train", str(_data(tmp)), *FAST, *flags, "--out", str(tmp / "run"))
        outcome.lost = _nothing_in(tmp / "run")
        return outcome
    return case


def _yaml_lr_word(tmp: Path) -> Outcome:
    config = tmp / "config.yaml"
    config.write_text("train:\n  lr: fast\n")
    outcome = cli("train", str(_data(tmp)), *FAST, "--config", str(config), "--out", str(tmp / "run"))
    outcome.lost = _nothing_in(tmp / "run")
    return outcome


def _lr_find_without_a_rate(tmp: Path) -> Outcome:
    with _private_cache(tmp):
        outcome = cli("lr-find", str(_data(tmp)), "--model", "imgtune:small_cnn", "--img-size", "32",
                      "--no-pretrained", "--strategy", "linear-probe", "--workers", "0", "--out", str(tmp / "lrf"))
    outcome.lost = _nothing_in(tmp / "lrf")
    return outcome


def _lr_find_into_a_full_folder(tmp: Path) -> Outcome:
    out = tmp / "lrf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    outcome = cli("lr-find", str(_data(tmp)), *FAST, "--out", str(out))
    if (out / "notes.txt").read_text() != "mine" or (out / "lr_find.json").exists():
        outcome.lost = "the folder's files were replaced or added to"
    return outcome


def _lr_find_too_few_steps(tmp: Path) -> Outcome:
    outcome = cli("lr-find", str(_data(tmp)), *FAST, "--iterations", "5", "--out", str(tmp / "lrf"))
    outcome.lost = _nothing_in(tmp / "lrf")
    return outcome


def _lr_auto_all_nan(tmp: Path) -> Outcome:
    """Every loss of the range test is NaN: no rate to suggest; no weights or results are written."""
    import torch

    class NanLoss(torch.nn.CrossEntropyLoss):
        def forward(self, logits, targets):
            return super().forward(logits, targets) * float("nan")

    run = tmp / "run"
    with _private_cache(tmp), mock.patch.object(torch.nn, "CrossEntropyLoss", NanLoss):
        outcome = cli("train", str(_data(tmp)), *FAST, "--lr", "auto", "--out", str(run))
    written = [name for name in ("model.safetensors", "metrics.json", "lr_find.json") if (run / name).exists()]
    outcome.lost = f"{', '.join(written)} written by a run whose range test diverged" if written else None
    return outcome


def _tta_with_a_broken_file(tmp: Path) -> Outcome:
    data, run = _data(tmp), tmp / "run"
    with _private_cache(tmp):
        cli("-q", "train", str(data), *FAST, "--out", str(run))
        broken = write_unreadable(tmp / "in" / "broken.png")
        good = next((data / "val" / "red_circle").iterdir())
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            outcome = _cli("predict", str(run), str(good), str(broken), "--tta", "--format", "csv",
                           "--engine", "torch")
    if good.name not in stdout.getvalue():
        outcome.lost = "the readable image's prediction"
    return outcome


FAULTS = [
    Fault("train --ema 1.5 (a decay must be in [0, 1))", "training", 2, _refused_flag("--ema", "1.5")),
    Fault("train --mixup -0.5", "training", 2, _refused_flag("--mixup", "-0.5")),
    Fault("train --lr fast (neither auto nor a number)", "training", 2, _refused_flag("--lr", "fast")),
    Fault("a config file with lr: fast", "training", 2, _yaml_lr_word),
    Fault("lr-find with linear-probe (its head is fitted by L-BFGS: no rate)", "training", 2,
          _lr_find_without_a_rate),
    Fault("lr-find --out a folder that holds other files", "training", 2, _lr_find_into_a_full_folder),
    Fault("lr-find --iterations 5", "training", 2, _lr_find_too_few_steps),
    Fault("train --lr auto when every loss of the range test is NaN", "training", 5, _lr_auto_all_nan),
    Fault("predict --tta with one unreadable file among readable ones", "inference", 3, _tta_with_a_broken_file),
]
