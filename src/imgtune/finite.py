"""What is not a finite number, found in one place: NaN and infinities in tensors (the weights of a
training that diverged) and in values written as JSON (strict JSON has neither: a value that does not
exist is written ``null``)."""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the command line imports this module; torch only loads where tensors are checked
    import torch


def nonfinite_tensors(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or an infinity (one device sync in all)."""
    import torch

    floating = [(name, tensor) for name, tensor in tensors.items() if tensor.is_floating_point()]
    if not floating:
        return []
    device = floating[0][1].device
    finite = torch.stack([torch.isfinite(tensor).all().to(device) for _, tensor in floating]).tolist()
    return [name for (name, _), ok in zip(floating, finite) if not ok]


def json_ready(value):
    """``value`` with every NaN or infinite float (NumPy's included) replaced by None, in nested dicts,
    lists and tuples."""
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    return value


def dumps(value, **options) -> str:
    """Strict JSON (``allow_nan=False``): non-finite numbers become ``null``; ``options`` as json.dumps."""
    return json.dumps(json_ready(value), allow_nan=False, **options)
