"""Fault cases of training that diverges and of values that are not finite numbers (see faultlib)."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from unittest import mock

from datagen import SCRATCH_ARGS, make_split_dataset
from faultlib import Fault, Outcome
from faultlib import cli as _cli

FAST = (*SCRATCH_ARGS, "--workers", "0", "--batch-size", "6")  # 18 training images: 3 batches an epoch


def cli(*args: str) -> Outcome:
    """faultlib's ``cli``, its tables on stdout kept out of the fault table."""
    with contextlib.redirect_stdout(io.StringIO()):
        return _cli(*args)


@contextlib.contextmanager
def _private_cache(tmp: Path):
    with mock.patch.dict(os.environ, {"IMGTUNE_CACHE": str(tmp / "cache")}):
        yield


def _data(tmp: Path) -> Path:
    return make_split_dataset(tmp / "data", train=6, val=3)


def _nan_written(run: Path) -> str | None:
    """What a diverged run left wrong: NaN weights, final metrics, or a checkpoint with NaN weights."""
    from imgtune import artifact, checkpoint, finite

    if (run / artifact.WEIGHTS).exists():
        return f"{artifact.WEIGHTS} written by a diverged run"
    if (run / artifact.METRICS_JSON).exists():
        return f"{artifact.METRICS_JSON} written by a diverged run"
    for path in checkpoint.listed(run / checkpoint.FOLDER):
        if finite.nonfinite_tensors(checkpoint.load(path)["model"]):
            return f"checkpoint {path.name} holds NaN weights"
    return None


def _lr_1e30(tmp: Path) -> Outcome:
    run = tmp / "run"
    with _private_cache(tmp):
        outcome = cli("train", str(_data(tmp)), *FAST, "--batch-size", "32", "--epochs", "2", "--lr", "1e30",
                      "--out", str(run))
    outcome.lost = _nan_written(run)
    return outcome


def _nan_loss_in_epoch_2(tmp: Path) -> Outcome:
    """The 5th batch (epoch 2, batch 2) gives a NaN loss; afterwards the run must resume from its last good
    checkpoint and finish (without the fault)."""
    import torch

    class NanOnFifthCall(torch.nn.CrossEntropyLoss):
        calls = 0

        def forward(self, logits, targets):
            self.calls += 1
            loss = super().forward(logits, targets)
            return loss * float("nan") if self.calls == 5 else loss

    run = tmp / "run"
    with _private_cache(tmp):
        with mock.patch.object(torch.nn, "CrossEntropyLoss", NanOnFifthCall):
            outcome = cli("train", str(_data(tmp)), *FAST, "--epochs", "2", "--checkpoint-every", "2",
                          "--out", str(run))
        outcome.lost = _nan_written(run)
        if outcome.lost is None and cli("-q", "train", "--resume", str(run)).exit_code != 0:
            outcome.lost = "the last good checkpoint (the run does not resume from it)"
    return outcome


def _predict_with_nan_weights(tmp: Path) -> Outcome:
    """A run written before imgtune stopped diverging training (its weights NaN)."""
    from safetensors.torch import load_file, save_file

    run, data = tmp / "run", _data(tmp)
    with _private_cache(tmp):
        cli("-q", "train", str(data), *FAST, "--epochs", "1", "--out", str(run))
        weights = load_file(run / "model.safetensors")
        weights = {name: value * float("nan") if value.is_floating_point() else value
                   for name, value in weights.items()}
        save_file(weights, run / "model.safetensors")
        meta = json.loads((run / "meta.json").read_text())  # such a run recorded no checksum either
        meta.pop("weights_sha256", None)
        (run / "meta.json").write_text(json.dumps(meta))
        before = (run / "model.safetensors").read_bytes()
        outcome = cli("predict", str(run), str(next((data / "val").rglob("*.png"))))
    if (run / "model.safetensors").read_bytes() != before:
        outcome.lost = "model.safetensors changed"
    elif "NaN or infinite" not in outcome.message:
        outcome.lost = f"refused for another reason than its NaN weights: {outcome.message}"
    return outcome


def _resume_from_nan_checkpoint(tmp: Path) -> Outcome:
    """The newest checkpoint holds NaN weights (written before this check): resume must use the one
    before it, not write NaN weights."""
    import torch
    from safetensors.torch import load_file

    from imgtune import checkpoint, finite

    run = tmp / "run"
    with _private_cache(tmp):
        cli("-q", "train", str(_data(tmp)), *FAST, "--epochs", "2", "--out", str(run))
        newest = checkpoint.listed(run / checkpoint.FOLDER)[-1]
        payload = torch.load(newest, weights_only=True)
        payload["model"] = {k: v * float("nan") if v.is_floating_point() else v for k, v in payload["model"].items()}
        torch.save(payload, newest)
        outcome = cli("train", "--resume", str(run))
    weights = run / "model.safetensors"
    if not weights.exists() or finite.nonfinite_tensors(load_file(weights)):
        outcome.lost = "model.safetensors (missing or NaN after resume)"
    elif not newest.with_name(newest.name + ".unusable").exists():
        outcome.lost = f"{newest.name} (not kept as .unusable)"
    return outcome


def _undefined_metric(tmp: Path) -> Outcome:
    """A metric that does not exist (NaN, an infinity) in evaluate's JSON output and file."""
    from imgtune import evaluation

    original = evaluation.full_report

    def report(*args, **kwargs):
        return {**original(*args, **kwargs), "loss": float("nan"), "top3_accuracy": float("inf")}

    run, stdout = tmp / "run", io.StringIO()
    with _private_cache(tmp):
        cli("-q", "train", str(_data(tmp)), *FAST, "--epochs", "1", "--out", str(run))
        with mock.patch.object(evaluation, "full_report", report), contextlib.redirect_stdout(stdout):
            outcome = _cli("-q", "evaluate", str(run), "--format", "json")
    file = run / "evaluation_val.json"
    outcome.lost = _not_strict("the printed JSON", stdout.getvalue()) or \
        _not_strict(file.name, file.read_text() if file.exists() else "")
    return outcome


def _not_strict(name: str, text: str) -> str | None:
    def refuse(constant):
        raise ValueError(constant)
    try:
        json.loads(text, parse_constant=refuse)
    except ValueError as exc:
        return f"{name} is not valid JSON ({exc})"
    return None


FAULTS = [
    Fault("train with --lr 1e30 (one batch an epoch: the training loss stays finite)", "training", 5, _lr_1e30),
    Fault("a batch whose loss is NaN in epoch 2 (--checkpoint-every 2), then --resume", "training", 5,
          _nan_loss_in_epoch_2),
    Fault("predict with a run whose model.safetensors is NaN (written before this check)", "training", 4,
          _predict_with_nan_weights),
    Fault("--resume when the newest checkpoint holds NaN weights", "training", 0, _resume_from_nan_checkpoint),
    Fault("evaluate --format json when a metric is NaN or infinite", "training", 0, _undefined_metric),
]
