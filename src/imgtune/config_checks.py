"""Checks of a run's configuration: every option of the right type and finite, every value in its range,
and the combinations that cannot run refused before any work (:func:`validate`, called by
``config.resolve``), each with the option's name and what to pass instead."""

from __future__ import annotations

import math
from typing import Any

from .config import OPTIONS, DataConfig, ModelConfig, RunConfig, TrainConfig, option_for
from .errors import UsageError


def check_types(config: RunConfig) -> None:
    """Every option holds a value of its field's type (YAML can give any: ``lr: "fast"``, ``seed: abc``),
    and every number is finite (``--lr nan``, ``lr: .inf``): one check over the fields, not one per option."""
    if not isinstance(config.data.source, str):
        raise UsageError(f"data.source must be a path (text); got {config.data.source!r}")
    for option in OPTIONS.values():
        value = option.get(config)
        if (value is None and option.optional) or value in option.words:
            continue
        if not _is_a(value, option.type):
            words = "".join(f" or {word}" for word in option.words)
            raise UsageError(f"{option.dotted} ({option.flag}) must be {_TYPE_WORDS[option.type]}{words}; "
                             f"got {value!r}")
        if option.type is float and not math.isfinite(value):
            raise UsageError(f"{option.dotted} ({option.flag}) must be a finite number; got {value!r}")


_TYPE_WORDS = {int: "a whole number", float: "a number", str: "text", bool: "true or false"}


def _is_a(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return kind is bool
    return isinstance(value, (int, float)) if kind is float else isinstance(value, kind)


# Options that must not be negative (their lower bound); the other ranges are checked in validate.
NOT_BELOW = {"train.momentum": 0, "train.weight_decay": 0, "train.warmup_epochs": 0, "train.seed": 0,
             "train.backbone_lr_factor": 0, "train.mixup": 0, "train.cutmix": 0}
MAX_SEED = 2**32 - 1  # numpy's seeds


def validate(config: RunConfig) -> None:
    check_types(config)
    for dotted, low in NOT_BELOW.items():
        value = option_for(dotted).get(config)
        if value is not None and value < low:
            raise UsageError(f"{dotted} ({option_for(dotted).flag}) must be {low} or more; got {value!r}")
    if config.train.seed > MAX_SEED:
        raise UsageError(f"train.seed (--seed) must be at most {MAX_SEED}; got {config.train.seed}")
    for option in OPTIONS.values():
        if option.choices and option.get(config) is not None:  # None: chosen later (balance)
            check_choice(option.dotted, option.get(config), option.choices)
    d, m, t = config.data, config.model, config.train
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
    if t.lr != "auto" and t.lr <= 0:
        raise UsageError("train.lr must be positive (or auto)")
    _check_range("train.ema", t.ema, 0.0, 1.0)
    _check_range("model.dropout", m.dropout, 0.0, 1.0)
    _check_range("train.label_smoothing", t.label_smoothing, 0.0, 1.0)
    if t.early_stop is not None and t.early_stop < 1:
        raise UsageError("train.early_stop (patience in epochs) must be at least 1")
    if t.never_worse_patience < 0:
        raise UsageError("train.never_worse_patience (--never-worse-patience) must be 0 (off) or more epochs")
    _check_positive("train.accumulate", t.accumulate)
    _check_semi(d, t)
    if t.time_budget is not None:
        from .timeplan import parse_duration  # noqa: PLC0415 (timeplan imports config)

        parse_duration(t.time_budget)
    _check_auto(m)
    if t.checkpoint_every is not None:
        _check_positive("train.checkpoint_every", t.checkpoint_every)


def _check_semi(data: DataConfig, train: TrainConfig) -> None:
    if train.semi not in (None, "none") and not data.unlabeled:
        raise UsageError(f"--semi {train.semi} needs --unlabeled DIR, the folder of unlabelled images")
    if not 0 < train.pseudo_weight <= 1:
        raise UsageError(f"train.pseudo_weight (--pseudo-weight) must be in (0, 1]; got {train.pseudo_weight!r}")


def _check_auto(model: ModelConfig) -> None:
    """--budget-ms and --candidates choose a model (``--model auto``); a config that runs names it instead."""
    if model.budget_ms is not None and not model.budget_ms > 0:
        raise UsageError(f"model.budget_ms (--budget-ms) must be a positive number; got {model.budget_ms!r}")
    given = [f for f, v in (("--budget-ms", model.budget_ms), ("--candidates", model.candidates)) if v is not None]
    if given and model.name != "auto":
        raise UsageError(f"{' and '.join(given)}: only with --model auto (not with --model {model.name})")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UsageError(f"{name} must be a whole number of at least 1; got {value!r}")


def _check_range(name: str, value: float, low: float, high: float, low_open: bool = False) -> None:
    if not isinstance(value, (int, float)) or value < low or value >= high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise UsageError(f"{name} must be in {bracket}{low}, {high}); got {value!r}")
