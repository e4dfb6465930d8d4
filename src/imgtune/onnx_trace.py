"""A torch module to an ONNX file, one way for ``imgtune export`` and the ONNX Runtime feature path.

The TorchScript-based exporter (``dynamo=False``): exact and dynamic-batch for the timm and
torchvision models tried (docs/export.md), several times faster to export than the dynamo one, and it
needs no onnxscript.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from .errors import ModelError

log = logging.getLogger(__name__)


def trace_to_onnx(module: nn.Module, example: torch.Tensor, path: Path, opset: int, input_name: str,
                  output_name: str, model_name: str) -> None:
    """``module`` (in eval mode) written to ``path``, its first axis dynamic; a module the exporter
    cannot take is a :class:`ModelError` naming the operator."""
    try:
        with _captured_stderr() as captured, warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset,
                              input_names=[input_name], output_names=[output_name],
                              dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}})
    except Exception as exc:  # the exporter's errors name the operator (e.g. 'aten::fft_fft2')
        log.debug("exporter output:\n%s", "".join(captured))
        raise ModelError(f"{model_name} cannot be exported to ONNX (opset {opset}): {_first_line(exc)}. "
                         "Try another --opset, or another model") from exc


@contextlib.contextmanager
def _captured_stderr():
    """The exporter's C++ side prints the whole graph to fd 2 when it fails; keep it for -v."""
    text: list[str] = []
    with tempfile.TemporaryFile(mode="w+") as sink:
        saved = os.dup(2)
        try:
            os.dup2(sink.fileno(), 2)
            yield text
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text.append(sink.read())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
