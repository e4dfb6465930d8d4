"""Run configuration: frozen dataclasses, presets, YAML in and out, validation.

Precedence, lowest first: dataclass defaults < ``--preset`` < ``--config FILE`` (YAML) < flags.
Values left as ``None`` mean "choose for me"; :func:`resolve` fills them from the strategy's
defaults so that the config saved in the run folder is complete and repeatable.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from .errors import UsageError

STRATEGIES = ("linear-probe", "finetune", "gradual", "scratch")
OPTIMIZERS = ("adamw", "adam", "sgd")
AUGMENTS = ("none", "light", "strong")
HEADS = ("linear", "mlp", "fused")
BODIES = ("penultimate", "conv")
MONITORS = ("accuracy", "macro_f1", "loss")
KEEPS = ("final", "best")
DEVICES = ("auto", "cpu", "cuda", "mps")
BALANCES = ("none", "weights", "sampler")
LOGS = ("csv", "tensorboard")  # where per-epoch metrics go besides metrics.csv (which is always written)
# Above this ratio of the largest to the smallest training class, --balance defaults to "weights".
IMBALANCE_THRESHOLD = 3.0


@dataclass(frozen=True)
class DataConfig:
    source: str = ""
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    batch_size: int = 32
    num_workers: int | None = None  # None: sized to the machine
    augment: str = "light"
    cache: bool = True  # cache backbone features and decoded pixels on disk (imgtune.cache)
    cache_dir: str | None = None  # None: $IMGTUNE_CACHE, else ~/.cache/imgtune
    allow_leakage: bool = False  # train even when the same file is in two splits or two classes


@dataclass(frozen=True)
class ModelConfig:
    name: str = "mobilenet_v2"
    pretrained: bool = True
    weights: str | None = None  # a local weights file, tried before any other source
    img_size: int | None = None  # None: the pretrained configuration's size
    body: str = "penultimate"  # penultimate: all but the last layer; conv: conv trunk + avg pool
    head: str = "linear"  # linear | mlp (hidden layer + ReLU) | fused (features + old logits)
    head_hidden: int = 1024
    dropout: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    strategy: str = "gradual"
    epochs: int | None = None
    freeze_epochs: int | None = None  # gradual: epochs with the backbone frozen (None: half of epochs)
    lr: float | None = None  # head learning rate
    backbone_lr_factor: float | None = None  # backbone lr = lr * factor (finetune, gradual)
    optimizer: str = "adamw"
    momentum: float = 0.9
    weight_decay: float = 0.01
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    early_stop: int | None = None  # patience in epochs; None disables
    monitor: str = "accuracy"
    keep: str = "final"
    balance: str | None = None  # none | weights | sampler; None: chosen from the data
    seed: int = 0
    device: str = "auto"
    accumulate: int = 1  # batches whose gradients are summed before one optimizer step
    checkpoint_every: int | None = None  # optimizer steps between mid-epoch checkpoints (every epoch's end: always)
    log: str = "csv"  # csv: metrics.csv only; tensorboard: also RUN/tensorboard/ event files


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out: str | None = None
    overwrite: bool = False
    offline: bool = False


# Per-strategy defaults, tuned on small datasets such as hymenoptera (docs/benchmarks.md).
STRATEGY_DEFAULTS: dict[str, dict[str, Any]] = {
    "linear-probe": {"epochs": 8, "lr": 3e-3, "backbone_lr_factor": 0.0},
    "finetune": {"epochs": 6, "lr": 1e-3, "backbone_lr_factor": 0.1},
    "gradual": {"epochs": 8, "lr": 2e-3, "backbone_lr_factor": 0.05},
    "scratch": {"epochs": 30, "lr": 1e-3, "backbone_lr_factor": 1.0},
}

# Named recipes of the classic transfer-learning tutorials (docs/recipes.md).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # Keras: VGG16 without top, global average pooling, Dense(1024, relu), Dense(classes), Adam.
    "keras-vgg16": {
        "model": {"name": "torchvision:vgg16", "body": "conv", "head": "mlp", "head_hidden": 1024},
        "train": {"strategy": "linear-probe", "optimizer": "adam", "lr": 1e-3},
    },
    # PyTorch tutorial: ResNet-18, last layer replaced, SGD lr 1e-3 momentum 0.9 on all weights.
    "resnet18-sgd": {
        "model": {"name": "torchvision:resnet18"},
        "train": {"strategy": "finetune", "optimizer": "sgd", "lr": 1e-3, "momentum": 0.9,
                  "backbone_lr_factor": 1.0, "weight_decay": 0.0, "epochs": 25},
    },
    # ResNet-50, last layer replaced, Adam.
    "resnet50-adam": {
        "model": {"name": "resnet50"},
        "train": {"strategy": "finetune", "optimizer": "adam", "lr": 1e-4, "backbone_lr_factor": 1.0,
                  "weight_decay": 0.0, "epochs": 5},
    },
    # Baseline: a small CNN (three conv+pool blocks, two dense layers) trained from scratch.
    "small-cnn": {
        "model": {"name": "imgtune:small_cnn", "pretrained": False, "img_size": 128},
        "train": {"strategy": "scratch", "optimizer": "adam", "lr": 1e-3, "epochs": 30},
        "data": {"augment": "light"},
    },
}

SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}


def to_dict(config: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(values: dict[str, Any], base: RunConfig | None = None, origin: str = "config") -> RunConfig:
    """Overlay nested ``values`` on ``base``; unknown keys are a :class:`UsageError`."""
    base = base or RunConfig()
    _check_mapping(values, base, origin)
    updates = {key: _overlay(getattr(base, key), value or {}, f"{origin}: {key}") if key in SECTIONS else value
               for key, value in values.items()}
    return replace(base, **updates)


def _overlay(section: Any, values: dict[str, Any], origin: str) -> Any:
    _check_mapping(values, section, origin)
    return replace(section, **values)


def _check_mapping(values: Any, target: Any, origin: str) -> None:
    """``values`` must be a mapping whose keys are fields of the dataclass ``target``."""
    if not isinstance(values, dict):
        raise UsageError(f"{origin}: expected a mapping of {type(target).__name__} keys, got {values!r}")
    names = {f.name for f in fields(target)}
    unknown = set(values) - names
    if unknown:
        raise UsageError(f"{origin}: unknown key(s) {sorted(unknown)}; known: {sorted(names)}")


def apply_preset(config: RunConfig, name: str) -> RunConfig:
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return from_dict(PRESETS[name], config, origin=f"preset {name}")


def load_yaml(path: str | Path, base: RunConfig | None = None) -> RunConfig:
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise UsageError(f"config file {path} is not valid YAML: {exc}") from exc
    return from_dict(values, base, origin=str(path))


def save_yaml(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def resolve(config: RunConfig) -> RunConfig:
    """Fill the per-strategy defaults and check every value; returns a complete config."""
    train = config.train
    _check_choice("train.strategy", train.strategy, STRATEGIES)
    defaults = STRATEGY_DEFAULTS[train.strategy]
    filled = {k: v for k, v in defaults.items() if getattr(train, k) is None}
    config = replace(config, train=replace(train, **filled))
    if config.train.freeze_epochs is None:  # the head epochs run on cached features: cheap
        config = replace(config, train=replace(config.train, freeze_epochs=max(1, config.train.epochs // 2)))
    if config.train.strategy == "scratch" and config.model.pretrained:
        config = replace(config, model=replace(config.model, pretrained=False))
    validate(config)
    return config


def validate(config: RunConfig) -> None:
    d, m, t = config.data, config.model, config.train
    _check_choice("data.augment", d.augment, AUGMENTS)
    _check_choice("model.body", m.body, BODIES)
    _check_choice("model.head", m.head, HEADS)
    _check_choice("train.optimizer", t.optimizer, OPTIMIZERS)
    _check_choice("train.monitor", t.monitor, MONITORS)
    _check_choice("train.keep", t.keep, KEEPS)
    _check_choice("train.device", t.device, DEVICES)
    _check_choice("train.log", t.log, LOGS)
    if t.balance is not None:
        _check_choice("train.balance", t.balance, BALANCES)
    _check_range("data.val_fraction", d.val_fraction, 0.0, 1.0, low_open=True)
    _check_range("data.test_fraction", d.test_fraction, 0.0, 1.0)
    if d.val_fraction + d.test_fraction >= 1.0:
        raise UsageError("data.val_fraction + data.test_fraction must be below 1 to leave training images")
    _check_positive("data.batch_size", d.batch_size)
    _check_positive("train.epochs", t.epochs)
    _check_positive("model.head_hidden", m.head_hidden)
    if m.img_size is not None:
        _check_positive("model.img_size", m.img_size)
    if d.num_workers is not None and d.num_workers < 0:
        raise UsageError("data.num_workers must be 0 or more")
    if t.strategy == "gradual" and not 0 < t.freeze_epochs < t.epochs:
        raise UsageError(
            f"train.freeze_epochs ({t.freeze_epochs}) must be at least 1 and below train.epochs ({t.epochs}) "
            "for the gradual strategy")
    if t.lr <= 0:
        raise UsageError("train.lr must be positive")
    _check_range("model.dropout", m.dropout, 0.0, 1.0)
    _check_range("train.label_smoothing", t.label_smoothing, 0.0, 1.0)
    if t.early_stop is not None and t.early_stop < 1:
        raise UsageError("train.early_stop (patience in epochs) must be at least 1")
    if t.backbone_lr_factor < 0:
        raise UsageError("train.backbone_lr_factor must be 0 or more")
    _check_positive("train.accumulate", t.accumulate)
    if t.checkpoint_every is not None:
        _check_positive("train.checkpoint_every", t.checkpoint_every)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UsageError(f"{name} must be a whole number of at least 1; got {value!r}")


def _check_range(name: str, value: float, low: float, high: float, low_open: bool = False) -> None:
    if not isinstance(value, (int, float)) or value < low or value >= high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise UsageError(f"{name} must be in {bracket}{low}, {high}); got {value!r}")


def _field_sections() -> dict[str, str]:
    out = {}
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            out["model" if (section, f.name) == ("model", "name") else f.name] = section
    return out


FLAT_OPTIONS = _field_sections()  # flat option name (as in the CLI and the Python API) -> section


def build(data: str | Path | None = None, preset: str | None = None, config_file: str | Path | None = None,
          **options: Any) -> RunConfig:
    """Defaults < preset < YAML file < options; options use flat names (``epochs``, ``lr``, ``model``,
    ``augment`` ...) plus ``out``, ``overwrite`` and ``offline``. ``None`` values are ignored."""
    config = RunConfig()
    if preset:
        config = apply_preset(config, preset)
    if config_file:
        config = load_yaml(config_file, config)
    nested: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key, value in options.items():
        if value is None:
            continue
        if key in ("out", "overwrite", "offline"):
            top[key] = str(value) if key == "out" else value
        elif key in FLAT_OPTIONS:
            nested.setdefault(FLAT_OPTIONS[key], {})["name" if key == "model" else key] = value
        else:
            raise UsageError(f"unknown option {key!r}; known: {sorted([*FLAT_OPTIONS, 'out', 'overwrite', 'offline'])}")
    if data is not None:
        nested.setdefault("data", {})["source"] = str(data)
    config = from_dict({**nested, **top}, config, origin="options")
    if not config.data.source:
        raise UsageError("no data given: pass a folder or CSV file (imgtune train DATA), or continue a run with "
                         "imgtune train --resume RUN")
    return config
