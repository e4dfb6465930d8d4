"""``--engine`` of predict and evaluate: ONNX Runtime on the run's export gives the torch engine's labels and
probabilities (within the export's parity tolerance) and metrics; ``auto`` uses the export only while it
matches the run's weights and says why not; an explicit ``onnxruntime`` refuses a stale or missing export;
and that path never imports torch. A small CNN from scratch, exported once per module."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from datagen import SCRATCH_ARGS, make_split_dataset, write_unreadable
from imgtune import artifact, models
from imgtune import export as export_lib
from imgtune.cli import main
from imgtune.evaluation import evaluate
from imgtune.ort_predict import EXPORT_DIR, OrtPredictor, open_predictor
from imgtune.predict import Predictor, expand_paths

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

TOLERANCE = export_lib.PROB_TOLERANCE
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_split_dataset(tmp_path_factory.mktemp("data"), train=10, val=5)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "small"
    assert main(["-q", "train", str(data), "--workers", "0", "--out", str(out), *SCRATCH_ARGS, "--epochs", "2"]) == 0
    assert main(["-q", "export", str(out)]) == 0
    return out


@pytest.fixture
def images(data) -> list[Path]:
    return expand_paths([data / "val"])


def predict_json(capsys, run: Path, *args: str) -> list[dict]:
    capsys.readouterr()
    assert main(["predict", str(run), *args, "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_export_dir_is_the_exporters():
    assert EXPORT_DIR == export_lib.EXPORT_DIR


def test_onnxruntime_predictions_equal_torch(run, images, capsys):
    torch_rows = predict_json(capsys, run, *map(str, images), "--engine", "torch", "--top-k", "4")
    ort_rows = predict_json(capsys, run, *map(str, images), "--engine", "onnxruntime", "--top-k", "4")
    assert [r["label"] for r in ort_rows] == [r["label"] for r in torch_rows]
    ours, theirs = (Predictor.from_run(run, "cpu").probabilities(images)[0],
                    OrtPredictor.from_run(run).probabilities(images)[0])
    assert np.abs(ours - theirs).max() <= TOLERANCE
    for a, b in zip(torch_rows, ort_rows):
        assert [t["label"] for t in a["top"]] == [t["label"] for t in b["top"]]
        assert np.allclose([t["prob"] for t in a["top"]], [t["prob"] for t in b["top"]], atol=TOLERANCE)


def test_calibrated_outside_the_graph_equals_torch(run, images):
    """The export has no temperature; --calibrated applies the run's outside the graph, on log-probs."""
    ours = Predictor.from_run(run, "cpu", calibrated=True).probabilities(images)[0]
    predictor = OrtPredictor.from_run(run, calibrated=True)
    assert predictor.graph_temperature is None and predictor.temperature is not None
    assert np.abs(ours - predictor.probabilities(images)[0]).max() <= TOLERANCE


def test_unreadable_file_is_an_error_row_as_with_torch(run, images, tmp_path, capsys):
    broken = write_unreadable(tmp_path / "broken.jpg")
    capsys.readouterr()
    rows = {}
    for engine in ("torch", "onnxruntime"):
        assert main(["predict", str(run), str(images[0]), str(broken), "--engine", engine, "--format", "json"]) == 3
        rows[engine] = json.loads(capsys.readouterr().out)
    assert rows["torch"][1] == rows["onnxruntime"][1] and "error" in rows["torch"][1]
    assert rows["torch"][0]["label"] == rows["onnxruntime"][0]["label"]


def test_evaluate_gives_the_same_metrics(run):
    by_torch = evaluate(run, engine="torch", device="cpu")
    by_ort = evaluate(run, engine="onnxruntime")
    assert by_ort.report["accuracy"] == by_torch.report["accuracy"]
    assert by_ort.report["confusion_matrix"] == by_torch.report["confusion_matrix"]
    assert np.abs(by_ort.probs - by_torch.probs).max() <= TOLERANCE
    assert by_ort.report["calibration"]["ece"] == pytest.approx(by_torch.report["calibration"]["ece"], abs=1e-3)


def test_evaluate_cli_accepts_the_engine(run, capsys):
    capsys.readouterr()
    assert main(["evaluate", str(run), "--engine", "onnxruntime", "--format", "json"]) == 0
    assert "accuracy" in json.loads(capsys.readouterr().out)


def test_auto_picks_onnxruntime_when_the_export_matches(run):
    assert isinstance(open_predictor(run, "auto"), OrtPredictor)
    assert isinstance(open_predictor(run, "auto", device="cpu"), OrtPredictor)
    assert isinstance(open_predictor(run, "torch"), Predictor)


