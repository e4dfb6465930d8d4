"""Semi-supervised training (imgtune.semi, imgtune.semi_train, data/unlabelled.py, train --unlabeled)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from datagen import PRETRAINED_ARGS, make_split_dataset, write_images, write_unreadable
from imgtune import head_fit, semi
from imgtune.cli import main
from imgtune.config import build, resolve
from imgtune.data.scan import load_splits
from imgtune.data.unlabelled import open_unlabelled
from imgtune.errors import DataError, UsageError


def _clusters(seed: int, classes: int = 3, per_class: int = 80, dim: int = 50, separation: float = 6.0):
    """Gaussian clusters whose centres are ``separation`` apart in 50 dimensions: with 4 labelled points a
    class a linear head cannot tell the class direction from the noise; the unlabelled points show it."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (classes, dim))
    centres *= separation / np.sqrt(2) / np.linalg.norm(centres, axis=1, keepdims=True)
    y = np.repeat(np.arange(classes), per_class)
    x = centres[y] + rng.normal(0, 1, (len(y), dim))
    labelled = np.concatenate([rng.choice(np.flatnonzero(y == c), 4, replace=False) for c in range(classes)])
    rest = rng.permutation(np.setdiff1d(np.arange(len(y)), labelled))
    return x, y, labelled, rest[:150], rest[150:]


def _accuracy(x, y, train, test, extra=None, labels=None, weight=0.5) -> float:
    xs, ys, ws = x[train], y[train], np.ones(len(train))
    if extra is not None:
        xs, ys = np.vstack([xs, extra]), np.concatenate([ys, labels])
        ws = np.concatenate([ws, np.full(len(labels), weight)])
    return LogisticRegression(max_iter=1000).fit(xs, ys, sample_weight=ws).score(x[test], y[test])


@pytest.mark.parametrize("seed", [1, 2])
def test_label_spreading_uses_the_clusters_the_labelled_images_do_not_show(seed):
    x, y, labelled, unlabelled, test = _clusters(seed)
    choice = semi.choose(x[labelled], y[labelled], x[unlabelled], 3, "label-spreading", 0.5, seed)
    assert choice.method == "label-spreading" and choice.threshold in semi.THRESHOLDS
    keep = choice.labels >= 0
    assert keep.sum() >= 100 and (choice.labels[keep] == y[unlabelled][keep]).mean() >= 0.95
    assert choice.holdout["with_pseudo_labels"]["accuracy"] > choice.holdout["labelled_only"]["accuracy"]
    supervised = _accuracy(x, y, labelled, test)
    with_pseudo = _accuracy(x, y, labelled, test, x[unlabelled][keep], choice.labels[keep])
    assert with_pseudo > supervised + 0.01
    estimated = choice.precision.right.sum() / choice.precision.taken.sum()
    assert estimated >= 0.9  # measured on hidden labelled points, not on the unlabelled ones' truth


def test_pseudo_labels_that_hurt_the_hold_out_are_not_used(monkeypatch):
    """Label spreading made to give every image the wrong class, confidently: the hidden labelled images
    get worse, so no pseudo-label is used and the reason says why."""
    x, y, labelled, unlabelled, _ = _clusters(1)
    truth = np.concatenate([y[labelled], y[unlabelled]])
    where = {tuple(row): int(label) for row, label in zip(semi._unit(np.vstack([x[labelled], x[unlabelled]])), truth)}

    def wrong(self, train, others):
        return np.array([(where[tuple(row)] + 1) % 3 for row in others]), np.ones(len(others))

    monkeypatch.setattr(semi._Data, "spread", wrong)
    choice = semi.choose(x[labelled], y[labelled], x[unlabelled], 3, "label-spreading", 0.5, 1)
    assert choice.method == "none" and (choice.labels == -1).all()
    assert "did not raise the accuracy of the labelled images alone" in choice.reason
    assert choice.holdout["with_pseudo_labels"]["accuracy"] < choice.holdout["labelled_only"]["accuracy"]


