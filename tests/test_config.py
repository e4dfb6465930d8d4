"""Config precedence (defaults < preset < YAML < options), validation, strategy defaults, the one list of
options (config fields <-> flags of ``imgtune train``), and what each tutorial preset trains."""

from __future__ import annotations

import argparse
import re
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from torch import nn

from imgtune import config as cfg
from imgtune.cli import build_parser
from imgtune.cli.train import default_text, preset_flags, show
from imgtune.optim import make_optimizer
from imgtune.errors import UsageError
from imgtune.models import Classifier
from imgtune.strategies import plan

ROOT = Path(__file__).resolve().parents[1]


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


def test_paths_become_strings():
    built = cfg.build(Path("d"), out=Path("runs/x"), cache_dir=Path("cache"), weights=Path("w.safetensors"))
    assert (built.data.source, built.out, built.data.cache_dir, built.model.weights) == \
        ("d", "runs/x", "cache", "w.safetensors")


# ---------------------------------------------------------------- one list of options

def train_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


NOT_CONFIG_FIELDS = {"help", "data", "resume", "preset", "config_file"}  # -h, DATA, --resume, --preset, --config


def config_fields() -> list[str]:
    """Every settable config field, dotted; data.source is the positional DATA."""
    nested = [f"{section}.{f.name}" for section, cls in cfg.SECTIONS.items() for f in fields(cls)]
    top = [f.name for f in fields(cfg.RunConfig) if f.name not in cfg.SECTIONS]
    return [name for name in nested + top if name != "data.source"]


def sample_value(option: cfg.Option):
    """A value other than the default, as the flag's text and as the config holds it."""
    if option.choices:
        value = next(c for c in reversed(option.choices) if c != option.default)
        return [option.flag, value], value
    if option.type is bool:
        return [option.flag if not option.default else option.flag.replace("--", "--no-")], not option.default
    value = {int: 7, float: 0.125, str: "some/where"}[option.type]
    return [option.flag, str(value)], value


def test_every_config_field_has_exactly_one_flag_and_every_flag_one_field():
    flags = [a for a in train_parser()._actions if a.dest not in NOT_CONFIG_FIELDS]
    flagged = [cfg.OPTIONS[a.dest].dotted for a in flags]  # KeyError: a flag with no config field
    assert sorted(flagged) == sorted(config_fields())  # each field once; no field without a flag
    assert sorted(cfg.OPTIONS) == sorted(a.dest for a in flags)


@pytest.mark.parametrize("name", sorted(cfg.OPTIONS))
def test_each_flag_sets_its_field(name):
    """Through the parser and build(), as ``imgtune train`` does: the flag lands in its own field only."""
    option = cfg.OPTIONS[name]
    argv, value = sample_value(option)
    args = train_parser().parse_args(["d", *argv])
    built = cfg.build(args.data, **{n: getattr(args, n) for n in cfg.OPTIONS})
    assert option.get(built) == value
    untouched = cfg.build("d")
    changed = [o.name for o in cfg.OPTIONS.values() if o.get(built) != o.get(untouched)]
    assert changed == [name]


def test_flags_keep_their_names_and_kinds():
    """The command line is an interface: the flags generated from the fields are the ones users type."""
    actions = {a.option_strings[0]: a for a in train_parser()._actions if a.option_strings}
    assert (actions["--workers"].dest, actions["--model"].dest, actions["--config"].dest) == \
        ("num_workers", "model", "config_file")
    for flag in ("--pretrained", "--cache"):
        assert isinstance(actions[flag], argparse.BooleanOptionalAction)
    for flag in ("--allow-leakage", "--overwrite", "--offline"):
        assert isinstance(actions[flag], argparse._StoreTrueAction) and actions[flag].default is None
    metavars = {flag: actions[flag].metavar for flag in ("--weights", "--early-stop", "--accumulate",
                                                         "--checkpoint-every", "--resume", "--config")}
    assert metavars == {"--weights": "FILE", "--early-stop": "PATIENCE", "--accumulate": "N",
                        "--checkpoint-every": "STEPS", "--resume": "RUN", "--config": "YAML"}
    assert actions["--optimizer"].choices == cfg.OPTIMIZERS
    assert all(a.default is None for a in actions.values() if a.dest in cfg.OPTIONS)  # "not given"


def test_help_defaults_come_from_the_config():
    helps = {a.dest: a.help for a in train_parser()._actions}
    factor = helps["backbone_lr_factor"]
    assert "0.1 finetune" in factor and "0.05 gradual" in factor
    for name, option in cfg.OPTIONS.items():
        if option.section == "train" and any(option.key in d for d in cfg.STRATEGY_DEFAULTS.values()):
            for strategy, defaults in cfg.STRATEGY_DEFAULTS.items():
                assert f"{show(defaults[option.key])} {strategy}" in helps[name], name
        elif option.default is not None and option.type is not bool:
            assert f"(default: {show(option.default)})" in helps[name], name
        assert default_text(option) is None or default_text(option) in helps[name]
    for preset in cfg.PRESETS:
        assert preset in helps["preset"]


def test_files_named_in_help_exist():
    texts = [a.help or "" for a in train_parser()._actions] + [build_parser().epilog or ""]
    named = {m for text in texts for m in re.findall(r"docs/[\w-]+\.md", text)}
    assert "docs/recipes.md" in named
    assert [name for name in named if not (ROOT / name).is_file()] == []


