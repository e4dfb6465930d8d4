"""Training that diverges stops with exit 5, says where, keeps its last good checkpoint and writes no
NaN weights; every JSON file imgtune writes is strict JSON; a run with NaN weights is refused."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from datagen import SCRATCH_ARGS, make_split_dataset
from imgtune import artifact, checkpoint, engine, finite
from imgtune.cli import main
from imgtune.errors import ModelError, TrainingDiverged

FAST = (*SCRATCH_ARGS, "--workers", "0", "--batch-size", "6")  # 18 training images: 3 batches an epoch


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_split_dataset(tmp_path_factory.mktemp("diverge") / "data", train=6, val=3)


def strict_json(path_or_text) -> object:
    """Parse as strict JSON: bare NaN, Infinity and -Infinity are refused."""
    text = path_or_text if isinstance(path_or_text, str) else path_or_text.read_text()

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def assert_no_nan_written(run) -> None:
    """No weights file, no final metrics; every checkpoint left holds finite weights; metrics.csv rows
    are finite."""
    assert not (run / artifact.WEIGHTS).exists()
    assert not (run / artifact.METRICS_JSON).exists()
    for path in checkpoint.listed(run / checkpoint.FOLDER):
        assert finite.nonfinite_tensors(checkpoint.load(path)["model"]) == [], path
    if (run / artifact.METRICS_CSV).exists():
        for row in csv.DictReader((run / artifact.METRICS_CSV).open()):
            assert all(math.isfinite(float(v)) for k, v in row.items() if k not in ("phase",)), row


class NanLossAt(torch.nn.CrossEntropyLoss):
    """The training loss, NaN on its ``at``-th call (a batch that breaks training)."""

    at = 5

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def forward(self, logits, targets):
        self.calls += 1
        loss = super().forward(logits, targets)
        return loss * float("nan") if self.calls == self.at else loss


@pytest.mark.parametrize("batches", ["1", "3"])
def test_lr_1e30_stops_with_exit_5_saying_where_and_writes_no_nan(data, tmp_path, capsys, batches):
    """With one batch an epoch the training loss of epoch 1 is finite (it was computed before the step)
    while the step makes the outputs overflow: the validation loss (or the weights) must catch it. With
    three, the training loss of the second batch is NaN."""
    run = tmp_path / "run"
    size = ["--batch-size", "32"] if batches == "1" else []
    code = main(["train", str(data), *FAST, *size, "--epochs", "2", "--lr", "1e30", "--checkpoint-every", "1",
                 "--out", str(run)])
    err = capsys.readouterr().err
    assert code == TrainingDiverged.exit_code == 5
    where = "batch 1 of 1: the " if batches == "1" else "batch 2 of 3: the training loss is nan"
    assert f"training diverged in epoch 1 (all), {where}" in err
    assert "--lr 1e+30" in err and "imgtune doctor" in err
    if batches == "1":
        assert "the validation loss is nan" in err or "the weights are NaN or infinite" in err
    # the checkpoint after batch 1 holds finite weights (with one batch an epoch, weights whose outputs
    # overflow: only validation shows it), the end-of-epoch one is not written
    kept = checkpoint.listed(run / checkpoint.FOLDER)
    assert [p.name for p in kept] == ["epoch0001-step000001.pt"]
    assert f"the newest checkpoint, {kept[0]}, is kept" in err
    assert_no_nan_written(run)


def test_a_nan_loss_keeps_the_last_good_checkpoint_and_resume_finishes(data, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setattr(torch.nn, "CrossEntropyLoss", NanLossAt)  # the 5th batch: epoch 2, batch 2
    code = main(["train", str(data), *FAST, "--epochs", "2", "--checkpoint-every", "2", "--out", str(run)])
    err = capsys.readouterr().err
    assert code == 5
    assert "epoch 2 (all), batch 2 of 3: the training loss is nan" in err
    kept = checkpoint.listed(run / checkpoint.FOLDER)
    assert [p.name for p in kept] == ["epoch0001-end.pt", "epoch0002-step000001.pt"]
    assert f"the newest checkpoint, {kept[-1]}, is kept (no checkpoint with NaN" in err
    assert_no_nan_written(run)
    monkeypatch.undo()  # the bad batch was a one-off: the run continues from its last good checkpoint
    assert main(["train", "--resume", str(run)]) == 0
    assert finite.nonfinite_tensors(load_file(run / artifact.WEIGHTS)) == []


@pytest.mark.parametrize("every", [None, "1"])
def test_weights_that_turn_infinite_are_refused_before_any_checkpoint(data, tmp_path, capsys, monkeypatch, every):
    """A weight that becomes infinite after the last step of epoch 2 (the loss of every batch was
    finite): the end-of-epoch checkpoint, and with --checkpoint-every the mid-epoch one, is not
    written; the one before it stays."""
    steps = []
    original = engine._step

    def step(optimizer, scaler):
        original(optimizer, scaler)
        steps.append(1)
        if len(steps) == 6:
            optimizer.param_groups[0]["params"][0].data[0] = float("inf")
    monkeypatch.setattr(engine, "_step", step)
    run = tmp_path / "run"
    extra = ["--checkpoint-every", every] if every else []
    extra += ["--no-plan"]  # the time plan's timed steps (on a copy of the model) would be counted as well
    code = main(["train", str(data), *FAST, "--epochs", "3", *extra, "--out", str(run)])
    err = capsys.readouterr().err
    assert code == 5
    assert "epoch 2 (all), batch 3 of 3: the weights are NaN or infinite (" in err
    kept = [p.name for p in checkpoint.listed(run / checkpoint.FOLDER)]
    assert kept[-1] == ("epoch0002-step000002.pt" if every else "epoch0001-end.pt")
    assert_no_nan_written(run)
    assert len(list(csv.DictReader((run / artifact.METRICS_CSV).open()))) == 1  # epoch 1's row only


def test_resume_skips_a_checkpoint_with_nan_weights(data, tmp_path, capsys):
    """A checkpoint written with NaN weights (by an imgtune that did not stop diverging runs) is set aside
    like a damaged one, and the run continues from the one before it, instead of writing NaN weights."""
    run = tmp_path / "run"
    assert main(["-q", "train", str(data), *FAST, "--epochs", "2", "--out", str(run)]) == 0
    newest = checkpoint.listed(run / checkpoint.FOLDER)[-1]
    payload = torch.load(newest, weights_only=True)
    payload["model"] = {k: v * float("nan") if v.is_floating_point() else v for k, v in payload["model"].items()}
    torch.save(payload, newest)
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    assert f"checkpoint {newest} is unusable: it holds weights that are NaN or infinite" in capsys.readouterr().err
    assert newest.with_name(newest.name + ".unusable").exists()
    assert finite.nonfinite_tensors(load_file(run / artifact.WEIGHTS)) == []


def test_predict_and_evaluate_refuse_a_run_whose_weights_are_nan(data, tmp_path, capsys):
    """A run written before imgtune stopped diverging training: refused (exit 4, the file named) rather
    than every image labelled with one class."""
    run = tmp_path / "run"
    assert main(["-q", "train", str(data), *FAST, "--epochs", "1", "--out", str(run)]) == 0
    weights = load_file(run / artifact.WEIGHTS)
    name = next(k for k, v in weights.items() if v.is_floating_point())
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, run / artifact.WEIGHTS)
    meta = json.loads((run / artifact.META).read_text())  # such a run recorded no checksum either
    del meta[artifact.WEIGHTS_SHA256]
    artifact.write_json(run / artifact.META, meta)
    image = next((data / "val").rglob("*.png"))
    for command in (["predict", str(run), str(image)], ["evaluate", str(run)], ["report", str(run)]):
        capsys.readouterr()
        assert main(command) == ModelError.exit_code, command
        err = capsys.readouterr().err
        assert f"{run / artifact.WEIGHTS} holds weights that are NaN or infinite ({name}" in err
        assert "lower --lr" in err


def test_metrics_and_calibration_json_are_strict_when_a_value_is_undefined(data, tmp_path, monkeypatch, capsys):
    """A metric that does not exist is written null: bare NaN or Infinity is not JSON."""
    from imgtune import calibration, evaluation, results

    def undefined(report_fn):
        def report(*args, **kwargs):
            return {**report_fn(*args, **kwargs), "loss": float("nan"), "top3_accuracy": np.float32("inf")}
        return report

    def assess(*args, **kwargs):
        return {**original_assess(*args, **kwargs), "ece_before": float("nan"), "nll_after": -float("inf")}
    original_assess = calibration.assess
    monkeypatch.setattr(results, "full_report", undefined(results.full_report))
    monkeypatch.setattr(calibration, "assess", assess)
    monkeypatch.setattr(evaluation, "full_report", undefined(evaluation.full_report))
    run = tmp_path / "run"
    assert main(["-q", "train", str(data), *FAST, "--epochs", "1", "--out", str(run)]) == 0
    metrics = strict_json(run / artifact.METRICS_JSON)
    assert metrics["loss"] is None and metrics["top3_accuracy"] is None
    assert metrics["calibration"]["ece_before"] is None
    assert strict_json(run / artifact.CALIBRATION)["nll_after"] is None
    capsys.readouterr()
    assert main(["-q", "evaluate", str(run), "--format", "json"]) == 0
    assert strict_json(capsys.readouterr().out)["loss"] is None
    assert strict_json(run / "evaluation_val.json")["loss"] is None


def test_strict_json_turns_every_non_finite_number_into_null():
    values = {"a": float("nan"), "b": [np.float32("inf"), np.float64(-np.inf), 1.5, 2, True, None, "nan"],
              "c": ({"d": np.float64(0.25)},)}
    assert strict_json(finite.dumps(values)) == {"a": None, "b": [None, None, 1.5, 2, True, None, "nan"],
                                                "c": [{"d": 0.25}]}


RANK_SCRIPT = """
import os, sys
import torch
sys.path.insert(0, {tests!r})
from test_divergence import NanLossAt