@pytest.fixture
def stale_run(run, tmp_path) -> Path:
    """A copy of the run whose weights changed after the export (saved as training does, checksum and all)."""
    copy = tmp_path / "stale"
    shutil.copytree(run, copy)
    info = artifact.read_run(copy)
    built = models.create(info.config.model, len(info.classes), load_pretrained=False)
    artifact.load_weights(built.model, copy / artifact.WEIGHTS)
    with torch.no_grad():
        next(built.model.parameters()).add_(0.01)
    artifact.save_weights(built.model, copy / artifact.WEIGHTS)
    return copy


def test_auto_falls_back_to_torch_on_a_stale_export_and_says_so(stale_run, images, caplog, capsys):
    with caplog.at_level(logging.INFO, logger="imgtune"):
        assert isinstance(open_predictor(stale_run, "auto"), Predictor)
    assert "made from other weights" in caplog.text and f"imgtune export {stale_run}" in caplog.text
    capsys.readouterr()
    assert main(["predict", str(stale_run), str(images[0])]) == 0
    assert "engine torch" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [(), ("--int8",)])
def test_explicit_onnxruntime_refuses_a_stale_export(stale_run, images, capsys, flags):
    assert main(["predict", str(stale_run), str(images[0]), "--engine", "onnxruntime", *flags]) == 2
    assert f"imgtune export {stale_run}" in capsys.readouterr().err


def test_explicit_onnxruntime_refuses_a_missing_export(run, images, tmp_path, capsys):
    copy = tmp_path / "never_exported"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns(EXPORT_DIR))
    assert isinstance(open_predictor(copy, "auto"), Predictor)
    for command in (["predict", str(copy), str(images[0])], ["evaluate", str(copy)]):
        assert main([*command, "--engine", "onnxruntime"]) == 2
        err = capsys.readouterr().err
        assert "has no ONNX export" in err and f"imgtune export {copy}`" in err


def test_int8_without_its_file_is_refused_and_torch_with_int8_too(run, images, capsys):
    if (run / EXPORT_DIR / "model.int8.onnx").exists():
        pytest.skip("this export has an int8 file")
    assert main(["predict", str(run), str(images[0]), "--int8"]) == 2
    err = capsys.readouterr().err
    assert "has no int8 ONNX export" in err and f"imgtune export {run} --int8`" in err
    assert main(["predict", str(run), str(images[0]), "--int8", "--engine", "torch"]) == 2
    assert "drop --engine torch" in capsys.readouterr().err


def test_retraining_with_overwrite_removes_the_export(data, tmp_path, images):
    out = tmp_path / "again"
    args = ["-q", "train", str(data), "--workers", "0", "--out", str(out), *SCRATCH_ARGS, "--epochs", "1"]
    assert main(args) == 0 and main(["-q", "export", str(out)]) == 0
    assert isinstance(open_predictor(out, "auto"), OrtPredictor)
    assert main([*args, "--overwrite"]) == 0
    assert not (out / EXPORT_DIR / "model.onnx").exists()
    assert isinstance(open_predictor(out, "auto"), Predictor)


def test_onnxruntime_predict_never_imports_torch(run, images):
    """The whole command in a fresh interpreter: no torch, torchvision or timm in sys.modules."""
    argv = ["predict", str(run), str(images[0]), "--engine", "onnxruntime", "--format", "csv"]
    script = ("import sys\nfrom imgtune.cli import main\n"
              f"code = main({argv!r})\n"
              "heavy = sorted(m for m in ('torch', 'torchvision', 'timm') if m in sys.modules)\n"
              "print('HEAVY', heavy)\nsys.exit(code)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout
    assert Path(images[0]).name in done.stdout


def test_int8_flag_runs_the_int8_file(run, images, tmp_path, capsys):
    """After ``export --int8``, ``predict --int8`` runs model.int8.onnx: its probabilities are those of
    that file fed by the consumer recipe, and not the fp32 file's."""
    import onnxruntime

    from imgtune.consumer_recipe import preprocess

    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns(EXPORT_DIR, ".imgtune.lock"))
    assert main(["-q", "export", str(copy), "--int8"]) == 0
    int8 = OrtPredictor.from_run(copy, int8=True).probabilities(images)[0]
    fp32 = OrtPredictor.from_run(copy).probabilities(images)[0]
    session = onnxruntime.InferenceSession(str(copy / EXPORT_DIR / "model.int8.onnx"),
                                           providers=["CPUExecutionProvider"])
    pre = json.loads(session.get_modelmeta().custom_metadata_map["preprocessing"])
    batch = np.stack([preprocess(str(path), pre) for path in images])
    direct = session.run(None, {session.get_inputs()[0].name: batch})[0]
    assert np.abs(int8 - direct).max() <= 1e-6
    assert np.abs(int8 - fp32).max() > 0  # the quantised model, not the fp32 one
    rows = predict_json(capsys, copy, *map(str, images), "--int8")
    classes = OrtPredictor.from_run(copy, int8=True).classes
    assert [r["label"] for r in rows] == [classes[i] for i in int8.argmax(1)]
