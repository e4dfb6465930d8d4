"""Class imbalance (``--balance``): the ratio and the automatic choice, class weights against
scikit-learn, the class-balanced sampler, and training runs that choose, save and log the treatment.
Tiny generated images; a small CNN from scratch, and the real MobileNetV2 on cached features."""

from __future__ import annotations

import csv
import json
import logging
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.utils.class_weight import compute_class_weight

import imgtune
from datagen import CLASSES, PRETRAINED_ARGS, SCRATCH_ARGS, write_images
from imgtune import balance, config
from imgtune.cli import main
from imgtune.config import IMBALANCE_THRESHOLD
from imgtune.errors import UsageError

SMALL = 3  # training images of each minority class in the generated sets


# --- imbalance_ratio and choose ---------------------------------------------------------------

@pytest.mark.parametrize("counts, expected", [
    ({"a": 20, "b": 5, "c": 10}, 4.0),
    ({"a": 7, "b": 7}, 1.0),
    ({"a": 1, "b": 200}, 200.0),
    ({"a": 4, "b": 0}, math.inf),
    ({}, 1.0),
])
def test_imbalance_ratio(counts, expected):
    assert balance.imbalance_ratio(counts) == expected


def at_threshold(extra: int = 0) -> dict[str, int]:
    """Largest class exactly IMBALANCE_THRESHOLD times the smallest (plus ``extra`` images)."""
    small = 100
    return {"large": round(IMBALANCE_THRESHOLD * small) + extra, "mid": small + 1, "small": small}


@pytest.mark.parametrize("counts, expected", [
    ({"a": 10, "b": 10, "c": 10}, "none"),
    (at_threshold(), "none"),  # the threshold itself is not above it
    (at_threshold(extra=1), "weights"),
    ({"a": 200, "b": 10}, "weights"),
    ({"a": 5, "b": 0}, "weights"),  # a class without training images is the worst imbalance
])
def test_automatic_choice_follows_threshold(counts, expected):
    choice, reason = balance.choose(None, counts)
    assert choice == expected
    assert f"{balance.imbalance_ratio(counts):.1f}:1" in reason
    if expected == "weights":
        assert f"{IMBALANCE_THRESHOLD:g}:1" in reason and "--balance" in reason


@pytest.mark.parametrize("requested", config.BALANCES)
@pytest.mark.parametrize("counts", [{"a": 10, "b": 10}, {"a": 200, "b": 10}])
def test_requested_choice_wins_over_the_data(requested, counts):
    choice, reason = balance.choose(requested, counts)
    assert choice == requested
    assert "requested" in reason


# --- class_weights -------------------------------------------------------------------------------

@pytest.mark.parametrize("counts", [[200, 10], [5, 5, 5], [7, 1, 3, 12],
                                    [200, 143, 103, 74, 53, 38, 27, 19, 14, 10]])
def test_class_weights_equal_sklearn_balanced(counts):
    targets = torch.tensor(np.repeat(np.arange(len(counts)), counts))
    weights = balance.class_weights(targets[torch.randperm(len(targets))], len(counts))
    expected = compute_class_weight("balanced", classes=np.arange(len(counts)), y=targets.numpy())
    assert weights.dtype == torch.float32
    assert weights.numpy() == pytest.approx(expected, rel=1e-6)
    # every class then carries the same total weight: n / k
    assert (weights * torch.tensor(counts)).numpy() == pytest.approx([len(targets) / len(counts)] * len(counts))


def test_class_weights_zero_for_absent_class_and_ignore_unlabelled():
    targets = torch.tensor([0] * 6 + [2] * 2 + [-1] * 5)  # class 1 has no images; -1: no class
    weights = balance.class_weights(targets, 3)
    present = targets[targets >= 0].numpy()
    expected = compute_class_weight("balanced", classes=np.array([0, 2]), y=present)
    assert weights[1] == 0
    assert weights[[0, 2]].numpy() == pytest.approx(expected)


# --- balanced_sampler ----------------------------------------------------------------------------

def draws(sampler, epoch: int = 0) -> list[int]:
    """The indices of one epoch (``set_epoch`` first, for a sampler seeded per epoch)."""
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    return [int(i) for i in sampler]


def geometric_targets(largest: int, ratio: float, classes: int) -> torch.Tensor:
    """``classes`` classes from ``largest`` images down to ``largest / ratio``, geometrically."""
    counts = [round(largest * ratio ** (-i / (classes - 1))) for i in range(classes)]
    return torch.tensor(np.repeat(np.arange(classes), counts))


def test_sampler_same_seed_same_draws_other_seed_differs():
    targets = geometric_targets(200, 20, 10)
    a = balance.balanced_sampler(targets, 10, seed=3)
    torch.manual_seed(123)  # the global generator must not matter
    first = draws(a)
    b = balance.balanced_sampler(targets, 10, seed=3)
    torch.manual_seed(456)
    assert draws(b) == first
    assert len(first) == len(targets)
    assert draws(balance.balanced_sampler(targets, 10, seed=4)) != first


def test_sampler_epochs_differ():
    targets = geometric_targets(200, 20, 10)
    sampler = balance.balanced_sampler(targets, 10, seed=0)
    assert draws(sampler, 0) != draws(sampler, 1)


