"""Training extras that users of fastai and timm expect: an exponential moving average of the weights
(``--ema``, timm's ``ModelEmaV3``) and mixup/cutmix (``--mixup``, ``--cutmix``, torchvision's
``transforms.v2.MixUp``/``CutMix``). Both are off by default; docs/benchmarks.md has what they did on
our benchmarks. The engine calls them; nothing here runs a loop of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

EMA_WARMUP_POWER = 0.75  # timm's advice for runs of under ~10k steps (ModelEmaV3's docstring)


class WeightAverage:
    """An EMA of the whole model, restarted from the current weights when a phase starts (the body's
    weights change meaning when it is unfrozen, and a head fitted by L-BFGS replaces the trained one).
    Its decay warms up with the phase's steps, ``1 - step ** -0.75``, capped at ``decay``, so
    that a short phase (hymenoptera: 8 steps an epoch) is averaged over its recent steps rather than
    frozen at its first weights."""

    def __init__(self, model: nn.Module, decay: float):
        from timm.utils import ModelEmaV3

        self.average = ModelEmaV3(model, decay=decay, use_warmup=True, warmup_power=EMA_WARMUP_POWER)
        self.steps = 0

    @property
    def module(self) -> nn.Module:
        return self.average.module

    def restart(self, model: nn.Module) -> None:
        self.average.set(model)
        self.steps = 0

    def update(self, model: nn.Module) -> None:
        self.steps += 1
        self.average.update(model, step=self.steps)

    def counterpart(self, model: nn.Module, net: nn.Module) -> nn.Module:
        """What to validate instead of ``net`` (the model, or its head on cached features)."""
        return self.module.head if net is model.head else self.module

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.steps = int(state["steps"])


def weight_average(model: nn.Module, decay: float) -> WeightAverage | None:
    """``--ema DECAY``; None when it is 0 (off)."""
    if not decay:
        return None
    log.info("EMA of the weights (decay up to %g, warm-up power %g): validated and saved instead of the raw "
             "weights", decay, EMA_WARMUP_POWER)
    return WeightAverage(model, decay)


Mixer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def batch_mixer(mixup: float, cutmix: float, num_classes: int) -> Mixer | None:
    """``(images, class indices) -> (mixed images, soft targets)`` for the phases where the backbone
    trains (mixup: Zhang et al., 2018; cutmix: Yun et al., 2019), one of the two per batch when both
    are on; None when both are 0. Pairs are formed within the batch (each image with its neighbour),
    so any batch size works; the soft targets go to the same cross-entropy (PyTorch's takes class
    probabilities, with the class weights and label smoothing of the run)."""
    from torchvision.transforms import v2

    chosen = [v2.MixUp(alpha=mixup, num_classes=num_classes)] if mixup > 0 else []
    chosen += [v2.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix > 0 else []
    if not chosen:
        return None
    mix = chosen[0] if len(chosen) == 1 else v2.RandomChoice(chosen)
    log.info("mixing training batches while the backbone trains: %s", " or ".join(
        f"{type(m).__name__} (alpha {m.alpha:g})" for m in chosen))

    def apply(images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return mix(images, targets)
    return apply
