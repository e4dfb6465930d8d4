"""The frozen body's engine for feature extraction: PyTorch, or ONNX Runtime on a CPU.

On this project's CPUs ONNX Runtime runs a CNN body about twice as fast as imgtune's PyTorch path
(docs/benchmarks.md, ``bench/onnx_speed.py``), and a cold ``linear-probe`` spends most of its time
there. The body is exported once with the TorchScript-based exporter and kept in the feature store's
own folder (``features/<key>/body-<sha256 prefix>.onnx``: the file is checked against its name before
use), so later runs that add images only open it.

Features keep one cache key whichever engine made them: every exported body is checked against the
torch body on a fixed batch before it is used, and must agree to :data:`TOLERANCE` of the largest
feature; measured differences are under 1e-5 absolute (docs/performance.md), far below what a head
trained on them can notice. A body that cannot be exported or fails the check is run by torch
(``--feature-engine auto``) or refused (``--feature-engine onnxruntime``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .atomic import _UMASK
from .cache import ArrayStore, file_sha256
from .errors import ModelError, UsageError
from .onnx_trace import trace_to_onnx
from .inference import forward

log = logging.getLogger(__name__)

TOLERANCE = 1e-4  # largest |feature difference| allowed, relative to max(1, the largest |feature|)
OPSET = 17
INSTALL_HINT = "pip install 'imgtune[export]'"

Run = Callable[[torch.Tensor], torch.Tensor]  # a batch of normalised NCHW images -> float32 features on the CPU


def body_engine(body: nn.Module, img_size: int, device: torch.device, choice: str,
                store: ArrayStore | None = None) -> tuple[str, Run]:
    """(engine name, function) computing the body's features of a batch. ``choice`` is
    ``--feature-engine``: ``auto`` takes ONNX Runtime on a CPU when it is installed and the body exports
    and passes the check, torch otherwise."""
    body.eval()
    torch_run = (lambda images: forward(body, images, device))
    if choice == "torch" or (choice == "auto" and (device.type != "cpu" or not _runtime_installed())):
        return "torch", torch_run
    if device.type != "cpu":
        raise UsageError(f"--feature-engine onnxruntime runs the body on the CPU, not on {device.type}; use "
                         "--feature-engine auto (or torch)")
    if not _runtime_installed():
        raise UsageError(f"--feature-engine onnxruntime needs onnx and onnxruntime: {INSTALL_HINT}")
    try:
        return "onnxruntime", _runner(_body_session(body, img_size, store))
    except ModelError as exc:
        if choice == "onnxruntime":
            raise
        log.info("features with torch: %s", exc)
        return "torch", torch_run


def _runtime_installed() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))


def _body_session(body: nn.Module, img_size: int, store: ArrayStore | None):
    """A session of the checked ONNX body in ``store``'s folder (exported there first if need be); without
    a store, in a temporary folder removed when the process ends."""
    if store is not None:
        folder = store.root
    else:  # nothing keys a body without a store: never reuse one (another model may have made it)
        folder = Path(tempfile.mkdtemp(prefix="body-", dir=_scratch().name))
    for found in sorted(folder.glob("body-*.onnx")):
        if file_sha256(found)[:16] != found.stem.removeprefix("body-"):
            problem = "checksum mismatch"
        else:
            session = _session(found)
            problem = _input_problem(session, img_size)
            if problem is None:
                return session
        log.warning("damaged cache entry %s (%s): exporting the body again", found, problem)
        found.unlink(missing_ok=True)
    fd, name = tempfile.mkstemp(dir=folder, prefix=".body.onnx.", suffix=".tmp")  # what cache clear knows
    os.close(fd)
    trial = Path(name)
    try:
        example = torch.zeros(2, 3, img_size, img_size)
        trace_to_onnx(body, example, trial, OPSET, "images", "features", "the model's body")
        session = _session(trial)
        _check(body, session, img_size)
        final = folder / f"body-{file_sha256(trial)[:16]}.onnx"
        os.chmod(trial, 0o666 & ~_UMASK)  # mkstemp made it private; a cache file is as any other
        os.replace(trial, final)
    finally:
        trial.unlink(missing_ok=True)
    return session


def _input_problem(session, img_size: int) -> str | None:
    """What is wrong with the stored body's input for images of ``img_size`` (None: nothing)."""
    shape = [d if isinstance(d, int) else None for d in session.get_inputs()[0].shape]
    return None if shape[1:] == [3, img_size, img_size] else f"input {shape}, not N x 3 x {img_size} x {img_size}"


_SCRATCH: list[tempfile.TemporaryDirectory] = []


def _scratch() -> tempfile.TemporaryDirectory:
    if not _SCRATCH:
        _SCRATCH.append(tempfile.TemporaryDirectory(prefix="imgtune-body-"))
    return _SCRATCH[0]


def _check(body: nn.Module, session, img_size: int) -> None:
    """The exported body against torch's on a fixed random batch (the check that keeps the cache key's
    meaning: features from either engine are interchangeable)."""
    images = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    expected = forward(body, images, torch.device("cpu")).numpy()
    got = _runner(session)(images).numpy()
    scale = max(1.0, float(np.abs(expected).max()))
    worst = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("inf")
    if not worst <= TOLERANCE * scale:
        raise ModelError(f"the ONNX Runtime body disagrees with torch's by {worst:.3g} (allowed "
                         f"{TOLERANCE * scale:.3g})")
    log.debug("ONNX body checked: largest |difference| from torch %.2e (largest feature %.3g)", worst, scale)


SPINNING = "session.intra_op.allow_spinning"
ALLOW_SPINNING = "0"  # see _session; bench/spinning.py sets "1" to measure against ONNX Runtime's default


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # what torch would use (OMP_NUM_THREADS honoured)
    # No spin-waiting for the next run: between runs (the views an epoch makes when it first draws them)
    # torch trains the top blocks, and idle threads that spin take its cores (MNIST's fine-tuning
    # epochs: 0.72 of the time without; bench/spinning.py)
    options.add_session_config_entry(SPINNING, ALLOW_SPINNING)
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own error types (InvalidGraph, Fail, ...)
        raise ModelError(f"ONNX Runtime cannot load the exported body {path}: {exc}") from exc


def _runner(session) -> Run:
    name = session.get_inputs()[0].name

    def run(images: torch.Tensor) -> torch.Tensor:
        batch = np.ascontiguousarray(images.numpy(), dtype=np.float32)
        return torch.from_numpy(session.run(None, {name: batch})[0])
    return run