@pytest.mark.parametrize("targets, classes", [
    (torch.tensor([0] * 4000 + [1] * 200), 2),
    (geometric_targets(2000, 20, 10), 10),
])
def test_sampler_draws_classes_equally_often_on_20_to_1(targets, classes):
    assert balance.imbalance_ratio(Counter(targets.tolist())) == pytest.approx(20)
    drawn = targets[torch.tensor(draws(balance.balanced_sampler(targets, classes, seed=0)))]
    share = torch.bincount(drawn, minlength=classes).double() / len(drawn)
    assert share.numpy() == pytest.approx([1 / classes] * classes, rel=0.15)
    # without the sampler the smallest class would be 1/21 (2 classes) or ~1.4% (10 classes) of the draws


# --- training runs ---------------------------------------------------------------------------------

def make_counts_dataset(root: Path, train_counts: dict[str, int], val: int = 2, seed: int = 0) -> Path:
    """``root/train/<class>`` with ``train_counts[class]`` images, ``root/val/<class>`` with ``val`` each."""
    rng = np.random.default_rng(seed)
    for name, count in train_counts.items():
        write_images(root / "train" / name, name, count, rng, size=32)
        write_images(root / "val" / name, name, val, rng, size=32)
    return root


def counts_with_ratio(ratio: float) -> dict[str, int]:
    names = sorted(CLASSES)
    return {names[0]: round(ratio * SMALL), **{name: SMALL for name in names[1:]}}


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory) -> Path:
    """4:1 (12, 3, 3): above the threshold."""
    return make_counts_dataset(tmp_path_factory.mktemp("imbalanced"), counts_with_ratio(4))


def scratch_options(tmp_path: Path, **extra) -> dict:
    return {"model": "imgtune:small_cnn", "img_size": 32, "strategy": "scratch", "epochs": 1, "device": "cpu",
            "num_workers": 0, "batch_size": 4, "cache_dir": str(tmp_path / "cache"), "out": str(tmp_path / "run"),
            **extra}


@pytest.mark.parametrize("ratio, expected", [(1, "none"), (IMBALANCE_THRESHOLD, "none"), (4, "weights")])
def test_training_chooses_saves_and_logs_balance(tmp_path, caplog, ratio, expected):
    data = make_counts_dataset(tmp_path / "data", counts_with_ratio(ratio))
    with caplog.at_level(logging.INFO, logger="imgtune"):
        result = imgtune.train(data, progress=False, **scratch_options(tmp_path))
    saved = config.load_yaml(result.run_dir / "config.yaml")
    assert saved.train.balance == expected
    assert json.loads((result.run_dir / "meta.json").read_text())["config"]["train"]["balance"] == expected
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("class balance:")]
    assert len(logged) == 1
    assert f"{ratio:.1f}:1" in logged[0]
    assert ("--balance weights" in logged[0]) == (expected == "weights")


def train_cli(data: Path, out: Path, *args: str) -> int:
    return main(["-q", "train", str(data), "--workers", "0", "--device", "cpu", "--batch-size", "4",
                 "--cache-dir", str(out.parent / "cache"), "--out", str(out), *args])


def train_losses(run: Path) -> list[float]:
    with (run / "metrics.csv").open(newline="") as handle:
        return [float(row["train_loss"]) for row in csv.DictReader(handle)]


def check_run(run: Path, requested: str) -> None:
    assert config.load_yaml(run / "config.yaml").train.balance == requested
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert 0 <= metrics[key] <= 1, key
    assert metrics["n"] == 2 * len(CLASSES)


# The scratch runs train on images (the image loader takes the sampler); linear-probe trains the head
# on cached features (the feature loader takes it).
BALANCE_RUN_ARGS = {
    "scratch": (*SCRATCH_ARGS, "--epochs", "2"),
    "linear-probe": (*PRETRAINED_ARGS, "--strategy", "linear-probe", "--epochs", "2"),
}


@pytest.mark.parametrize("strategy", [
    "scratch", pytest.param("linear-probe", marks=pytest.mark.slow)])
def test_each_balance_trains_differently_and_reports_metrics(imbalanced, tmp_path, strategy):
    losses = {}
    for requested in config.BALANCES:
        run = tmp_path / requested
        assert train_cli(imbalanced, run, *BALANCE_RUN_ARGS[strategy], "--balance", requested) == 0
        check_run(run, requested)
        losses[requested] = train_losses(run)
    # same seed and data: only the treatment differs, and each must change what the model is trained on
    assert losses["weights"] != losses["none"]
    assert losses["sampler"] != losses["none"]
    assert losses["sampler"] != losses["weights"]


def test_sampler_run_repeats_exactly_with_its_seed(imbalanced, tmp_path):
    for name in ("a", "b"):
        assert train_cli(imbalanced, tmp_path / name, *SCRATCH_ARGS, "--epochs", "2", "--balance", "sampler",
                         "--seed", "5") == 0
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b")
    assert (tmp_path / "a" / "metrics.json").read_text() == (tmp_path / "b" / "metrics.json").read_text()


def test_invalid_balance_is_refused(imbalanced, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:  # argparse refuses it
        train_cli(imbalanced, out, *SCRATCH_ARGS, "--balance", "oversample")
    assert exc.value.code == 2
    assert "--balance" in capsys.readouterr().err

    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  balance: oversample\n")
    assert train_cli(imbalanced, out, *SCRATCH_ARGS, "--config", str(bad)) == 2
    err = capsys.readouterr().err
    assert "train.balance" in err and "oversample" in err

    with pytest.raises(UsageError, match="train.balance"):
        imgtune.train(imbalanced, progress=False, **scratch_options(tmp_path, balance="Weights"))
    assert not out.exists()
