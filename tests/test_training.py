"""End-to-end training through the command line: strategies, the run folder, seeds, early stopping,
presets and heads. Tiny generated images; a small CNN from scratch and the real pretrained
MobileNetV2 (weights from the installed offline package) at 64 px."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from datagen import CLASSES, PRETRAINED_ARGS, SCRATCH_ARGS, make_class_folders, make_split_dataset
from imgtune import config, models, optim
from imgtune.cli import main
from imgtune.config import ModelConfig
from imgtune.strategies import plan

STRATEGY_ARGS = {
    "scratch": (*SCRATCH_ARGS, "--epochs", "2"),
    # 30 training images are one batch: an epoch on cached features is one optimizer step, and cheap
    "linear-probe": (*PRETRAINED_ARGS, "--strategy", "linear-probe", "--epochs", "6"),
    "finetune": (*PRETRAINED_ARGS, "--strategy", "finetune", "--epochs", "1"),
    "gradual": (*PRETRAINED_ARGS, "--strategy", "gradual", "--epochs", "2", "--freeze-epochs", "1"),
}
EXPECTED_PHASES = {"scratch": ["all", "all"], "linear-probe": ["frozen"] * 6, "finetune": ["all"],
                   "gradual": ["frozen", "unfrozen"]}


def train(data: Path, out: Path, *args: str) -> int:
    return main(["-q", "train", str(data), "--workers", "0", "--out", str(out), *args])


def read_metrics_csv(run: Path) -> list[dict]:
    with (run / "metrics.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_split_dataset(tmp_path_factory.mktemp("data"), train=10, val=5)


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """One run folder per strategy, trained on first use and shared by the tests of this module."""
    done: dict[str, Path] = {}

    def get(strategy: str) -> Path:
        if strategy not in done:
            out = tmp_path_factory.mktemp("runs") / strategy
            assert train(data, out, *STRATEGY_ARGS[strategy]) == 0
            done[strategy] = out
        return done[strategy]

    return get


def pretrained_mobilenet_state() -> dict[str, torch.Tensor]:
    built = models.create(ModelConfig(name="mobilenet_v2", img_size=64), len(CLASSES), offline=True)
    return built.model.state_dict()


@pytest.mark.parametrize("strategy", ["scratch", "linear-probe", "finetune", "gradual"])
def test_strategy_writes_complete_run_folder(runs, data, strategy):
    run = runs(strategy)
    saved = config.load_yaml(run / "config.yaml")
    defaults = config.STRATEGY_DEFAULTS[strategy]
    assert saved.train.strategy == strategy
    assert saved.train.epochs == len(EXPECTED_PHASES[strategy])
    assert saved.train.lr == defaults["lr"] and saved.train.backbone_lr_factor == defaults["backbone_lr_factor"]
    assert saved.data.source == str(data) and saved.out == str(run)
    assert saved.model.pretrained is (strategy != "scratch")

    meta = json.loads((run / "meta.json").read_text())
    assert meta["classes"] == sorted(CLASSES)
    assert meta["strategy"] == strategy
    expected_model = ("imgtune", "small_cnn") if strategy == "scratch" else ("torchvision", "mobilenet_v2")
    assert (meta["model"]["library"], meta["model"]["name"]) == expected_model
    assert meta["preprocessing"]["img_size"] == (32 if strategy == "scratch" else 64)
    assert {"imgtune", "torch", "torchvision", "timm", "python"} <= set(meta["versions"])
    assert (meta["weights"] is None) == (strategy == "scratch")

    weights = load_file(run / "model.safetensors")
    assert weights["head.0.weight"].shape[0] == len(CLASSES)

    rows = read_metrics_csv(run)
    if strategy == "linear-probe":  # the head fitted to convergence: one row for the whole frozen phase
        assert [(int(r["epoch"]), r["phase"], r["head_fit"]) for r in rows] == [(saved.train.epochs, "frozen", "lbfgs")]
    else:
        assert [int(r["epoch"]) for r in rows] == list(range(1, saved.train.epochs + 1))
        assert [r["phase"] for r in rows] == EXPECTED_PHASES[strategy]
    assert all(float(r["train_loss"]) > 0 for r in rows)

    metrics = json.loads((run / "metrics.json").read_text())
    # the three classes differ in colour and shape: a pretrained backbone separates them at once, and
    # the small CNN from scratch is far above chance (1/3) after its two epochs
    assert metrics["accuracy"] >= (0.9 if strategy != "scratch" else 0.6), metrics["accuracy"]
    assert metrics["macro_f1"] >= (0.9 if strategy != "scratch" else 0.5), metrics["macro_f1"]
    assert metrics["n"] == 5 * len(CLASSES)
    assert "test" not in metrics and metrics["kept"] == "final"


def test_linear_probe_leaves_backbone_bit_identical(runs):
    saved = load_file(runs("linear-probe") / "model.safetensors")
    pretrained = pretrained_mobilenet_state()
    body = [k for k in pretrained if k.startswith("body.")]
    assert len(body) > 100
    for key in body:
        assert torch.equal(saved[key], pretrained[key]), key
    assert not torch.equal(saved["head.0.weight"], pretrained["head.0.weight"])  # the head did train


def test_finetune_changes_backbone(runs):
    saved = load_file(runs("finetune") / "model.safetensors")
    pretrained = pretrained_mobilenet_state()
    changed = [k for k in pretrained if k.startswith("body.") and k.endswith(".weight")
               and not torch.equal(saved[k], pretrained[k])]
    assert len(changed) > 10


def test_seed_repeats_exactly_and_other_seed_differs(data, tmp_path):
    assert train(data, tmp_path / "a", *SCRATCH_ARGS, "--epochs", "2", "--seed", "1") == 0
    # the saved config repeats the run (flags override it: here only --out)
    assert main(["-q", "train", str(data), "--config", str(tmp_path / "a" / "config.yaml"),
                 "--out", str(tmp_path / "b")]) == 0
    assert train(data, tmp_path / "c", *SCRATCH_ARGS, "--epochs", "2", "--seed", "2") == 0
    a, b, c = (read_metrics_csv(tmp_path / name) for name in "abc")
    losses = [[(r["train_loss"], r["val_loss"]) for r in rows] for rows in (a, b, c)]
    assert losses[0] == losses[1]
    assert losses[0] != losses[2]


def test_test_fraction_reports_test_split(tmp_path):
    data = make_class_folders(tmp_path / "data", per_class=12)
    assert train(data, tmp_path / "run", *SCRATCH_ARGS, "--epochs", "1", "--val-fraction", "0.25",
                 "--test-fraction", "0.25") == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["n"] == 3 * len(CLASSES)
    assert metrics["test"]["n"] == 3 * len(CLASSES)
    assert {"accuracy", "macro_f1", "ci95", "confusion_matrix"} <= set(metrics["test"])


def test_early_stop_with_keep_best(data, tmp_path):
    """With a learning rate too small to move any weight, val accuracy cannot improve after epoch 1."""
    run = tmp_path / "run"
    assert train(data, run, *PRETRAINED_ARGS, "--strategy", "linear-probe", "--head-fit", "sgd", "--epochs", "6",
                 "--lr", "1e-12", "--early-stop", "2", "--keep", "best", "--monitor", "accuracy") == 0
    rows = read_metrics_csv(run)
    assert len(rows) == 3
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["kept"] == "best" and metrics["best_epoch"] == 1
    assert "optimistic" in metrics["note"]


def test_flags_override_preset():
    built = config.build("data", preset="resnet18-sgd", epochs=3, optimizer="adamw")
    assert (built.train.epochs, built.train.optimizer, built.train.lr) == (3, "adamw", 1e-3)


def test_unknown_preset_is_a_usage_error():
    with pytest.raises(config.UsageError, match="unknown preset 'nope'"):
        config.build("data", preset="nope")


@pytest.mark.slow
@pytest.mark.parametrize("preset, hidden, dropout", [("keras-vgg16", 1024, []), ("dlwp-vgg16", 256, [nn.Dropout])])
def test_vgg16_presets_build_dense_head_on_conv_body(preset, hidden, dropout):
    model_config = config.build("data", preset=preset, pretrained=False, img_size=32).model
    model = models.create(model_config, 5).model
    head = [m for m in model.head if not isinstance(m, nn.Dropout)]
    assert [type(m) for m in model.head] == [nn.Linear, nn.ReLU, *dropout, nn.Linear]
    assert (head[0].in_features, head[0].out_features) == (512, hidden)
    assert (head[2].in_features, head[2].out_features) == (hidden, 5)
    body = list(model.body)
    assert isinstance(body[0], nn.Sequential) and isinstance(body[0][0], nn.Conv2d)  # VGG's features
    assert [type(m) for m in body[1:]] == [nn.AdaptiveAvgPool2d, nn.Flatten]
    assert not any(isinstance(m, nn.Linear) for m in model.body.modules())
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 5)


@pytest.fixture(scope="module")
def pretrained_classifier() -> dict[str, torch.Tensor]:
    built = models.create(ModelConfig(name="mobilenet_v2", img_size=64), 3, offline=True)
    from imgtune.weights import load_file as load_weights_file

    state = load_weights_file(built.weights.path)
    return {"weight": state["classifier.1.weight"], "bias": state["classifier.1.bias"]}


@pytest.mark.parametrize("head", ["linear", "mlp", "fused"])
def test_head_shapes(head, pretrained_classifier):
    built = models.create(ModelConfig(name="mobilenet_v2", img_size=64, head=head, head_hidden=16), 3,
                          offline=True)
    model = built.model
    linears = [m for m in model.head.modules() if isinstance(m, nn.Linear)]
    shapes = [(m.in_features, m.out_features) for m in linears]
    expected = {"linear": [(1280, 3)], "mlp": [(1280, 16), (16, 3)], "fused": [(1280, 1000), (2280, 3)]}[head]
    assert shapes == expected
    if head == "fused":
        assert isinstance(model.head, models.FusedHead)
        assert linears[0] in list(model.head.old.modules())  # the pretrained 1000-way classifier, kept
        assert torch.equal(linears[0].weight, pretrained_classifier["weight"])
        assert torch.equal(linears[0].bias, pretrained_classifier["bias"])
    with torch.no_grad():
        assert model.eval()(torch.zeros(2, 3, 64, 64)).shape == (2, 3)


def test_vit_takes_a_smaller_img_size():
    """timm ViTs fix their position embeddings at creation: --img-size must reach the constructor."""
    built = models.create(ModelConfig(name="vit_tiny_patch16_224", pretrained=False, img_size=64), 3)
    assert built.preprocessing.img_size == 64
    with torch.no_grad():
        assert built.model(torch.zeros(2, 3, 64, 64)).shape == (2, 3)


def tiny_classifier() -> models.Classifier:
    body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return models.Classifier(body, nn.Sequential(nn.Linear(4, 3)), 4)


@pytest.mark.parametrize("name", config.OPTIMIZERS)
def test_every_optimizer_choice_builds(name):
    expected = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD,
                "rmsprop": torch.optim.RMSprop}[name]
    train_config = config.resolve(config.build("d", strategy="finetune", optimizer=name)).train
    [phase] = plan(train_config)
    assert type(optim.make_optimizer(tiny_classifier(), phase, train_config)) is expected


def test_rmsprop_param_groups():
    """Head and body at their own learning rates, no weight decay on biases and norm weights, momentum
    from --momentum and Keras' smoothing constant; a frozen body is not in the optimizer."""
    train_config = config.resolve(config.build("d", strategy="gradual", epochs=2, lr=1e-2, optimizer="rmsprop",
                                               momentum=0.5, weight_decay=0.01)).train
    frozen, unfrozen = plan(train_config)
    model = tiny_classifier()
    optimizer = optim.make_optimizer(model, unfrozen, train_config)
    assert type(optimizer) is torch.optim.RMSprop
    groups = [({id(p) for p in g["params"]}, g["lr"], g["weight_decay"], g["momentum"], g["alpha"])
              for g in optimizer.param_groups]
    head, body = model.head, model.body
    body_lr = 1e-2 * config.STRATEGY_DEFAULTS["gradual"]["backbone_lr_factor"]
    assert groups == [({id(head[0].weight)}, 1e-2, 0.01, 0.5, 0.9), ({id(head[0].bias)}, 1e-2, 0.0, 0.5, 0.9),
                      ({id(body[0].weight)}, body_lr, 0.01, 0.5, 0.9),
                      ({id(body[0].bias), id(body[1].weight), id(body[1].bias)}, body_lr, 0.0, 0.5, 0.9)]
    model.freeze_body(True)
    head_only = optim.make_optimizer(model, frozen, train_config)
    assert {id(p) for g in head_only.param_groups for p in g["params"]} == {id(p) for p in head.parameters()}


def test_rmsprop_trains(data, tmp_path, monkeypatch):
    made: list[torch.optim.RMSprop] = []
    original = torch.optim.RMSprop.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(torch.optim.RMSprop, "__init__", spy)
    run = tmp_path / "run"
    assert train(data, run, *SCRATCH_ARGS, "--epochs", "2", "--optimizer", "rmsprop") == 0
    assert config.load_yaml(run / "config.yaml").train.optimizer == "rmsprop"
    assert made and all(state["step"] > 0 for state in made[-1].state.values())  # it took the steps
    rows = read_metrics_csv(run)
    assert len(rows) == 2 and float(rows[1]["train_loss"]) < float(rows[0]["train_loss"])
