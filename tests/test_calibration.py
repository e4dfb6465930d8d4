"""Calibration: ECE and the reliability table on hand-computed cases, temperature scaling on synthetic
over-confident and calibrated models, cross-fitting that never measures where it fitted, and the run
folder's calibration.json, ``predict --calibrated`` and ``--log tensorboard`` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.special import softmax

from datagen import CLASSES, SCRATCH_ARGS, make_split_dataset
from imgtune import calibration
from imgtune.cli import main

CLASS_NAMES = sorted(CLASSES)

# ---- ECE and the reliability table -------------------------------------------------------------


def test_ece_by_hand():
    # 15 bins of width 1/15 = 0.0667; top-label confidence, true class 0 throughout:
    #   [0.95, 0.05, 0]    conf 0.95 right -> bin 14 (0.933, 1]
    #   [0.08, 0.92, 0]    conf 0.92 wrong -> bin 13 (0.867, 0.933]
    #   [0.55, 0.45, 0]    conf 0.55 right -> bin 8  (0.533, 0.6]
    #   [0.45, 0, 0.55]    conf 0.55 wrong -> bin 8
    #   [0.30, 0.28, 0.42] conf 0.42 wrong -> bin 6  (0.4, 0.467]
    # bin gaps |acc - conf|: 14: |1 - 0.95| = 0.05; 13: |0 - 0.92| = 0.92; 8: |0.5 - 0.55| = 0.05 (2 images);
    # 6: |0 - 0.42| = 0.42.  ECE = (0.05 + 0.92 + 2 * 0.05 + 0.42) / 5 = 0.298
    probs = np.array([[0.95, 0.05, 0.0], [0.08, 0.92, 0.0], [0.55, 0.45, 0.0], [0.45, 0.0, 0.55],
                      [0.30, 0.28, 0.42]])
    y = np.zeros(5, dtype=int)
    assert calibration.expected_calibration_error(probs, y) == pytest.approx(0.298)
    table = calibration.reliability(probs, y)
    assert table.count.tolist() == [0] * 6 + [1, 0, 2, 0, 0, 0, 0, 1, 1]
    assert table.confidence[8] == pytest.approx(0.55) and table.accuracy[8] == pytest.approx(0.5)
    assert np.isnan(table.accuracy[0]) and table.to_dict()["accuracy"][0] is None


def test_bin_edges_are_lo_exclusive_hi_inclusive():
    # 5 bins (0, 0.2], (0.2, 0.4], ...: 0 joins the first bin, a confidence on an edge the bin below it
    assert np.linspace(0, 1, 6)[2] == 0.4
    assert calibration.bin_index(np.array([0.0, 0.2, 0.2000001, 0.4, 0.99, 1.0]), 5).tolist() == [0, 0, 1, 1, 4, 4]
    # confidences 0.4 (wrong), 0.4 (right), 0.5 (wrong). With 0.4 in (0.2, 0.4]: bin 1 gap |0.5 - 0.4| = 0.1
    # for two images, bin 2 gap |0 - 0.5| = 0.5 for one: ECE = (2 * 0.1 + 0.5) / 3 = 0.2333. (Had the edge
    # gone up, all three in bin 2: |1/3 - 0.4333| = 0.1.)
    probs = np.array([[0.4, 0.3, 0.3], [0.3, 0.4, 0.3], [0.5, 0.25, 0.25]])
    y = np.array([1, 1, 2])
    assert calibration.reliability(probs, y, n_bins=5).count.tolist() == [0, 2, 1, 0, 0]
    assert calibration.expected_calibration_error(probs, y, n_bins=5) == pytest.approx(0.7 / 3)


def test_perfect_and_worst_cases():
    one_hot = np.eye(3)[[0, 1, 2, 0]]
    assert calibration.expected_calibration_error(one_hot, np.array([0, 1, 2, 0])) == 0.0
    assert calibration.expected_calibration_error(one_hot, np.array([1, 2, 0, 1])) == 1.0


@pytest.mark.parametrize("n_bins", [1, 10, 15])
def test_reliability_table_sums_to_n(n_bins):
    rng = np.random.default_rng(n_bins)
    probs = rng.dirichlet(np.ones(4), 137)
    y = rng.integers(0, 4, 137)
    table = calibration.reliability(probs, y, n_bins)
    assert table.n == 137 and len(table.count) == n_bins and len(table.edges) == n_bins + 1
    full = table.count > 0
    assert np.sum(table.count[full] * table.accuracy[full]) == pytest.approx((probs.argmax(1) == y).sum())
    assert np.sum(table.count[full] * table.confidence[full]) == pytest.approx(probs.max(1).sum())


# ---- temperature scaling -----------------------------------------------------------------------


def synthetic(n: int, seed: int, classes: int = 5, spread: float = 2.5) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated by construction: each label is drawn from the softmax of its logits (~70% top-1)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, spread, (n, classes))
    cumulative = softmax(logits, axis=1).cumsum(axis=1)
    labels = (rng.random((n, 1)) > cumulative).sum(axis=1)
    return logits, np.minimum(labels, classes - 1)


def test_temperature_is_one_for_calibrated_data():
    logits, y = synthetic(4000, seed=1)
    assert calibration.fit_temperature(logits, y) == pytest.approx(1.0, abs=0.08)


def test_temperature_softens_an_over_confident_model_on_held_out_data():
    logits, y = synthetic(4000, seed=2)
    probs = softmax(8 * logits, axis=1)  # right ~70% of the time, but ~0.96 confident on average
    assert 0.65 < (probs.argmax(1) == y).mean() < 0.75 and probs.max(1).mean() > 0.95
    fit, held = slice(0, 2000), slice(2000, None)
    temperature = calibration.fit_temperature(calibration.logits_from_probs(probs[fit]), y[fit])
    assert temperature > 4  # 8 with the exact logits; less after probabilities clipped at 1e-12
    before = calibration.expected_calibration_error(probs[held], y[held])
    after = calibration.expected_calibration_error(
        calibration.scale(calibration.logits_from_probs(probs[held]), temperature), y[held])
    assert before > 0.2 and after < before / 4
    report = calibration.assess(probs[fit], y[fit], probs[held], y[held])
    assert report["assessed_on"] == "test" and report["n_assessed"] == 2000
    assert report["ece_after"] < report["ece_before"] / 4 and report["nll_after"] < report["nll_before"]


def test_scaling_keeps_predictions():
    logits, _ = synthetic(200, seed=3)
    assert (calibration.scale(logits, 3.7).argmax(1) == logits.argmax(1)).all()


def test_temperature_from_probabilities_equals_from_logits():
    logits, y = synthetic(500, seed=4)
    from_probs = calibration.fit_temperature(calibration.logits_from_probs(softmax(2 * logits, axis=1)), y)
    assert from_probs == pytest.approx(calibration.fit_temperature(2 * logits, y), rel=1e-4)


# ---- cross-fitting -----------------------------------------------------------------------------


def test_stratified_halves_are_disjoint_balanced_and_seeded():
    y = np.array([0] * 7 + [1] * 4 + [2] * 1)
    a, b = calibration.stratified_halves(y, seed=0)
    assert sorted([*a, *b]) == list(range(12)) and not set(a) & set(b)
    for c in (0, 1):
        assert abs(np.sum(y[a] == c) - np.sum(y[b] == c)) <= 1
    assert [x.tolist() for x in calibration.stratified_halves(y, 0)] == [a.tolist(), b.tolist()]
    assert [x.tolist() for x in calibration.stratified_halves(y, 1)] != [a.tolist(), b.tolist()]


def test_cross_fitting_never_measures_where_it_fitted():
    """A spy fit remembers which images (rows tagged by a unique first logit) it saw and returns a
    temperature of its own; every image must be scaled by the temperature of the other half."""
    rng = np.random.default_rng(5)
    n = 40
    logits = np.column_stack([np.arange(n) / 100.0, rng.normal(size=(n, 2))])
    y = rng.integers(0, 3, n)
    seen: list[set[int]] = []

    def spy(fit_logits, fit_y):
        seen.append({int(round(v * 100)) for v in fit_logits[:, 0]})
        return [2.0, 5.0][len(seen) - 1]

    calibrated, temperatures, halves = calibration.cross_fit(logits, y, seed=0, fit=spy)
    assert temperatures == [2.0, 5.0] and len(seen) == 2
    assert seen[0] == set(halves[0].tolist()) and seen[1] == set(halves[1].tolist())
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(n))
    for i in range(n):
        t = 5.0 if i in seen[0] else 2.0  # fitted on the half without i
        assert calibrated[i] == pytest.approx(softmax(logits[i] / t))


def test_assess_without_test_split_cross_fits_on_val():
    logits, y = synthetic(600, seed=6)
    report = calibration.assess(softmax(6 * logits, axis=1), y, seed=0)
    assert report["assessed_on"].startswith("val, 2-fold cross-fitting") and report["n_assessed"] == 600
    assert len(report["fold_temperatures"]) == 2 and report["temperature"] > 3
    assert report["ece_after"] < report["ece_before"] / 3
    assert calibration.assess(np.zeros((0, 3)), np.zeros(0, dtype=int)) is None


# ---- end to end: the run folder, evaluate, predict --calibrated, --log tensorboard -------------


def train(data: Path, out: Path, *args: str) -> int:
    return main(["-q", "train", str(data), *SCRATCH_ARGS, "--workers", "0", "--device", "cpu", "--out", str(out),
                 *args])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_split_dataset(tmp_path_factory.mktemp("data"), train=10, val=5, test=4)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    tensorboard = "tensorboard" if _has_tensorboard() else "csv"
    assert train(data, out, "--epochs", "2", "--log", tensorboard) == 0
    return out


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def cli_json(capsys, argv: list[str], code: int = 0):
    assert main(argv) == code
    return json.loads(capsys.readouterr().out)


def test_run_stores_calibration(run):
    stored = json.loads((run / "calibration.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["calibration"] == stored
    assert stored["temperature"] > 0 and (stored["fitted_on"], stored["n_fit"]) == ("val", 15)
    assert (stored["assessed_on"], stored["n_assessed"]) == ("test", 12)  # the test split, not val
    assert 0 <= stored["ece_before"] <= 1 and 0 <= stored["ece_after"] <= 1


def test_run_without_test_split_cross_fits(tmp_path):
    data = make_split_dataset(tmp_path / "data", train=6, val=4)
    assert train(data, tmp_path / "run", "--epochs", "1") == 0
    stored = json.loads((tmp_path / "run" / "metrics.json").read_text())["calibration"]
    assert stored["assessed_on"].startswith("val, 2-fold cross-fitting") and stored["n_assessed"] == 12
    assert len(stored["fold_temperatures"]) == 2


def test_evaluate_reports_ece_and_writes_reliability_diagram(run, capsys):
    report = cli_json(capsys, ["evaluate", str(run), "--split", "test", "--device", "cpu", "--format", "json"])
    found = report["calibration"]
    assert found["temperature"] == json.loads((run / "calibration.json").read_text())["temperature"]
    assert found["ece"] == pytest.approx(json.loads((run / "calibration.json").read_text())["ece_before"], abs=1e-5)
    assert sum(found["reliability"]["count"]) == report["n"] == 12
    assert (run / "reliability_test.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert main(["evaluate", str(run), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "ECE (15 bins)" in out and "in-sample" in out  # val: where T was fitted


def predicted(capsys, run: Path, paths: list[Path], *args: str) -> np.ndarray:
    """Probabilities from ``imgtune predict``, one row per path, columns in class order."""
    rows = cli_json(capsys, ["predict", str(run), *map(str, paths), "--format", "json", "--top-k", "3",
                             "--device", "cpu", *args])
    return np.array([[next(t["prob"] for t in row["top"] if t["label"] == name) for name in CLASS_NAMES]
                     for row in rows])


def test_predict_calibrated_is_temperature_scaled(run, data, tmp_path, capsys):
    paths = sorted((data / "test").rglob("*.png"))
    plain = predicted(capsys, run, paths)
    temperature = json.loads((run / "calibration.json").read_text())["temperature"]
    expected = softmax(np.log(np.clip(plain, 1e-12, 1)) / temperature, axis=1)
    assert predicted(capsys, run, paths, "--calibrated") == pytest.approx(expected, abs=1e-4)
    # with a temperature that moves the probabilities a lot (the tiny run's may sit at a bound)
    (run / "calibration.json").rename(tmp_path / "saved.json")
    try:
        (run / "calibration.json").write_text(json.dumps({"temperature": 2.5}))
        scaled = predicted(capsys, run, paths, "--calibrated")
    finally:
        (tmp_path / "saved.json").replace(run / "calibration.json")
    assert scaled == pytest.approx(softmax(np.log(np.clip(plain, 1e-12, 1)) / 2.5, axis=1), abs=1e-5)
    assert not np.allclose(scaled, plain, atol=1e-3)
    assert (scaled.argmax(1) == plain.argmax(1)).all()


def test_predict_calibrated_without_calibration_is_a_clear_error(run, data, tmp_path, capsys):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(run, old)
    (old / "calibration.json").unlink()  # as a run folder written before calibration existed
    image = next((data / "test").rglob("*.png"))
    assert main(["predict", str(old), str(image), "--calibrated", "--device", "cpu"]) == 3
    err = capsys.readouterr().err
    assert "no calibration.json" in err and "--resume" in err
    assert main(["predict", str(old), str(image), "--device", "cpu"]) == 0  # without --calibrated: fine
    capsys.readouterr()
    import imgtune
    from imgtune.errors import DataError

    with pytest.raises(DataError, match="no calibration.json"):
        imgtune.load(old, device="cpu", calibrated=True)
    assert imgtune.load(run, device="cpu", calibrated=True).temperature == pytest.approx(
        json.loads((run / "calibration.json").read_text())["temperature"])


def test_tensorboard_event_files_hold_the_epoch_scalars(run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert files
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/accuracy", "val/loss", "val/accuracy", "val/macro_f1", "lr"} <= tags
    import csv

    with (run / "metrics.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    loss = events.Scalars("val/loss")
    assert [e.step for e in loss] == [1, 2]
    assert [e.value for e in loss] == pytest.approx([float(r["val_loss"]) for r in rows], rel=1e-5)


def test_log_tensorboard_without_the_package_is_a_usage_error(data, tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    out = tmp_path / "run"
    assert train(data, out, "--epochs", "1", "--log", "tensorboard") == 2
    assert "pip install 'imgtune[tensorboard]'" in capsys.readouterr().err
    assert not out.exists()  # refused before the run folder was created