def test_without_a_hold_out_or_when_not_asked_nothing_is_pseudo_labelled():
    x, y, labelled, unlabelled, _ = _clusters(1)
    single = semi.choose(x[labelled[[0, 4, 5, 8, 9]]], y[labelled[[0, 4, 5, 8, 9]]], x[unlabelled], 3,
                         "label-spreading", 0.5, 0)
    assert single.method == "none" and "single labelled training image" in single.reason
    assert semi.choose(x[labelled], y[labelled], x[unlabelled], 3, "none", 0.5, 0).reason == semi.NOT_ASKED


@pytest.mark.slow
def test_self_training_stops_when_the_hold_out_stops_improving():
    x, y, labelled, unlabelled, _ = _clusters(2)
    choice = semi.choose(x[labelled], y[labelled], x[unlabelled], 3, "self-training", 0.5, 2)
    assert choice.method == "self-training" and 1 <= choice.rounds <= semi.MAX_ROUNDS
    by_threshold = {}
    for row in choice.holdout["tried"]:
        by_threshold.setdefault(row["threshold"], []).append(row)
    assert set(by_threshold) == set(semi.THRESHOLDS)  # one kept setting per threshold


def test_head_fit_sample_weights_count_as_repeats(monkeypatch):
    """A weight of 2 on a row fits (and standardises) the same head as that row given twice, at the same C
    (one C to choose from: the folds that choose it differ between 24 weighted rows and 27 rows)."""
    monkeypatch.setattr(head_fit, "CS", np.array([1.0]))
    rng = np.random.default_rng(0)
    x = torch.tensor(np.vstack([rng.normal(-1, 1, (12, 5)), rng.normal(1, 1, (12, 5))]))
    y = torch.tensor(np.repeat([0, 1], 12))
    weights = torch.ones(24)
    weights[:3] = 2.0
    twice = torch.nn.Linear(5, 2)
    weighted = torch.nn.Linear(5, 2)
    head_fit.fit_linear_head(weighted, x, y, 2, None, 0, weights)
    head_fit.fit_linear_head(twice, torch.cat([x, x[:3]]), torch.cat([y, y[:3]]), 2, None, 0)
    probe = torch.tensor(rng.normal(0, 1, (10, 5)))
    with torch.no_grad():
        assert torch.allclose(torch.softmax(weighted(probe.float()), 1), torch.softmax(twice(probe.float()), 1),
                              atol=1e-3)  # ignoring the weights differs by 0.02


def test_semi_options_are_checked():
    assert resolve(build("data", unlabeled="pool")).train.semi == "label-spreading"
    assert resolve(build("data")).train.semi is None
    with pytest.raises(UsageError, match="--semi self-training needs --unlabeled"):
        resolve(build("data", semi="self-training"))
    with pytest.raises(UsageError, match="pseudo_weight"):
        resolve(build("data", unlabeled="pool", pseudo_weight=1.5))


def _pool(tmp_path, data):
    rng = np.random.default_rng(9)
    for name in ("red_circle", "green_square", "blue_triangle"):
        write_images(tmp_path / "pool" / name, name, 5, rng)
    shutil.copy(sorted((data / "val" / "green_square").glob("*"))[0], tmp_path / "pool" / "copy_of_val.png")
    shutil.copy(sorted((data / "train" / "red_circle").glob("*"))[0], tmp_path / "pool" / "labelled.png")
    write_unreadable(tmp_path / "pool" / "broken.jpg")
    return tmp_path / "pool"


