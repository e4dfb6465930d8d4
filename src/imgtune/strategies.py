"""Transfer strategies as plans of training phases that the engine runs one after another.

- ``linear-probe``: one phase, backbone frozen (a fixed feature extractor), only the head trains.
- ``finetune``: one phase, everything trains, the backbone at ``lr * backbone_lr_factor``.
- ``gradual`` (default): ``freeze_epochs`` with the backbone frozen, then everything trains with the
  lower backbone learning rate, as fastai's ``fine_tune``.
- ``scratch``: random initialisation, everything trains at ``lr * backbone_lr_factor`` (1 by default).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .config import TrainConfig


@dataclass(frozen=True)
class Phase:
    name: str
    epochs: int
    body_frozen: bool
    head_lr: float
    body_lr: float


def plan(train: TrainConfig) -> list[Phase]:
    lr, factor = train.lr, train.backbone_lr_factor
    if train.strategy == "linear-probe":
        return [Phase("frozen", train.epochs, True, lr, 0.0)]
    if train.strategy == "gradual":
        return [Phase("frozen", train.freeze_epochs, True, lr, 0.0),
                Phase("unfrozen", train.epochs - train.freeze_epochs, False, lr, lr * factor)]
    if train.strategy in ("finetune", "scratch"):
        return [Phase("all", train.epochs, False, lr, lr * factor)]
    raise ValueError(f"unknown strategy {train.strategy!r}")


def probe_only(train: TrainConfig) -> TrainConfig:
    """What a ``gradual`` run becomes when its fine-tuning is dropped before it starts (``--time-budget``'s
    floor, the never-worse rule's skip): ``linear-probe`` for the frozen phase's epochs, nothing unfrozen,
    so that config.yaml resumes as what ran."""
    return replace(train, strategy="linear-probe", epochs=train.freeze_epochs, unfreeze="all")
