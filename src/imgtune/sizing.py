"""The input size chosen from the data (``--size-from data``, the default; docs/training.md).

A model pretrained at 224 px is given 224 px images whatever the data: a 28 px scan is upscaled to
sixty-four times its pixels, and every forward and backward pass pays for them. When most training
images are much smaller than the pretrained size, the run trains and predicts at a size matched to
them instead: the median shorter side of the training images, times :data:`UPSCALE`, rounded up to a
multiple the architecture accepts, at least :data:`FLOOR` and at most the pretrained size. The scan
already decoded every file once (``data/scan.py`` keeps each image's width and height), so the rule
costs nothing. The figures behind the constants are in docs/benchmarks.md ("The size rule as the
default"): on 28 px MNIST digits 128 px cost 0.5 to 1.4 points against 224 px, in 0.62 of its time;
on 64 px digits (160 px) and 28-48 px shapes (128 px) nothing.

The chosen size becomes ``model.img_size`` in the saved config and the run's one preprocessing
definition (meta.json), which predict, export and serve read; how it was chosen is meta.json's
``input_size``. ``--img-size N`` always wins; ``--size-from pretrained`` keeps the pretrained size
(the choice when a point of accuracy counts more than time).
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, replace

import torch

from .config import RunConfig
from .models import BuiltModel, default_preprocessing

log = logging.getLogger(__name__)

SMALL = 0.5  # images count as "much smaller" when their median shorter side is below this share of the pretrained size
UPSCALE = 2.5  # the matched size: this many times the median shorter side (64 px digits: 160 px)
FLOOR = 128  # and never below this many pixels (on 28 px MNIST, 96 px cost 1.5 points, 128 px 0.5 to 1.4)


@dataclass(frozen=True)
class SizeChoice:
    """What chose the input size, for the log and meta.json."""

    img_size: int
    pretrained: int
    method: str  # "flag" (--img-size), "pretrained" (--size-from pretrained, or the rule kept it), "data"
    reason: str
    median_side: float | None = None
    images: int = 0

    def to_dict(self) -> dict:
        return {"img_size": self.img_size, "pretrained": self.pretrained, "method": self.method,
                "reason": self.reason, "median_side": self.median_side, "images": self.images,
                "rule": {"small": SMALL, "upscale": UPSCALE, "floor": FLOOR}}


def multiple_for(pretrained: int) -> int:
    """The step input sizes are rounded to: 32 (the stride of a convolutional net's last stage), or the
    patch size of a transformer whose pretrained size is a multiple of 14 but not of 16 (DINOv2's 518)."""
    return 14 if pretrained % 14 == 0 and pretrained % 16 else 32


def rule_size(sides: list[int], pretrained: int) -> tuple[int, str, float | None]:
    """(size, reason, median shorter side) of the rule for the training images' shorter ``sides``."""
    if not sides:
        return pretrained, "the image sizes are not known (shards): the pretrained size", None
    median = float(statistics.median(sides))
    if median >= SMALL * pretrained:
        return pretrained, (f"the median shorter side, {median:g} px, is not below {SMALL:g} x the pretrained "
                            f"{pretrained} px: the pretrained size"), median
    step = multiple_for(pretrained)
    wanted = max(FLOOR, UPSCALE * median)
    size = min(pretrained, -(-round(wanted) // step) * step)
    return size, (f"the median shorter side of {len(sides)} training images is {median:g} px, below "
                  f"{SMALL:g} x the pretrained {pretrained} px: {UPSCALE:g} x {median:g} px, at least {FLOOR}, "
                  f"rounded up to a multiple of {step}"), median


def choose(config: RunConfig, sides: list[int], built: BuiltModel) -> SizeChoice:
    """The input size of this run and why."""
    if config.model.img_size is not None:
        pretrained = default_preprocessing(built.spec).img_size
        return SizeChoice(config.model.img_size, pretrained, "flag", f"--img-size {config.model.img_size}")
    pretrained = built.preprocessing.img_size
    if config.model.size_from == "pretrained":
        return SizeChoice(pretrained, pretrained, "pretrained", "--size-from pretrained")
    size, reason, median = rule_size(sides, pretrained)
    if size != pretrained and not accepts(built.model.body, size):
        size, reason = pretrained, (f"{reason}; but {built.spec} only takes its pretrained size "
                                    f"{pretrained} px (pass --img-size to build it for another)")
    return SizeChoice(size, pretrained, "data" if size != pretrained else "pretrained", reason, median, len(sides))


@torch.no_grad()
def accepts(body: torch.nn.Module, size: int) -> bool:
    """Whether the body runs on ``size`` px images as built (a convolutional net does; a vision
    transformer built for its pretrained grid does not)."""
    was_training = body.training
    body.eval()
    try:
        body(torch.zeros(1, 3, size, size))
        return True
    except (RuntimeError, AssertionError, ValueError):
        return False
    finally:
        body.train(was_training)


def apply(config: RunConfig, sides: list[int], built: BuiltModel) -> tuple[BuiltModel, SizeChoice]:
    """``built`` with the preprocessing at the chosen size (the same weights: a convolutional body does
    not depend on its input size), and the choice, logged."""
    choice = choose(config, sides, built)
    if config.model.size_from == "data" and choice.method != "flag":
        log.info("input size %d px (%s)", choice.img_size, choice.reason)
    if choice.img_size == built.preprocessing.img_size:
        return built, choice
    return replace(built, preprocessing=built.preprocessing.with_size(choice.img_size)), choice
