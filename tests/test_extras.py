"""The training extras (issue 13 part 5): flip TTA at inference, EMA of weights, mixup/cutmix and the
learning-rate finder (imgtune.extras, imgtune.lr_find, --tta, --ema, --mixup/--cutmix, --lr auto)."""

from __future__ import annotations

import copy
import json
import random

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageOps
from torch import nn

from datagen import SCRATCH_ARGS, make_split_dataset
from imgtune import engine, extras, lr_find
from imgtune.cli import main
from imgtune.config import TrainConfig
from imgtune.data.transforms import Preprocessing
from imgtune.models import Classifier
from imgtune.predict import Predictor
from imgtune.strategies import Phase

FAST = (*SCRATCH_ARGS, "--workers", "0", "--batch-size", "6")


def tiny_classifier(classes: int = 3, seed: int = 0) -> Classifier:
    """A conv body that is not mirror-symmetric (a 1x3 kernel) and a linear head."""
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Conv2d(3, 4, (1, 3)), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d((1, 2)),
                         nn.Flatten())
    return Classifier(body, nn.Linear(8, classes), 8)


def test_flip_tta_is_the_mean_of_both_views_and_plain_predict_is_unchanged(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 52, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    predictor = Predictor(tiny_classifier(), ["a", "b", "c"], Preprocessing(img_size=32, resize_size=36), "cpu")
    plain, _ = predictor.probabilities(paths, batch_size=2)
    tta, _ = predictor.probabilities(paths, batch_size=2, tta=True)
    own = predictor.run_batch([predictor.load_one(p) for p in paths])
    mirrored = []
    for path in paths:
        mirror = tmp_path / f"mirror-{path.name}"
        ImageOps.mirror(Image.open(path)).save(mirror)
        mirrored.append(predictor.load_one(mirror))
        # the flipped tensor is the mirror image's, so TTA sees what a mirrored photo would give
        np.testing.assert_allclose(predictor.flip_one(predictor.load_one(path)), mirrored[-1], atol=1e-5)
    np.testing.assert_allclose(plain, own, atol=1e-6)
    np.testing.assert_allclose(tta, (own + predictor.run_batch(mirrored)) / 2, atol=1e-5)
    assert np.abs(tta - plain).max() > 1e-4  # the model is not mirror-symmetric: TTA changes something
    top = predictor.predict(paths, top_k=1, tta=True)
    assert [r.probs[0] for r in top] == pytest.approx(tta.max(axis=1).tolist())


def test_ort_flip_mirrors_the_pixels():
    from imgtune.ort_predict import OrtPredictor

    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    flipped = OrtPredictor.flip_one(pixels)
    assert flipped.flags.c_contiguous and (flipped == pixels[:, ::-1]).all()


def tensor_loaders(seed: int = 0, n: int = 48, classes: int = 3):
    """Images whose class is told by which third of the image is bright: separable, tiny, in memory."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.rand(n, 3, 12, 12, generator=gen) * 0.3
    for i, label in enumerate(y.tolist()):
        x[i, :, :, label * 4:(label + 1) * 4] += 1.0
    data = torch.utils.data.TensorDataset(x, y, torch.arange(n))
    train = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1))
    return engine.Loaders(train, torch.utils.data.DataLoader(data, batch_size=16))


def run_fit(model: Classifier, epochs: int = 3, lr: float = 0.02, **options) -> tuple[engine.Progress, list]:
    train = TrainConfig(strategy="finetune", epochs=epochs, lr=lr, backbone_lr_factor=1.0, **options)
    snapshots = []

    class Keep(engine.Hooks):
        def after_epoch(self, snapshot):
            snapshots.append(copy.deepcopy(snapshot()))  # its tensors are the live weights

    progress = engine.fit(model, [Phase("all", epochs, False, lr, lr)], tensor_loaders(), train,
                          torch.device("cpu"), 3, hooks=Keep())
    return progress, snapshots


def test_ema_weights_differ_from_the_raw_ones_and_are_what_is_kept():
    model = tiny_classifier()
    progress, snapshots = run_fit(model, ema=0.9)
    last = snapshots[-1]
    raw, average = last["model"], last["ema"]["model"]
    assert last["ema"]["steps"] == 3 * 6  # one update per optimizer step of the phase
    assert any(not torch.equal(raw[k], average[k]) for k in raw if raw[k].is_floating_point())
    kept = model.state_dict()
    assert all(torch.equal(kept[k], average[k]) for k in kept)  # what training.py saves
    assert progress.rows[-1]["val_accuracy"] > 0.9

    plain = tiny_classifier()
    _, without = run_fit(plain)
    assert without[-1]["ema"] is None
    assert all(torch.equal(plain.state_dict()[k], without[-1]["model"][k]) for k in without[-1]["model"])


def test_mixup_and_cutmix_make_soft_targets():
    images, targets = torch.rand(7, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2, 0])  # an odd batch works
    for mixup, cutmix in ((0.4, 0.0), (0.0, 1.0), (0.4, 1.0)):
        torch.manual_seed(3)
        mixed, soft = extras.batch_mixer(mixup, cutmix, 3)(images.clone(), targets)
        assert soft.shape == (7, 3) and torch.allclose(soft.sum(1), torch.ones(7))
        assert (soft.max(1).values < 1).any() and not torch.equal(mixed, images)
    assert extras.batch_mixer(0.0, 0.0, 3) is None


def test_training_with_mixup_still_converges_on_separable_data(monkeypatch):
    seen = []
    real = extras.batch_mixer

    def spy(*args):
        mix = real(*args)

        def recording(images, targets):
            out = mix(images, targets)
            seen.append(out[1])
            return out
        return recording
    monkeypatch.setattr(engine, "batch_mixer", spy)
    progress, _ = run_fit(tiny_classifier(), epochs=6, mixup=0.4, cutmix=1.0)
    assert seen and all(t.shape[1] == 3 and t.is_floating_point() for t in seen)  # the loss got soft targets
    assert any((t.max(1).values < 0.999).any() for t in seen)
    assert progress.rows[-1]["val_accuracy"] >= 0.9


def test_valley_picks_the_falling_stretch():
    lrs = list(np.logspace(-7, 1, 100))
    losses = [2.0 if lr < 1e-4 else max(0.2, 2.0 - 0.6 * np.log10(lr / 1e-4)) if lr < 1e-1 else 0.2 + 5 * (lr - 0.1)
              for lr in lrs]
    losses = [v + 0.001 * ((i * 7919) % 13) / 13 for i, v in enumerate(losses)]  # flat parts are not falling
    assert 1e-4 < lr_find.suggest(lrs, losses) < 1e-1


def logistic_problem(scale: float):
    """Logistic regression on 8 features (standardised, times ``scale``), 3 overlapping classes, by SGD."""
    torch.manual_seed(0)
    model = Classifier(nn.Identity(), nn.Linear(8, 3), 8)
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(120) % 3
    x = torch.randn(120, 8, generator=gen) + 2.0 * nn.functional.one_hot(y, 8).float()
    x = scale * (x - x.mean(0)) / x.std(0)
    data = torch.utils.data.TensorDataset(x, y, torch.arange(120))
    loaders = engine.Loaders(torch.utils.data.DataLoader(data, batch_size=16, shuffle=True), None)
    train = TrainConfig(strategy="finetune", epochs=1, lr=1.0, backbone_lr_factor=1.0, optimizer="sgd",
                        weight_decay=0.0)
    return model, loaders, train, (x, y)


def sweep(model, loaders, train):
    return lr_find.range_test(model, Phase("all", 1, False, 1.0, 1.0), loaders, train, nn.CrossEntropyLoss(),
                              torch.device("cpu"))


def loss_after(model, loaders, lr: float, data, steps: int = 40) -> float:
    model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
    for step, (x, y, _) in zip(range(steps), (b for _ in range(10) for b in loaders.train)):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(data[0]), data[1]))


def test_range_test_suggests_a_rate_that_trains_and_restores_everything():
    model, loaders, train, data = logistic_problem(1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    random.seed(5)
    torch.manual_seed(5)
    expected = (random.random(), torch.rand(1).item())
    random.seed(5)
    torch.manual_seed(5)
    curve = sweep(model, loaders, train)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert (random.random(), torch.rand(1).item()) == expected  # the generators are put back
    assert len(curve.lrs) == len(curve.losses) == lr_find.ITERATIONS and min(curve.losses) < 0.8 * curve.losses[0]
    assert 1e-3 <= curve.suggestion <= 1.0
    start = loss_after(model, loaders, 0.0, data, steps=0)
    assert loss_after(model, loaders, curve.suggestion, data) < 0.8 * start  # it trains
    assert loss_after(model, loaders, 1e-6, data) > 0.99 * start  # far below the range: nothing happens
    png = lr_find.figures.lr_find_png(curve.lrs, curve.losses, curve.suggestion, curve.rule)
    assert png.startswith(b"\x89PNG")


def test_range_test_stops_when_the_loss_blows_up():
    model, loaders, train, data = logistic_problem(10.0)  # 100 times the curvature: diverges above ~1
    curve = sweep(model, loaders, train)
    assert "exceeded" in curve.stopped and curve.lrs[-1] < lr_find.END_LR
    assert curve.suggestion < curve.lrs[-1] / 10
    assert loss_after(model, loaders, curve.lrs[-1], data) > loss_after(model, loaders, curve.suggestion, data)


@pytest.mark.slow
def test_lr_auto_is_recorded_and_trains_as_the_chosen_rate(tmp_path):
    data = make_split_dataset(tmp_path / "data", train=6, val=3)
    common = ["-q", "train", str(data), *FAST, "--epochs", "2", "--cache-dir", str(tmp_path / "cache")]
    assert main([*common, "--lr", "auto", "--out", str(tmp_path / "auto")]) == 0
    run = tmp_path / "auto"
    found = json.loads((run / "lr_find.json").read_text())
    chosen = yaml.safe_load((run / "config.yaml").read_text())["train"]["lr"]
    meta = json.loads((run / "meta.json").read_text())
    assert chosen == found["suggestion"] and meta["lr_find"]["chosen"] == chosen
    assert meta["config"]["train"]["lr"] == chosen and meta["requested_config"]["train"]["lr"] == "auto"
    assert (run / "lr_find.png").read_bytes().startswith(b"\x89PNG") and len(found["lrs"]) == len(found["losses"])
    assert main([*common, "--lr", repr(chosen), "--out", str(tmp_path / "given")]) == 0
    assert _losses(run) == _losses(tmp_path / "given")  # the test left no trace on the training


def _losses(run) -> list[tuple[str, str]]:
    import csv

    with open(run / "metrics.csv") as handle:
        return [(row["train_loss"], row["val_loss"]) for row in csv.DictReader(handle)]


@pytest.mark.slow
def test_lr_find_command_and_tta_on_the_command_line(tmp_path, capsys, monkeypatch):
    data = make_split_dataset(tmp_path / "data", train=6, val=3)
    out = tmp_path / "lrf"
    swept = []
    real = lr_find.make_optimizer
    monkeypatch.setattr(lr_find, "make_optimizer", lambda model, phase, train: swept.append(phase) or
                        real(model, phase, train))
    assert main(["-q", "lr-find", str(data), *FAST, "--lr", "0.5", "--iterations", "30", "--out", str(out)]) == 0
    assert [p.head_lr for p in swept] == [1.0]  # rates are swept from 1e-7 whatever --lr says
    assert "suggested learning rate" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} >= {"lr_find.png", "lr_find.json"}
    run = tmp_path / "run"
    assert main(["-q", "train", str(data), *FAST, "--epochs", "1", "--out", str(run)]) == 0
    capsys.readouterr()
    images = str(data / "val")
    assert main(["-q", "predict", str(run), images, "--format", "json", "--engine", "torch"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(["-q", "predict", str(run), images, "--format", "json", "--engine", "torch", "--tta"]) == 0
    tta = json.loads(capsys.readouterr().out)
    predictor = Predictor.from_run(run, "cpu")
    paths = [row["path"] for row in plain]
    expected, _ = predictor.probabilities(paths, tta=True)
    assert [r["prob"] for r in tta] == pytest.approx(expected.max(axis=1).tolist(), abs=1e-6)
    assert [r["prob"] for r in plain] == pytest.approx(predictor.probabilities(paths)[0].max(axis=1).tolist(),
                                                       abs=1e-6)
    assert main(["-q", "evaluate", str(run), "--engine", "torch", "--tta", "--format", "json"]) == 0
    report = json.loads((run / "evaluation_val_tta.json").read_text())
    assert report["tta"] == "flip" and not (run / "evaluation_val.json").exists()


def test_lr_find_help_states_the_default_steps():
    from imgtune.cli import build_parser

    text = build_parser()._subparsers._group_actions[0].choices["lr-find"].format_help()
    assert f"default {lr_find.ITERATIONS}," in " ".join(text.split())
