"""A linear head fitted to convergence on cached features (imgtune.head_fit, --head-fit)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn

from datagen import PRETRAINED_ARGS, make_split_dataset
from imgtune import head_fit
from imgtune.cli import main


def blobs(classes: int, per_class: int, dim: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 2.0, (classes, dim))
    x = np.concatenate([centres[c] + rng.normal(0, 1.5, (per_class, dim)) for c in range(classes)]) * 7 + 3
    y = np.repeat(np.arange(classes), per_class)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


@pytest.mark.parametrize("classes", [2, 3])
def test_the_head_gives_the_fitted_models_probabilities(classes):
    x, y = blobs(classes, 30)
    layer = nn.Linear(x.shape[1], classes)
    info = head_fit.fit_linear_head(layer, x, y, classes, None, seed=0)
    assert info["folds"] == 5 and info["converged"] and info["C"] in head_fit.CS
    assert set(info["cv_log_loss"]) == {f"{c:g}" for c in head_fit.CS}
    losses = info["cv_log_loss"]
    assert info["C"] <= min(head_fit.CS, key=lambda c: losses[f"{c:g}"])  # the best, or a stronger one within
    assert losses[f"{info['C']:g}"] <= min(losses.values()) + 0.1  # one standard error of it
    z = x.double().numpy()
    z = (z - z.mean(0)) / z.std(0)
    reference = LogisticRegression(C=info["C"], max_iter=1000).fit(z, y.numpy()).predict_proba(z)
    with torch.no_grad():
        ours = torch.softmax(layer(x).double(), dim=1).numpy()
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_c_is_the_strongest_within_one_standard_error_of_the_best(monkeypatch):
    """Fold scores made by hand: C 1 has the best mean, C 0.1 is within one standard error of it, C 0.01
    is not; the rule picks 0.1."""
    from sklearn import linear_model

    cs = np.array([0.01, 0.1, 1.0])
    scores = np.array([[-0.50, -0.27, -0.18], [-0.52, -0.29, -0.32], [-0.48, -0.28, -0.25]])  # folds x Cs
    # means 0.50, 0.28, 0.25; C 1's standard error 0.07 / sqrt(3) = 0.04

    class Search:
        def __init__(self, **kwargs):
            pass

        def fit(self, z, y, sample_weight=None):
            self.scores_ = {1: scores}
            return self

    monkeypatch.setattr(head_fit, "CS", cs)
    monkeypatch.setattr(linear_model, "LogisticRegressionCV", Search)
    y = np.repeat([0, 1], 3)
    c, folds, losses = head_fit.choose_c(np.zeros((6, 2)), y, None, seed=0)
    assert folds == 3 and c == 0.1
    assert losses == {"0.01": 0.5, "0.1": 0.28, "1": 0.25}


@pytest.mark.filterwarnings("ignore::FutureWarning")  # scikit-learn's API notices (fit_linear_head hides them)
def test_the_folds_in_threads_give_the_figures_of_one_thread(monkeypatch):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 20)
    z = rng.normal(size=(60, 16)) + y[:, None] * 0.4
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    threaded = head_fit.choose_c(z, y, None, seed=0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert head_fit.choose_c(z, y, None, seed=0) == threaded


def test_few_images_a_missing_class_and_a_dropout_head():
    x, y = blobs(2, 1)
    head = nn.Sequential(nn.Dropout(0.5), nn.Linear(x.shape[1], 3))
    layer = head_fit.linear_layer(head)
    info = head_fit.fit_linear_head(layer, x, y, 3, None, seed=0)
    assert info["folds"] == 0 and info["C"] == 1.0  # one image a class: nothing to cross-validate
    head.eval()
    with torch.no_grad():
        probs = torch.softmax(head(x), dim=1)
    assert probs[:, 2].max() < 1e-6  # class 2 has no training image
    assert probs[:, :2].argmax(1).tolist() == y.tolist()
    assert head_fit.linear_layer(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))) is None


def test_class_weights_move_the_boundary():
    x, y = blobs(2, 40, seed=3)
    keep = torch.cat([torch.arange(40), torch.arange(40, 48)])  # 40 against 8
    probs = {}
    for name, weight in (("none", None), ("balanced", "balanced")):
        layer = nn.Linear(x.shape[1], 2)
        head_fit.fit_linear_head(layer, x[keep], y[keep], 2, weight, seed=0)
        with torch.no_grad():
            probs[name] = torch.softmax(layer(x), dim=1)[:, 1].mean().item()
    assert probs["balanced"] > probs["none"]


def _rows(run) -> list[dict]:
    with open(run / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_linear_probe_fits_the_head_once_sgd_and_mlp_train_epochs(tmp_path, capsys):
    data = make_split_dataset(tmp_path / "data", train=6, val=3)
    common = ["-q", "train", str(data), "--cache-dir", str(tmp_path / "cache"), "--strategy", "linear-probe",
              "--epochs", "3", *PRETRAINED_ARGS]
    assert main([*common, "--out", str(tmp_path / "lbfgs")]) == 0
    (row,) = _rows(tmp_path / "lbfgs")
    assert row["epoch"] == "3" and row["head_fit"] == "lbfgs" and float(row["C"]) in head_fit.CS
    assert row["lr"] == ""
    metrics = json.loads((tmp_path / "lbfgs" / "metrics.json").read_text())
    assert metrics["accuracy"] == pytest.approx(float(row["val_accuracy"]))
    assert main([*common, "--out", str(tmp_path / "sgd"), "--head-fit", "sgd"]) == 0
    assert [r["epoch"] for r in _rows(tmp_path / "sgd")] == ["1", "2", "3"]
    capsys.readouterr()
    assert main([*common[1:], "--out", str(tmp_path / "mlp"), "--head", "mlp"]) == 0
    assert "only a linear head is fitted by L-BFGS" in capsys.readouterr().err
    assert [r["epoch"] for r in _rows(tmp_path / "mlp")] == ["1", "2", "3"]
    gradual = [*common[:6], "gradual", "--epochs", "3", "--freeze-epochs", "2", *PRETRAINED_ARGS]
    assert main([*gradual, "--out", str(tmp_path / "gradual")]) == 0  # auto: SGD epochs before fine-tuning
    assert [(r["epoch"], r["phase"], r.get("head_fit")) for r in _rows(tmp_path / "gradual")] == \
        [("1", "frozen", None), ("2", "frozen", None), ("3", "unfrozen", None)]
    assert main([*gradual, "--out", str(tmp_path / "gradual-lbfgs"), "--head-fit", "lbfgs"]) == 0
    assert [(r["epoch"], r["phase"], r["head_fit"]) for r in _rows(tmp_path / "gradual-lbfgs")] == \
        [("2", "frozen", "lbfgs"), ("3", "unfrozen", "")]
