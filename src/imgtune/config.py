"""Run configuration: frozen dataclasses, presets, YAML in and out, validation.

Precedence, lowest first: dataclass defaults < ``--preset`` < ``--config FILE`` (YAML) < flags.
Values left as ``None`` (or ``device: auto``) mean "choose for me": :func:`resolve` fills the
strategy's defaults, and ``prepare.finalize`` what needs the data and the machine (input size, loader
workers, device, class balance, run folder), so that the config saved in the run folder is the one
that ran and repeats it.

The dataclass fields are the one list of training options: each field's metadata (:func:`option`)
holds its help text, choices and flag, and :data:`OPTIONS` is generated from them. :func:`build`
(the Python API's flat keyword names), the flags of ``imgtune train`` and its help all read
:data:`OPTIONS`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from .errors import UsageError
from .presets import PRESETS, STRATEGY_DEFAULTS  # noqa: F401 (config's tables, also read as config.X)

log = logging.getLogger(__name__)

STRATEGIES = ("linear-probe", "finetune", "gradual", "scratch")
OPTIMIZERS = ("adamw", "adam", "sgd", "rmsprop")  # built by engine.make_optimizer
AUGMENTS = ("none", "light", "strong")
HEADS = ("linear", "mlp", "fused")
BODIES = ("penultimate", "conv")
MONITORS = ("accuracy", "macro_f1", "loss")
KEEPS = ("final", "best")
DEVICES = ("auto", "cpu", "cuda", "mps")
FEATURE_ENGINES = ("auto", "torch", "onnxruntime")  # imgtune.body_runtime
HEAD_FITS = ("auto", "lbfgs", "sgd")  # imgtune.head_fit
SIZE_SOURCES = ("data", "pretrained")  # imgtune.sizing
BALANCES = ("none", "weights", "sampler")
SEMIS = ("label-spreading", "self-training", "none")  # imgtune.semi
LOGS = ("csv", "tensorboard")  # where per-epoch metrics go besides metrics.csv (which is always written)
# Above this ratio of the largest to the smallest training class, --balance defaults to "weights".
IMBALANCE_THRESHOLD = 3.0


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None, metavar: str | None = None,
           unset: str | None = None, flag: str | None = None, dest: str | None = None,
           group: str | None = None, words: tuple[str, ...] = ()) -> Any:
    """A config field that is also a training option.

    ``dest``: its flat name (keyword of :func:`build`, dest of the flag), default the field's name;
    ``flag``: default ``--`` + ``dest`` with dashes; ``unset``: what ``None`` means, for the help;
    ``group``: the help section when not the field's own section; ``words``: special values accepted
    besides the field's type (``--lr auto``). A ``bool`` defaulting to True is a ``--x/--no-x`` flag,
    one defaulting to False a switch.
    """
    meta = {"help": help, "choices": choices, "metavar": metavar, "unset": unset, "flag": flag, "dest": dest,
            "group": group, "words": words}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class DataConfig:
    source: str = field(default="", metadata={"positional": "DATA"})  # imgtune train DATA
    val_fraction: float = option(0.2, "share of each class held out for validation")
    test_fraction: float = option(0.0, "share of each class held out for testing")
    batch_size: int = option(32, "images per batch")
    num_workers: int | None = option(None, "data loader processes", flag="--workers",
                                     unset="sized to the device and the data")
    augment: str = option("light", "training augmentation (docs/training.md)", choices=AUGMENTS)
    cache: bool = option(True, "cache backbone features and decoded pixels on disk (imgtune.cache)")
    cache_dir: str | None = option(None, "cache folder", unset="$IMGTUNE_CACHE, else ~/.cache/imgtune")
    feature_engine: str = option("auto", "what runs the frozen backbone (its features; with --unfreeze top:K its "
                                         "lower blocks): auto (ONNX Runtime on a CPU when installed, else torch), "
                                         "torch or onnxruntime (docs/performance.md)", choices=FEATURE_ENGINES)
    allow_leakage: bool = option(False, "train even when the same file is in two splits (leakage) or under two "
                                        "classes (a label conflict); imgtune doctor DATA lists them")
    extra_labels: str | None = option(None, "a CSV of more training images (path,label; rows with an empty label are "
                                            "skipped), e.g. the one imgtune suggest wrote, filled in "
                                            "(docs/unlabelled.md)", metavar="FILE.csv")
    allow_outside_paths: bool = option(False, "let a CSV name files outside its own folder (../x.jpg, absolute "
                                              "paths elsewhere); only for a CSV you trust (docs/data.md)")
    unlabeled: str | None = option(None, "a folder of unlabelled images for semi-supervised training (--semi; "
                                         "docs/unlabelled.md)", metavar="DIR")


@dataclass(frozen=True)
class ModelConfig:
    name: str = option("mobilenet_v2", "timm:NAME, torchvision:NAME, a bare name, or auto: rank candidates on "
                                        "this data and train the best (docs/choosing-a-model.md)", dest="model")
    budget_ms: float | None = option(None, "with --model auto: only candidates whose batch-1 latency on this "
                                           "machine is at most this many milliseconds", metavar="MS", unset="no limit")
    candidates: str | None = option(None, "with --model auto: the models to rank, comma-separated", metavar="A,B,C",
                                    unset="the default shortlist of imgtune rank")
    pretrained: bool = option(True, "start from pretrained weights (--no-pretrained: random initialisation)")
    weights: str | None = option(None, "a local weights file, tried before any cache, package or download",
                                 metavar="FILE")
    img_size: int | None = option(None, "input size in pixels", unset="per --size-from")
    size_from: str = option("data", "the input size when --img-size is not given: data (matched to the training "
                                    "images when most are much smaller than the pretrained size; docs/training.md) "
                                    "or pretrained (the weights' own)", choices=SIZE_SOURCES)
    body: str = option("penultimate", "penultimate: all but the last layer; conv: convolutional trunk + global "
                                      "average pooling", choices=BODIES)
    head: str = option("linear", "linear, mlp (hidden layer + ReLU) or fused (old logits beside features)",
                       choices=HEADS)
    head_hidden: int = option(1024, "hidden units of the mlp head")
    dropout: float = option(0.0, "dropout before the head's last layer")


@dataclass(frozen=True)
class TrainConfig:
    strategy: str = option("gradual", "transfer strategy (docs/training.md)", choices=STRATEGIES)
    epochs: int | None = option(None, "epochs to train")
    head_fit: str = option("auto", "a linear head on cached features while the backbone is frozen: lbfgs fits it to "
                                   "convergence (logistic regression, its regularisation chosen by cross-validation "
                                   "on the training split; the frozen epochs and --lr do not apply), sgd trains it "
                                   "for the frozen epochs; auto: lbfgs when the frozen phase is the last "
                                   "(linear-probe), sgd before fine-tuning (docs/training.md)", choices=HEAD_FITS)
    freeze_epochs: int | None = option(None, "gradual: epochs with the backbone frozen", unset="half of --epochs")
    unfreeze: str = option("auto", "what trains when the backbone is unfrozen (finetune, gradual): all, or top:K, the "
                                   "top K blocks, on cached activations of the frozen lower blocks; auto: top:3 for "
                                   "gradual on a CPU where it can run, else all (docs/training.md)",
                           metavar="auto|all|top:K")
    never_worse: bool = option(True, "gradual: keep the fine-tuned model only if it beats the linear probe on an inner "
                                     "hold-out of the training split, else the probe refitted on the whole training "
                                     "split (docs/training.md)")
    never_worse_patience: int = option(2, "gradual with --never-worse: the rest of the fine-tuning is skipped (and "
                                          "the probe kept) once it has not beaten the linear probe on the inner "
                                          "hold-out for this many epochs in a row; 0: every epoch trains",
                                       metavar="EPOCHS")
    plan: bool = option(True, "time a few batches of each phase before training, log the plan with its estimated "
                              "minutes and show the time left (docs/training.md)")
    time_budget: str | None = option(None, "the longest the run may take (90s, 10m, 1.5h): the best plan that fits "
                                           "is chosen, fewer fine-tuning epochs first, linear-probe at the least",
                                     metavar="DURATION", unset="no limit")
    lr: float | None = option(None, "head learning rate; auto: chosen by a learning-rate range test before training "
                                    "(imgtune lr-find, docs/training.md)", words=("auto",))
    backbone_lr_factor: float | None = option(None, "backbone lr = lr x this (finetune, gradual, scratch)")
    optimizer: str = option("adamw", "adamw, adam (weight decay as L2), sgd (Nesterov momentum) or rmsprop "
                                     "(momentum --momentum, smoothing 0.9)", choices=OPTIMIZERS)
    momentum: float = option(0.9, "momentum of sgd and rmsprop")
    weight_decay: float = option(0.01, "weight decay (none on biases and norm weights)")
    warmup_epochs: float = option(0.0, "epochs of linear learning-rate warm-up before the cosine decay")
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy loss")
    ema: float = option(0.0, "keep an exponential moving average of the weights with this decay (timm ModelEmaV3, "
                             "with warm-up), validated and saved instead of the raw weights; 0: off", metavar="DECAY")
    mixup: float = option(0.0, "mixup alpha while the backbone trains (0: off)", metavar="ALPHA")
    cutmix: float = option(0.0, "cutmix alpha while the backbone trains (0: off; with --mixup, one of the two per "
                                "batch)", metavar="ALPHA")
    early_stop: int | None = option(None, "stop after PATIENCE epochs without improvement", metavar="PATIENCE",
                                    unset="off")
    monitor: str = option("accuracy", "validation metric for early stopping and --keep best", choices=MONITORS)
    keep: str = option("final", "weights saved: the final epoch's, or the best on val (makes val metrics "
                                "optimistic)", choices=KEEPS)
    balance: str | None = option(
        None, "class imbalance: none, weights (class-weighted loss) or sampler (class-balanced sampling)",
        choices=BALANCES, unset=f"weights when the largest training class has over {IMBALANCE_THRESHOLD:g}x the "
                                "images of the smallest, else none")
    semi: str | None = option(None, "with --unlabeled: label-spreading (kNN graph over the frozen features), "
                                    "self-training, or none; pseudo-labels are used only where an inner hold-out of "
                                    "the labelled training images says they help", choices=SEMIS,
                              unset="label-spreading when --unlabeled is given")
    pseudo_weight: float = option(0.5, "weight of a pseudo-labelled image relative to a labelled one (--unlabeled), "
                                       "lowered so that together they never outweigh the labelled images")
    seed: int = option(0, "random seed of the splits, initialisation, shuffling and augmentation")
    device: str = option("auto", "auto: CUDA, then Apple MPS, then CPU", choices=DEVICES)
    accumulate: int = option(1, "sum the gradients of N batches per optimizer step (an N times larger batch in "
                                "the memory of one)", metavar="N")
    checkpoint_every: int | None = option(None, "also write a checkpoint every STEPS optimizer steps (one is "
                                                "written after every epoch)", metavar="STEPS")
    log: str = option("csv", "per-epoch metrics: csv (metrics.csv) or tensorboard (also RUN/tensorboard/ event "
                             "files; pip install 'imgtune[tensorboard]')", choices=LOGS, group="output")


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out: str | None = option(None, "run folder; must be new or empty", unset="runs/<timestamp>")
    overwrite: bool = option(False, "reuse a non-empty --out")
    offline: bool = option(False, "never download (also IMGTUNE_OFFLINE=1)")


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}


@dataclass(frozen=True)
class Option:
    """One training option, generated from a config field and its :func:`option` metadata."""

    name: str  # flat name: keyword of build() and imgtune.train(), dest of the flag
    section: str | None  # data, model or train; None for RunConfig's own fields (out, overwrite, offline)
    key: str  # the field's name within its section
    type: type  # int, float, str or bool (None removed from ``X | None``)
    default: Any
    flag: str
    help: str
    choices: tuple[str, ...] | None
    metavar: str | None
    unset: str | None
    group: str | None
    optional: bool = False  # None is a value (``X | None``): "choose for me"
    words: tuple[str, ...] = ()  # special values besides the type's (``--lr auto``)

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.key}" if self.section else self.key

    def get(self, config: RunConfig) -> Any:
        return getattr(getattr(config, self.section) if self.section else config, self.key)


def _options() -> dict[str, Option]:
    """Every field of the sections and of RunConfig itself, except the positional DATA; a field that is
    not an :func:`option`, or a name or flag given twice, fails at import."""
    found: dict[str, Option] = {}
    for section, cls in [*SECTIONS.items(), (None, RunConfig)]:
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if f.metadata.get("positional") or (section is None and f.name in SECTIONS):
                continue
            if "help" not in f.metadata:
                raise TypeError(f"{cls.__name__}.{f.name} is neither an option() nor positional")
            meta = f.metadata
            name = meta["dest"] or f.name
            flag = meta["flag"] or "--" + name.replace("_", "-")
            if name in found or any(o.flag == flag for o in found.values()):
                raise TypeError(f"{cls.__name__}.{f.name}: option {name!r} or flag {flag} is defined twice")
            found[name] = Option(name, section, f.name, _value_type(hints[f.name]), f.default, flag, meta["help"],
                                 meta["choices"], meta["metavar"], meta["unset"], meta["group"],
                                 type(None) in typing.get_args(hints[f.name]), meta["words"])
    return found


def _value_type(hint: Any) -> type:
    """``int`` for ``int`` and for ``int | None``."""
    return next(t for t in typing.get_args(hint) or (hint,) if t is not type(None))


OPTIONS = _options()  # flat name -> Option, in field order: data, model, train, then out/overwrite/offline


def option_for(dotted: str) -> Option:
    """The option of field ``section.key`` (or a top-level key such as ``out``)."""
    return next(o for o in OPTIONS.values() if o.dotted == dotted)


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
    return replace(section, **{key: _number(type(section), key, value) for key, value in values.items()})


def _number(cls: type, key: str, value: Any) -> Any:
    """YAML 1.1 reads ``lr: 1e-3`` (no dot) as the string "1e-3": a float field takes such a string as
    the number it spells; anything else is left for :func:`check_types` to refuse."""
    option = next((o for o in OPTIONS.values() if o.key == key and SECTIONS.get(o.section) is cls), None)
    if option is not None and option.type is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


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
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise UsageError(f"config file {path} is not UTF-8 text; save it as UTF-8") from exc
    except yaml.YAMLError as exc:
        raise UsageError(f"config file {path} is not valid YAML: {exc}") from exc
    if values is None:
        log.warning("config file %s is empty: every option keeps its default (or the preset's, or the flag's)",
                    path)
    return from_dict(values or {}, base, origin=str(path))


def save_yaml(config: RunConfig, path: str | Path) -> None:
    from .atomic import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))


def resolve(config: RunConfig) -> RunConfig:
    """Fill the per-strategy defaults and check every value (``prepare.finalize`` fills the rest)."""
    from .config_checks import check_choice, check_types, validate  # noqa: PLC0415 (they read this module)

    check_types(config)
    train = config.train
    check_choice("train.strategy", train.strategy, STRATEGIES)
    defaults = STRATEGY_DEFAULTS[train.strategy]
    filled = {k: v for k, v in defaults.items() if getattr(train, k) is None}
    config = replace(config, train=replace(train, **filled))
    if config.train.freeze_epochs is None:  # the head epochs run on cached features: cheap
        config = replace(config, train=replace(config.train, freeze_epochs=max(1, config.train.epochs // 2)))
    if config.data.unlabeled and config.train.semi is None:
        config = replace(config, train=replace(config.train, semi="label-spreading"))
    if config.train.strategy == "scratch" and config.model.pretrained:
        config = replace(config, model=replace(config.model, pretrained=False))
    validate(config)
    return config


def build(data: str | Path | None = None, preset: str | None = None, config_file: str | Path | None = None,
          **options: Any) -> RunConfig:
    """Defaults < preset < YAML file < options; options use the flat names of :data:`OPTIONS` (``epochs``,
    ``lr``, ``model``, ``augment``, ``out``, ``overwrite`` ...). ``None`` values are ignored."""
    config = RunConfig()
    if preset:
        config = apply_preset(config, preset)
    if config_file:
        config = load_yaml(config_file, config)
    config = from_dict(_nest(options, data), config, origin="options")
    if not config.data.source:
        raise UsageError("no data given: pass a folder or CSV file (imgtune train DATA), or continue a run with "
                         "imgtune train --resume RUN")
    return config


def _nest(options: dict[str, Any], data: str | Path | None) -> dict[str, Any]:
    """Flat options as the nested mapping :func:`from_dict` takes."""
    nested: dict[str, Any] = {}
    for name, value in options.items():
        if value is None:
            continue
        if name not in OPTIONS:
            raise UsageError(f"unknown option {name!r}; known: {sorted(OPTIONS)}")
        option = OPTIONS[name]
        if option.type is str and isinstance(value, os.PathLike):  # out=Path(...) from the Python API
            value = os.fspath(value)
        (nested.setdefault(option.section, {}) if option.section else nested)[option.key] = value
    if data is not None:
        nested.setdefault("data", {})["source"] = str(data)
    return nested
