"""Config precedence (defaults < preset < YAML < options), validation, and strategy defaults."""

from __future__ import annotations

import pytest

from imgtune import config as cfg
from imgtune.errors import UsageError
from imgtune.strategies import plan


def test_precedence_defaults_preset_yaml_options(tmp_path):
    assert cfg.build("d").train.optimizer == "adamw"
    assert cfg.build("d", preset="resnet18-sgd").train.optimizer == "sgd"
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("train:\n  optimizer: adam\n  epochs: 7\nmodel:\n  name: resnet18\n")
    from_yaml = cfg.build("d", preset="resnet18-sgd", config_file=yaml_file)
    assert (from_yaml.train.optimizer, from_yaml.train.epochs, from_yaml.model.name) == ("adam", 7, "resnet18")
    flags = cfg.build("d", preset="resnet18-sgd", config_file=yaml_file, optimizer="adamw", epochs=None)
    assert flags.train.optimizer == "adamw" and flags.train.epochs == 7  # None means "not given"


def test_saved_config_round_trips(tmp_path):
    config = cfg.resolve(cfg.build("data", model="resnet18", strategy="finetune", lr=0.01, augment="strong"))
    cfg.save_yaml(config, tmp_path / "config.yaml")
    assert cfg.load_yaml(tmp_path / "config.yaml") == config


@pytest.mark.parametrize("strategy", cfg.STRATEGIES)
def test_resolve_fills_strategy_defaults(strategy):
    config = cfg.resolve(cfg.build("d", strategy=strategy))
    assert config.train.epochs == cfg.STRATEGY_DEFAULTS[strategy]["epochs"]
    assert config.train.lr == cfg.STRATEGY_DEFAULTS[strategy]["lr"]
    assert config.model.pretrained is (strategy != "scratch")


def test_plans():
    gradual = plan(cfg.resolve(cfg.build("d", strategy="gradual", epochs=5, freeze_epochs=2, lr=1e-3)).train)
    assert [(p.name, p.epochs, p.body_frozen) for p in gradual] == [("frozen", 2, True), ("unfrozen", 3, False)]
    assert gradual[1].body_lr == pytest.approx(1e-3 * cfg.STRATEGY_DEFAULTS["gradual"]["backbone_lr_factor"])
    probe = plan(cfg.resolve(cfg.build("d", strategy="linear-probe")).train)
    assert len(probe) == 1 and probe[0].body_frozen
    finetune = plan(cfg.resolve(cfg.build("d", strategy="finetune", lr=1e-3)).train)
    assert not finetune[0].body_frozen and finetune[0].body_lr < finetune[0].head_lr


@pytest.mark.parametrize("options, fragment", [
    ({"strategy": "magic"}, "train.strategy"),
    ({"augment": "heavy"}, "data.augment"),
    ({"epochs": 0}, "train.epochs"),
    ({"val_fraction": 0.0}, "data.val_fraction"),
    ({"val_fraction": 0.6, "test_fraction": 0.5}, "below 1"),
    ({"strategy": "gradual", "epochs": 2, "freeze_epochs": 2}, "freeze_epochs"),
    ({"lr": -1.0}, "train.lr"),
    ({"label_smoothing": 1.5}, "label_smoothing"),
    ({"early_stop": 0}, "early_stop"),
])
def test_invalid_values_are_usage_errors(options, fragment):
    with pytest.raises(UsageError, match=fragment.replace(".", r"\.")):
        cfg.resolve(cfg.build("d", **options))


def test_unknown_keys_are_refused(tmp_path):
    with pytest.raises(UsageError, match="unknown option"):
        cfg.build("d", colour="blue")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epocs: 3\n")
    with pytest.raises(UsageError, match="epocs"):
        cfg.build("d", config_file=bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(UsageError, match="not valid YAML"):
        cfg.build("d", config_file=broken)


def test_unknown_preset_and_missing_data():
    with pytest.raises(UsageError, match="unknown preset"):
        cfg.build("d", preset="nope")
    with pytest.raises(UsageError, match="no data"):
        cfg.build(None)


def test_presets_reproduce_the_tutorial_recipes():
    keras = cfg.resolve(cfg.build("d", preset="keras-vgg16"))
    assert (keras.model.name, keras.model.body, keras.model.head, keras.model.head_hidden) == \
        ("torchvision:vgg16", "conv", "mlp", 1024)
    assert (keras.train.optimizer, keras.train.strategy) == ("adam", "linear-probe")
    tutorial = cfg.resolve(cfg.build("d", preset="resnet18-sgd"))
    assert (tutorial.train.optimizer, tutorial.train.momentum, tutorial.train.backbone_lr_factor) == ("sgd", 0.9, 1.0)
    small = cfg.resolve(cfg.build("d", preset="small-cnn"))
    assert (small.model.name, small.model.pretrained, small.train.strategy) == ("imgtune:small_cnn", False, "scratch")
