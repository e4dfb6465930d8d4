"""ONNX Runtime as the frozen body's engine for feature extraction (imgtune.body_runtime)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from torch import nn

from datagen import PRETRAINED_ARGS, make_split_dataset
from imgtune import body_runtime, cache
from imgtune.cli import main
from imgtune.errors import ModelError, UsageError

CPU = torch.device("cpu")


def _entries(store) -> dict[str, np.ndarray]:
    return {path.stem: cache.read_entry(path) for path in sorted(store.glob("features/*/??/*.arr"))}


@pytest.mark.slow
def test_features_and_training_agree_whichever_engine_ran_the_body(tmp_path, capsys):
    data = make_split_dataset(tmp_path / "data", train=6, val=3)
    results = {}
    for engine in ("torch", "onnxruntime"):
        assert main(["train", str(data), "--out", str(tmp_path / engine), "--cache-dir",
                     str(tmp_path / f"cache-{engine}"), "--strategy", "linear-probe", "--epochs", "3",
                     "--feature-engine", engine, *PRETRAINED_ARGS]) == 0
        assert f"train features: the body runs on {engine}" in capsys.readouterr().err
        results[engine] = (json.loads((tmp_path / engine / "metrics.json").read_text()),
                           _entries(tmp_path / f"cache-{engine}"))
    (torch_metrics, torch_rows), (ort_metrics, ort_rows) = results["torch"], results["onnxruntime"]
    assert sorted(torch_rows) == sorted(ort_rows) and len(torch_rows) == 27
    scale = max(1.0, max(float(np.abs(row).max()) for row in torch_rows.values()))
    worst = max(float(np.abs(torch_rows[k] - ort_rows[k]).max()) for k in torch_rows)
    assert worst <= body_runtime.TOLERANCE * scale
    assert ort_metrics["accuracy"] == torch_metrics["accuracy"]
    assert ort_metrics["loss"] == pytest.approx(torch_metrics["loss"], abs=1e-4)


class TinyBody(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3))


class Store:  # what body_engine needs of an ArrayStore: its folder
    def __init__(self, root):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)


def test_the_body_is_exported_once_checked_and_again_when_damaged(tmp_path, monkeypatch, caplog):
    exports = []
    trace = body_runtime.trace_to_onnx
    monkeypatch.setattr(body_runtime, "trace_to_onnx", lambda *args: exports.append(1) or trace(*args))
    body, store = TinyBody(), Store(tmp_path / "store")
    images = torch.randn(3, 3, 16, 16)
    name, run = body_runtime.body_engine(body, 16, CPU, "auto", store)
    assert name == "onnxruntime" and len(exports) == 1
    with torch.no_grad():
        assert torch.allclose(run(images), body(images), atol=1e-5)
    (saved,) = store.root.glob("body-*.onnx")
    options = body_runtime._session(saved).get_session_options()
    assert options.get_session_config_entry(body_runtime.SPINNING) == "0"  # idle threads leave torch the cores
    body_runtime.body_engine(body, 16, CPU, "auto", store)
    assert len(exports) == 1  # opened, not exported again
    saved.write_bytes(saved.read_bytes()[:-1] + bytes([saved.read_bytes()[-1] ^ 1]))
    with caplog.at_level(logging.WARNING):
        name, _ = body_runtime.body_engine(body, 16, CPU, "auto", store)
    assert name == "onnxruntime" and len(exports) == 2
    assert f"damaged cache entry {saved}" in caplog.text
    assert [p.name for p in store.root.iterdir() if p.name.startswith(".")] == []  # no unfinished write left


def test_a_body_that_fails_its_check_or_cannot_be_exported(tmp_path, monkeypatch, caplog):
    body = TinyBody()
    monkeypatch.setattr(body_runtime, "TOLERANCE", 0.0)  # any rounding difference now fails the check
    monkeypatch.setattr(TinyBody, "forward", lambda self, x: self.conv(x).mean(dim=(2, 3)) * 1.0001 + 1e-3)
    with caplog.at_level(logging.INFO, logger="imgtune.body_runtime"):
        name, _ = body_runtime.body_engine(body, 16, CPU, "auto", Store(tmp_path / "a"))
    assert name == "torch" and "disagrees with torch's" in caplog.text
    assert list((tmp_path / "a").iterdir()) == []  # nothing kept of the failed export
    monkeypatch.setattr(TinyBody, "forward", lambda self, x: torch.fft.fft2(x).real.mean(dim=(1, 2, 3))[:, None])
    assert body_runtime.body_engine(body, 16, CPU, "auto", Store(tmp_path / "b"))[0] == "torch"
    with pytest.raises(ModelError, match="aten::fft_fft2"):
        body_runtime.body_engine(body, 16, CPU, "onnxruntime", Store(tmp_path / "c"))


def test_onnxruntime_runs_on_the_cpu_only_and_needs_the_package(monkeypatch):
    body = TinyBody()
    assert body_runtime.body_engine(body, 16, torch.device("cuda"), "auto")[0] == "torch"
    with pytest.raises(UsageError, match="on the CPU, not on cuda"):
        body_runtime.body_engine(body, 16, torch.device("cuda"), "onnxruntime")
    monkeypatch.setattr(body_runtime, "_runtime_installed", lambda: False)
    assert body_runtime.body_engine(body, 16, CPU, "auto")[0] == "torch"
    with pytest.raises(UsageError, match=r"pip install 'imgtune\[export\]'"):
        body_runtime.body_engine(body, 16, CPU, "onnxruntime")
    assert body_runtime.body_engine(body, 16, CPU, "torch")[0] == "torch"


def test_a_body_is_never_taken_for_another(tmp_path, caplog):
    """Without a store nothing keys an exported body, so none is reused (another model made it); a stored
    body made for another input size is exported again."""
    images = torch.randn(2, 3, 16, 16)
    first, second = TinyBody(), TinyBody()  # other random weights
    body_runtime.body_engine(first, 16, CPU, "auto")
    name, run = body_runtime.body_engine(second, 16, CPU, "auto")
    with torch.no_grad():
        assert name == "onnxruntime" and torch.allclose(run(images), second(images), atol=1e-5)
    store = Store(tmp_path / "store")
    body_runtime.body_engine(first, 16, CPU, "auto", store)
    with caplog.at_level(logging.WARNING):
        name, run = body_runtime.body_engine(first, 8, CPU, "auto", store)
    assert "not N x 3 x 8 x 8" in caplog.text
    small = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(run(small), first(small), atol=1e-5)