class OnRankOne(NanLossAt):
    at = 2 if os.environ["RANK"] == "1" else -1

torch.nn.CrossEntropyLoss = OnRankOne
from imgtune.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_nan_loss_on_one_rank_stops_every_rank_at_once(tmp_path):
    """torchrun, 2 ranks: rank 1's second batch gives NaN; both ranks stop at that step, each saying why
    (exit 5; torchrun may stop the second with SIGTERM once the first has exited), none waits for ever
    in the next gradient exchange."""
    data = make_split_dataset(tmp_path / "data", train=16, val=7)
    script = tmp_path / "nan_on_rank_one.py"
    script.write_text(RANK_SCRIPT.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "IMGTUNE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), "train", str(data), *SCRATCH_ARGS, "--model", "imgtune:small_cnn_gn",
                           "--device", "cpu", "--batch-size", "8", "--epochs", "2", "--out", str(run)],
                          env=env, capture_output=True, text=True, timeout=300)
    found = re.findall(r"epoch 1 \(all\), batch 2 of \d+: the training loss (is nan|of another rank is NaN)",
                       done.stderr)
    assert set(found) == {"is nan", "of another rank is NaN"}, done.stderr[-3000:]  # each rank says why
    # torchrun's summary: every rank exited 5, or was stopped by torchrun (SIGTERM) once another had
    codes = re.findall(r"exitcode\s*: (-?\d+) \(pid", done.stderr)
    assert "5" in codes and set(codes) <= {"5", "-15"}, done.stderr[-2000:]
    assert_no_nan_written(run)
