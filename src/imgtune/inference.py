"""Running a model on batches: the device, mixed precision, memory layout and the one batched
inference loop that validation, features, evaluation and prediction share."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .data.sampler import ShardSampler
from .distributed import quiet_rank
from .errors import UsageError


def select_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA, then Apple MPS, then CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available; use --device auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("--device mps: Apple MPS is not available; use --device auto or cpu")
    return torch.device(name)


def autocast(device: torch.device):
    """Mixed precision on CUDA (bfloat16 where supported, else float16); full precision elsewhere."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def to_channels_last(images: torch.Tensor) -> torch.Tensor:
    """Convolutions run faster in channels-last layout on CPU (oneDNN) and on recent GPUs."""
    return images.contiguous(memory_format=torch.channels_last) if images.dim() == 4 else images


@torch.inference_mode()
def forward(model: nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``model(images)`` for inference on ``device`` (channels-last, mixed precision on CUDA), as float32
    on the CPU. The model must already be on ``device`` and in eval mode."""
    with autocast(device):
        out = model(to_channels_last(images.to(device, non_blocking=True)))
    return out.float().cpu()


def batched_outputs(model: nn.Module, loader, device: torch.device, description: str
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(outputs, targets, positions)`` for every batch a loader of ``(images, targets, positions)``
    yields (batches whose files all failed, ``None``, are passed over), with a progress bar."""
    model.eval()
    yield from batched_calls(lambda images: forward(model, images, device), loader, description)


def batched_calls(run: Callable[[torch.Tensor], torch.Tensor], loader, description: str
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """:func:`batched_outputs` with any function of a batch of images (e.g. an ONNX Runtime session)."""
    for batch in tqdm(loader, desc=description, unit="batch", leave=False, disable=quiet_rank()):
        if batch is None:
            continue
        images, targets, positions = batch
        yield run(images), targets, positions


def predict_probs(model: nn.Module, loader, device: torch.device, description: str = "predicting"):
    """Softmax probabilities, targets and dataset indices for every item the loader yields; under
    distributed evaluation (a :class:`ShardSampler`), every rank's share merged in dataset order."""
    probs, targets, indices = [], [], []
    for logits, target, index in batched_outputs(model, loader, device, description):
        probs.append(torch.softmax(logits, dim=1))
        targets.append(target)
        indices.append(index)
    local = (torch.cat(probs).numpy(), torch.cat(targets).numpy(), torch.cat(indices).numpy()) if probs else \
        (np.zeros((0, 0)), np.zeros(0, dtype=int), np.zeros(0, dtype=int))
    if isinstance(getattr(loader, "sampler", None), ShardSampler):  # distributed: every rank's share
        return _merge(distributed.gather(local))
    return local


def _merge(shares: list[tuple[np.ndarray, np.ndarray, np.ndarray]]):
    """Every rank's predictions in dataset order (each image once: evaluation shards are unpadded)."""
    shares = [share for share in shares if len(share[1])]
    if not shares:
        return np.zeros((0, 0)), np.zeros(0, dtype=int), np.zeros(0, dtype=int)
    probs, targets, indices = (np.concatenate(parts) for parts in zip(*shares))
    order = np.argsort(indices, kind="stable")
    return probs[order], targets[order], indices[order]
