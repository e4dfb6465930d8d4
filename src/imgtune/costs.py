"""What a model costs to run: parameters, FLOPs, and latency measured on this machine.

FLOPs come from PyTorch's own counter (``torch.utils.flop_counter.FlopCounterMode``: matrix products and
convolutions, counted as 2 per multiply-add, as fvcore and timm's tables count "GMACs" x 2), for one image
at the model's input size. Latency is wall time of :func:`imgtune.inference.forward` (the call prediction
makes: eval mode, channels-last, mixed precision on CUDA) on random images of that size, after warm-up
runs: the median of repeated batch-1 calls (milliseconds per image) and of batch-32 calls (images per
second). Figures depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from .inference import forward

log = logging.getLogger(__name__)

BATCH = 32


@dataclass(frozen=True)
class Timing:
    """How long latency is measured: at least ``repeats`` calls, more until ``seconds`` have passed (at most
    ``max_repeats``), after ``warmup`` calls that are not counted."""

    warmup: int = 2
    repeats: int = 5
    seconds: float = 1.0
    max_repeats: int = 50


B1_TIMING = Timing()
B32_TIMING = Timing(warmup=1, repeats=2, seconds=2.0, max_repeats=10)


@dataclass
class Costs:
    params: int
    flops: int | None  # per image; None when the counter fails on this model
    latency_ms_b1: float
    images_per_s_b32: float


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops(model: nn.Module, img_size: int) -> int | None:
    """FLOPs of one forward pass of one image (on the CPU, where the counter needs no device)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(torch.zeros(1, 3, img_size, img_size))
        return int(counter.get_total_flops())
    except Exception as exc:  # an operator the counter cannot trace: leave the figure out, keep the rest
        log.warning("cannot count FLOPs of this model (%s); left empty", str(exc).splitlines()[0] if str(exc) else exc)
        return None
    finally:
        model.train(was_training)


def seconds_per_call(model: nn.Module, batch: int, img_size: int, device: torch.device,
                     timing: Timing = B1_TIMING) -> float:
    """Median wall time of ``forward`` on ``batch`` random images (the model already on ``device``)."""
    images = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    model.eval()
    for _ in range(timing.warmup):
        forward(model, images, device)
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < timing.max_repeats and (len(times) < timing.repeats or
                                               time.perf_counter() - started < timing.seconds):
        _sync(device)
        t0 = time.perf_counter()
        forward(model, images, device)  # returns CPU tensors: the device has finished
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model: nn.Module, img_size: int, device: torch.device) -> Costs:
    """Parameters and FLOPs (CPU), then latency at batch 1 and images per second at batch 32 on ``device``."""
    counted = flops(model.cpu(), img_size)
    model.to(device, memory_format=torch.channels_last)
    b1 = seconds_per_call(model, 1, img_size, device, B1_TIMING)
    b32 = seconds_per_call(model, BATCH, img_size, device, B32_TIMING)
    return Costs(parameters(model), counted, b1 * 1000.0, BATCH / b32 if b32 > 0 else math.inf)
