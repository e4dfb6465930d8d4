"""``imgtune evaluate`` and ``imgtune predict`` (and the Python API) on one tiny trained run."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import imgtune
from datagen import CLASSES, SCRATCH_ARGS, make_class_folders, make_split_dataset, write_images, write_unreadable
from imgtune.cli import main, output

CLASS_NAMES = sorted(CLASSES)
VAL_PER_CLASS = 5


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_split_dataset(tmp_path_factory.mktemp("data"), train=10, val=VAL_PER_CLASS)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["-q", "train", str(data), *SCRATCH_ARGS, "--epochs", "2", "--workers", "0",
                 "--out", str(out)]) == 0
    return out


def cli_json(capsys, argv: list[str], code: int = 0):
    assert main(argv) == code
    return json.loads(capsys.readouterr().out)


def test_evaluate_prints_metrics_and_writes_confusion_matrix(run, capsys):
    assert main(["evaluate", str(run)]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "macro_f1" in out and "confusion matrix" in out
    with (run / "confusion_matrix_val.csv").open(newline="") as handle:
        header, *rows = list(csv.reader(handle))
    assert header[1:] == CLASS_NAMES and [r[0] for r in rows] == CLASS_NAMES
    assert sum(int(v) for r in rows for v in r[1:]) == VAL_PER_CLASS * len(CLASSES)
    for r in rows:  # each row holds the images of one true class
        assert sum(int(v) for v in r[1:]) == VAL_PER_CLASS
    png = run / "confusion_matrix_val.png"
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(png) as image:
        image.verify()
    assert json.loads((run / "evaluation_val.json").read_text())["n"] == VAL_PER_CLASS * len(CLASSES)


def test_evaluate_json_has_confidence_intervals(run, capsys):
    report = cli_json(capsys, ["evaluate", str(run), "--format", "json"])
    assert report["split"] == "val" and report["n"] == VAL_PER_CLASS * len(CLASSES)
    for key in ("accuracy", "macro_f1"):
        lower, upper = report["ci95"][key]
        assert 0 <= lower <= report[key] <= upper <= 1
    assert list(report["per_class"]) == CLASS_NAMES
    for row in report["per_class"].values():
        for key in ("precision", "recall", "f1"):
            lower, upper = row["ci95"][key]
            assert 0 <= lower <= row[key] <= upper <= 1
    assert sum(map(sum, report["confusion_matrix"])) == report["n"]


def test_evaluate_other_data_uses_its_test_split(run, tmp_path, capsys):
    other = make_split_dataset(tmp_path / "other", train=2, val=2, test=3, seed=5)
    report = cli_json(capsys, ["evaluate", str(run), str(other), "--format", "json"])
    assert (report["split"], report["data"], report["n"]) == ("test", str(other), 3 * len(CLASSES))


def test_evaluate_other_data_without_splits_uses_all(run, tmp_path, capsys):
    other = make_class_folders(tmp_path / "other", classes=("red_circle", "blue_triangle"), per_class=3)
    report = cli_json(capsys, ["evaluate", str(run), str(other), "--format", "json"])
    assert (report["split"], report["n"]) == ("all", 6)
    assert report["per_class"]["green_square"]["support"] == 0


def test_evaluate_data_with_unknown_class_is_exit_3(run, tmp_path, capsys):
    other = make_class_folders(tmp_path / "other", classes=("red_circle",), per_class=2)
    write_images(other / "purple_star", "blue_triangle", 2, np.random.default_rng(0))
    assert main(["evaluate", str(run), str(other)]) == 3
    err = capsys.readouterr().err
    assert "purple_star" in err and "not trained on" in err


def test_predict_table(run, data, capsys, monkeypatch):
    monkeypatch.setattr(output.console, "width", 200)  # no wrapping of long tmp paths
    folder = data / "val" / "red_circle"
    assert main(["predict", str(run), str(folder)]) == 0
    out = capsys.readouterr().out
    assert "top 1" in out and "top 3" in out and "top 4" not in out
    for image in folder.iterdir():
        assert str(image) in out


def test_predict_csv(run, data, capsys):
    assert main(["predict", str(run), str(data / "val"), "--format", "csv", "--top-k", "2"]) == 0
    header, *rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert header == ["path", "label1", "prob1", "label2", "prob2", "error"]
    assert len(rows) == VAL_PER_CLASS * len(CLASSES)
    for row in rows:
        assert row[1] in CLASS_NAMES and row[3] in CLASS_NAMES and row[1] != row[3]
        assert 1 >= float(row[2]) >= float(row[4]) >= 0
        assert row[5] == ""


def test_predict_json_probabilities_sum_to_one(run, data, capsys):
    results = cli_json(capsys, ["predict", str(run), str(data / "val"), "--format", "json",
                                "--top-k", str(len(CLASSES))])
    assert len(results) == VAL_PER_CLASS * len(CLASSES)
    for row in results:
        assert sorted(t["label"] for t in row["top"]) == CLASS_NAMES
        assert sum(t["prob"] for t in row["top"]) == pytest.approx(1.0, abs=1e-5)
        assert (row["label"], row["prob"]) == (row["top"][0]["label"], row["top"][0]["prob"])


def test_predict_folder_and_files(run, data, capsys):
    folder = data / "val" / "green_square"
    extra = sorted((data / "train" / "blue_triangle").iterdir())[:2]
    results = cli_json(capsys, ["predict", str(run), str(folder), *map(str, extra), "--format", "json"])
    expected = sorted(map(str, folder.iterdir())) + list(map(str, extra))
    assert [r["path"] for r in results] == expected
    assert all("error" not in r for r in results)


def test_unreadable_file_gives_error_row_and_exit_3(run, data, tmp_path, capsys):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    good = sorted((data / "val" / "red_circle").iterdir())[:2]
    for image in good:
        shutil.copy(image, mixed / image.name)
    broken = write_unreadable(mixed / "broken.jpg")
    missing = tmp_path / "missing.png"
    results = cli_json(capsys, ["predict", str(run), str(mixed), str(missing), "--format", "json"], code=3)
    by_path = {r["path"]: r for r in results}
    assert len(by_path) == 4
    assert "label" not in by_path[str(broken)] and by_path[str(broken)]["error"]
    assert by_path[str(missing)]["error"]
    for image in good:
        assert by_path[str(mixed / image.name)]["label"] in CLASS_NAMES
    assert main(["predict", str(run), str(broken), str(mixed / good[0].name), "--format", "csv"]) == 3
    captured = capsys.readouterr()
    assert "1 of 2 file(s) could not be read" in captured.err
    rows = list(csv.DictReader(io.StringIO(captured.out)))
    assert rows[0]["error"] and not rows[0]["label1"]
    assert rows[1]["label1"] in CLASS_NAMES and not rows[1]["error"]


def test_python_api_matches_cli(run, data, capsys):
    paths = sorted((data / "val" / "blue_triangle").iterdir())
    cli = cli_json(capsys, ["predict", str(run), *map(str, paths), "--format", "json", "--top-k", "3"])
    api = imgtune.load(run, device="cpu").predict(paths, top_k=3)
    assert [p.to_dict()["path"] for p in api] == [r["path"] for r in cli]
    for prediction, row in zip(api, cli):
        assert prediction.labels == [t["label"] for t in row["top"]]
        assert prediction.probs == pytest.approx([t["prob"] for t in row["top"]], abs=1e-6)


def test_bootstrap_scores_match_scikit_learn():
    """The vectorised bootstrap gives, resample by resample, scikit-learn's accuracy and per-class
    precision, recall and F1 (whose mean is the macro F1)."""
    from sklearn.metrics import precision_recall_fscore_support

    from imgtune.metrics import rowwise_scores

    rng = np.random.default_rng(0)
    true = rng.integers(0, 4, (40, 9))
    pred = np.where(rng.random(true.shape) < 0.6, true, rng.integers(0, 4, true.shape))
    accuracy, precision, recall, f1 = rowwise_scores(true, pred, 4)
    assert precision.shape == recall.shape == f1.shape == (40, 4)
    for i in range(len(true)):
        assert accuracy[i] == (true[i] == pred[i]).mean()
        expected = precision_recall_fscore_support(true[i], pred[i], labels=range(4), zero_division=0)[:3]
        for ours, theirs in zip((precision[i], recall[i], f1[i]), expected):
            np.testing.assert_allclose(ours, theirs, atol=1e-12)


def files_of(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir() if p.is_file()}


def test_evaluate_computes_and_writes_nothing(run, tmp_path):
    """``evaluate`` returns data only; ``write_evaluation`` writes exactly the documented files."""
    from imgtune import evaluation

    before = files_of(run)
    other = make_split_dataset(tmp_path / "other", train=1, val=2, seed=8)
    own = imgtune.evaluate(run, device="cpu")
    evaluation.evaluate(run, str(other), device="cpu")
    assert files_of(run) == before
    assert own.report["n"] == VAL_PER_CLASS * len(CLASSES) and len(own.images) == own.probs.shape[0]
    for name in ("evaluation_val.json", "confusion_matrix_val.csv", "confusion_matrix_val.png", "reliability_val.png"):
        (run / name).unlink(missing_ok=True)
    files = imgtune.write_evaluation(own)
    assert sorted(p.name for p in files.values()) == ["confusion_matrix_val.csv", "confusion_matrix_val.png",
                                                     "evaluation_val.json", "reliability_val.png"]
    assert set(files_of(run)) - set(before) <= {p.name for p in files.values()}
    assert json.loads(files["json"].read_text())["n"] == own.report["n"]


def test_evaluate_other_data_keeps_the_runs_own_evaluation(run, tmp_path, capsys):
    """Other data's files are named by the data too: the run's own evaluation_val.json survives, and
    every file still matches artifact.EVALUATION_FILES (removed on --overwrite and --resume)."""
    import fnmatch

    from imgtune import artifact
    from imgtune.evaluation import data_tag

    assert main(["-q", "evaluate", str(run)]) == 0
    own = {name: data for name, data in files_of(run).items() if name.startswith(("evaluation_", "confusion_",
                                                                                      "reliability_"))}
    other = make_split_dataset(tmp_path / "other", train=1, val=2, seed=9)
    assert main(["-q", "evaluate", str(run), str(other), "--split", "val"]) == 0
    after = files_of(run)
    assert {name: after[name] for name in own} == own
    tag = data_tag(other)
    assert tag.startswith("other-") and len(tag) == len("other-") + 8 and data_tag(str(other) + "/") == tag
    written = json.loads((run / f"evaluation_val_{tag}.json").read_text())
    assert (written["split"], written["data"], written["n"]) == ("val", str(other), 2 * len(CLASSES))
    new = set(after) - set(own) - {"report.html"}
    assert {f"confusion_matrix_val_{tag}.csv", f"confusion_matrix_val_{tag}.png", f"reliability_val_{tag}.png"} < new
    for name in new | set(own):
        if name.startswith(("evaluation_", "confusion_", "reliability_")):
            assert any(fnmatch.fnmatch(name, pattern) for pattern in artifact.EVALUATION_FILES), name
    capsys.readouterr()


def test_predictor_takes_image_references(run, data):
    """A file named by path, by ImageRef, or held in memory (as shards are) gives the same prediction."""
    from imgtune.data import ImageRef

    path = sorted((data / "val" / "red_circle").iterdir())[0]
    predictor = imgtune.load(run, device="cpu")
    in_memory = ImageRef.in_memory(path.read_bytes(), "shard-0/red.png")
    by_path, by_ref, held = predictor.predict([path, ImageRef.file(path), in_memory])
    assert by_path.path == by_ref.path == str(path) and held.path == "shard-0/red.png"
    assert by_path.probs == pytest.approx(by_ref.probs) and by_path.probs == pytest.approx(held.probs)
    probs, errors = predictor.probabilities([in_memory, in_memory])  # each read starts at the beginning
    assert errors == [None, None] and np.allclose(probs[0], probs[1])
