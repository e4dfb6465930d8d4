"""Preprocessing (one definition per model, stored with the run) and the augmentation presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """What the model expects: evaluation resizes the shorter side to ``resize_size`` and centre-crops
    ``img_size``; training crops ``img_size`` at random. Normalised with ``mean`` and ``std``."""

    img_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    @property
    def crop_pct(self) -> float:
        return self.img_size / self.resize_size

    def with_size(self, img_size: int) -> "Preprocessing":
        """The same preprocessing at another input size, keeping the crop ratio."""
        return Preprocessing(img_size, round(img_size / self.crop_pct), self.mean, self.std, self.interpolation)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Preprocessing":
        return cls(int(values["img_size"]), int(values["resize_size"]), tuple(values["mean"]),
                   tuple(values["std"]), str(values["interpolation"]))


def _interpolation(name: str) -> InterpolationMode:
    return InterpolationMode(name)


def _to_normalized_tensor(pre: Preprocessing) -> list:
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(pre.mean, pre.std)]


def eval_transform(pre: Preprocessing) -> T.Compose:
    interp = _interpolation(pre.interpolation)
    return T.Compose([T.Resize(pre.resize_size, interpolation=interp, antialias=True),
                      T.CenterCrop(pre.img_size), *_to_normalized_tensor(pre)])


def train_transform(pre: Preprocessing, augment: str) -> T.Compose:
    """``none``: as evaluation. ``light``: random resized crop (35-100% of the area) and horizontal flip.
    ``strong``: wider crops, flip, TrivialAugmentWide and random erasing."""
    if augment == "none":
        return eval_transform(pre)
    interp = _interpolation(pre.interpolation)
    if augment == "light":
        return T.Compose([T.RandomResizedCrop(pre.img_size, scale=(0.35, 1.0), interpolation=interp, antialias=True),
                          T.RandomHorizontalFlip(), *_to_normalized_tensor(pre)])
    if augment == "strong":
        return T.Compose([T.RandomResizedCrop(pre.img_size, scale=(0.08, 1.0), interpolation=interp, antialias=True),
                          T.RandomHorizontalFlip(), T.TrivialAugmentWide(interpolation=interp),
                          *_to_normalized_tensor(pre), T.RandomErasing(p=0.25)])
    raise ValueError(f"unknown augmentation preset {augment!r}")