def test_recipes_doc_lists_each_preset_and_its_flags():
    recipes = (ROOT / "docs" / "recipes.md").read_text()
    for name in cfg.PRESETS:
        assert f"`--preset {name}`" in recipes or f"`{name}`" in recipes, name
        assert preset_flags(name) in recipes, name
    for page in ("README.md", "docs/training.md"):
        assert "recipes.md" in (ROOT / page).read_text(), page


def test_preset_flags_give_the_preset_config():
    for name in cfg.PRESETS:
        args = train_parser().parse_args(["d", *preset_flags(name).split()])
        from_flags = cfg.build(args.data, **{n: getattr(args, n) for n in cfg.OPTIONS})
        assert from_flags == cfg.build("d", preset=name), name


# ---------------------------------------------------------------- what the tutorial presets train

def tiny_classifier() -> Classifier:
    body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Classifier(body, nn.Linear(4, 2), 4)


def trained(preset: str) -> tuple[cfg.RunConfig, list[tuple]]:
    """The preset's resolved config and, per phase of its plan: (phase, the optimizer built for a tiny
    classifier, whether that optimizer steps exactly the head's parameters)."""
    config = cfg.resolve(cfg.build("d", preset=preset))
    model = tiny_classifier()
    head = {id(p) for p in model.head.parameters()}
    phases = []
    for phase in plan(config.train):
        optimizer = make_optimizer(model, phase, config.train)
        phases.append((phase, optimizer, {id(p) for g in optimizer.param_groups for p in g["params"]} == head))
    return config, phases


def lrs(optimizer: torch.optim.Optimizer) -> set[float]:
    return {g["lr"] for g in optimizer.param_groups}


def hyper(optimizer: torch.optim.Optimizer, key: str) -> set:
    return {g[key] for g in optimizer.param_groups}


def test_keras_vgg16():
    """Keras: VGG16 conv body + global average pooling + Dense(1024, relu) head, base frozen, Adam 1e-3."""
    config, [(phase, optimizer, head_only)] = trained("keras-vgg16")
    m = config.model
    assert (m.name, m.pretrained, m.body, m.head, m.head_hidden) == ("torchvision:vgg16", True, "conv", "mlp", 1024)
    assert config.train.strategy == "linear-probe" and phase.body_frozen and head_only
    assert phase.epochs == config.train.epochs == cfg.STRATEGY_DEFAULTS["linear-probe"]["epochs"]
    assert type(optimizer) is torch.optim.Adam and lrs(optimizer) == {1e-3}


def test_resnet18_sgd():
    """PyTorch tutorial: ResNet-18, last layer replaced, every weight trained with SGD lr 1e-3 momentum 0.9."""
    config, [(phase, optimizer, head_only)] = trained("resnet18-sgd")
    assert (config.model.name, config.model.head, config.model.body) == ("torchvision:resnet18", "linear", "penultimate")
    assert config.train.strategy == "finetune" and not phase.body_frozen and not head_only
    assert config.train.backbone_lr_factor == 1.0 and phase.epochs == 25
    assert type(optimizer) is torch.optim.SGD and lrs(optimizer) == {1e-3}  # body and head alike
    assert hyper(optimizer, "momentum") == {0.9} and hyper(optimizer, "weight_decay") == {0.0}


def test_resnet50_adam():
    """ResNet-50 (timm), last layer replaced, every weight trained with Adam lr 1e-4 for 5 epochs."""
    config, [(phase, optimizer, head_only)] = trained("resnet50-adam")
    assert (config.model.name, config.model.head, config.model.pretrained) == ("resnet50", "linear", True)
    assert config.train.strategy == "finetune" and not phase.body_frozen and not head_only
    assert config.train.backbone_lr_factor == 1.0 and phase.epochs == 5
    assert type(optimizer) is torch.optim.Adam and lrs(optimizer) == {1e-4}
    assert hyper(optimizer, "weight_decay") == {0.0}


def test_dlwp_vgg16():
    """Deep Learning with Python 5.3: frozen VGG16 conv base at 150 px, Dense(256, relu), Dropout(0.5),
    RMSprop lr 2e-5 with Keras' defaults (no momentum, rho 0.9), 30 epochs of batch 20."""
    config, [(phase, optimizer, head_only)] = trained("dlwp-vgg16")
    m = config.model
    assert (m.name, m.body, m.head, m.head_hidden, m.dropout, m.img_size) == \
        ("torchvision:vgg16", "conv", "mlp", 256, 0.5, 150)
    assert config.train.strategy == "linear-probe" and phase.body_frozen and head_only
    assert phase.epochs == 30 and config.data.batch_size == 20
    assert type(optimizer) is torch.optim.RMSprop and lrs(optimizer) == {2e-5}
    assert hyper(optimizer, "momentum") == {0.0} and hyper(optimizer, "alpha") == {0.9}
    assert hyper(optimizer, "weight_decay") == {0.0}


def test_small_cnn():
    """Baseline: imgtune's small CNN from random initialisation at 128 px, Adam lr 1e-3, 30 epochs."""
    config, [(phase, optimizer, head_only)] = trained("small-cnn")
    assert (config.model.name, config.model.pretrained, config.model.img_size) == ("imgtune:small_cnn", False, 128)
    assert config.train.strategy == "scratch" and not phase.body_frozen and not head_only
    assert config.train.backbone_lr_factor == 1.0 and phase.epochs == 30
    assert type(optimizer) is torch.optim.Adam and lrs(optimizer) == {1e-3}


def test_every_preset_has_its_recipe_test():
    assert {f"test_{name.replace('-', '_')}" for name in cfg.PRESETS} <= set(globals())