def test_unlabelled_folder_checks(tmp_path, caplog):
    data = make_split_dataset(tmp_path / "data", train=3, val=2)
    splits = load_splits(data, progress=False)
    found = open_unlabelled(_pool(tmp_path, data), splits, progress=False)
    assert len(found.samples) == 15 and found.labelled == 1
    assert [p.rsplit("/", 1)[1] for p, _, _ in found.leaking] == ["copy_of_val.png"]
    assert found.skipped[0][0].endswith("broken.jpg")
    assert "copy_of_val.png: a copy of" in caplog.text and "val split" in caplog.text
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="--unlabeled .*empty holds no image files"):
        open_unlabelled(tmp_path / "empty", splits, progress=False)
    write_unreadable(tmp_path / "bad" / "a.png")
    with pytest.raises(DataError, match="none of its 1 image file"):
        open_unlabelled(tmp_path / "bad", splits, progress=False)
    (tmp_path / "leaks").mkdir()
    shutil.copy(tmp_path / "pool" / "copy_of_val.png", tmp_path / "leaks" / "x.png")
    with pytest.raises(DataError, match="none of its 1 readable image"):
        open_unlabelled(tmp_path / "leaks", splits, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["linear-probe", "gradual"])
def test_train_with_unlabelled_images_writes_its_pseudo_labels(tmp_path, strategy, capsys):
    data = make_split_dataset(tmp_path / "data", train=3, val=2)
    pool = _pool(tmp_path, data)
    run = tmp_path / "run"
    epochs = ("--epochs", "2", "--freeze-epochs", "1") if strategy == "gradual" else ()
    assert main(["train", str(data), "--unlabeled", str(pool), "--out", str(run), "--strategy", strategy, *epochs,
                 "--cache-dir", str(tmp_path / "cache"), *PRETRAINED_ARGS]) == 0
    err = capsys.readouterr().err
    assert "copy_of_val.png: a copy of" in err and "broken.jpg" in err and "semi-supervised: " in err
    found = json.loads((run / "metrics.json").read_text())["semi"]
    assert found["requested"] == "label-spreading" and found["unlabelled"]["images"] == 15
    assert found["unlabelled"]["skipped_leaking"][0]["path"].endswith("copy_of_val.png")
    if found["used"] == "label-spreading":
        assert found["pseudo_labels_total"] == sum(found["pseudo_labels"].values()) > 0
        assert 0 <= found["estimated_precision"]["overall"] <= 1
    else:
        assert found["pseudo_labels_total"] == 0 and "did not raise the accuracy" in found["reason"]
    if strategy == "linear-probe":
        assert main(["report", str(run)]) == 0
        html = (run / "report.html").read_text()
        assert 'id="semi"' in html and "copy_of_val.png" in html


def test_pseudo_labelled_images_join_the_training_split_with_their_weight(tmp_path):
    """What both the fitted head and the epochs that train the whole model read: the training split with
    the pseudo-labelled images appended, drawn by a sampler that weighs them ``weight``."""
    from imgtune.data.sources import FolderSource, LoaderOptions, train_sampler
    from imgtune.semi_train import _add

    data = make_split_dataset(tmp_path / "data", train=3, val=2)
    source = FolderSource(load_splits(data, progress=False), str(data))
    pool = open_unlabelled(_pool(tmp_path, data), source.splits, progress=False).samples
    labels = np.array([i % 3 if i < 6 else -1 for i in range(len(pool))])
    added = _add(source, pool, semi.Choice("label-spreading", labels, np.ones(len(pool)), "test"), 0.25)
    train = added.splits.split("train")
    assert len(train) == 9 + 6 and [s.label for s in train[9:]] == [source.classes[i % 3] for i in range(6)]
    assert source.splits.split("train") == train[:9]  # the labelled data (meta.json, resume) is unchanged
    options = LoaderOptions(4, 0, 0, False, None)
    targets = torch.tensor([source.classes.index(s.label) for s in train])
    sampler = train_sampler(added, targets, torch.arange(len(train)), options)
    assert sampler.weights.tolist() == [1.0] * 9 + [0.25] * 6
    balanced = train_sampler(added, targets, torch.arange(len(train)), LoaderOptions(4, 0, 0, True, None))
    assert balanced.weights[9:].sum() < balanced.weights[:9].sum()
    assert train_sampler(source, targets[:9], torch.arange(9), options) is None
