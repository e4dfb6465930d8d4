"""imgtune rank and --model auto, on generated images with the real offline weights (mobilenet_v2 and
EfficientNet-Lite0): ranking order stable for a seed, skipped candidates reported, the budget, and
``--model auto`` training the chosen model and recording why."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from datagen import make_split_dataset
from imgtune import cache, costs, probe, weights
from imgtune.cli import main
from imgtune.figures import pareto_front
from imgtune.probe import cross_validated_probe, logme, scored
from imgtune.rank import DEFAULT_CANDIDATES, parse_models

REAL = "torchvision:mobilenet_v2,timm:tf_efficientnet_lite0"
SMALL = ("--img-size", "96")  # the real models and weights at a smaller input: lean tests
HAS_WEIGHTS = all(weights.OFFLINE_PACKAGES[key].locate() is not None for key in (
    ("torchvision", "mobilenet_v2-b0353104.pth"), ("timm", "tf_efficientnet_lite0.in1k")))
needs_weights = pytest.mark.skipif(not HAS_WEIGHTS, reason="needs the offline mobilenet_v2 and Lite0 packages")
REQUIRED = {"model", "accuracy", "macro_f1", "score", "params", "flops", "latency_ms_b1", "images_per_s_b32"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_split_dataset(tmp_path_factory.mktemp("rank") / "data", train=8, val=4, seed=3)


@pytest.fixture(autouse=True)
def no_hub(tmp_path, monkeypatch):
    """Empty torch hub and Hugging Face caches (resnet18 has no weights here), short latency timings."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setattr(costs, "B32_TIMING", costs.Timing(warmup=1, repeats=1, seconds=0.0, max_repeats=1))
    monkeypatch.setattr(costs, "B1_TIMING", costs.Timing(warmup=1, repeats=3, seconds=0.0, max_repeats=3))


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        from imgtune.cli.output import console

        console.file = out
        try:
            code = main(list(args))
        finally:
            console.file = None
    return code, out.getvalue(), err.getvalue()


@pytest.mark.slow
@needs_weights
def test_rank_writes_ranking_reports_skipped_and_is_stable(data, tmp_path, monkeypatch):
    models = f"{REAL},no_such_model_xyz,torchvision:resnet18"
    code, out, err = run_cli("rank", str(data), "--models", models, "--offline", "--folds", "4", *SMALL, "--out",
                             str(tmp_path / "a"))
    assert code == 0, err
    found = json.loads((tmp_path / "a" / "rank.json").read_text())
    assert [r["model"] for r in found["ranked"]] != [] and len(found["ranked"]) == 2
    for row in found["ranked"]:
        assert REQUIRED <= set(row) and 0 <= row["accuracy"] <= 1 and row["params"] > 1e6 and row["flops"] > 5e7
        assert row["img_size"] == 96
        assert row["latency_ms_b1"] > 0 and row["images_per_s_b32"] > 0
    skipped = {s["model"]: s["reason"] for s in found["skipped"]}
    assert "no model named 'no_such_model_xyz'" in skipped["no_such_model_xyz"]
    assert "no pretrained weights for torchvision:resnet18" in skipped["torchvision:resnet18"]
    assert "skipped no_such_model_xyz" in out and "skipped torchvision:resnet18" in out
    rows = list(csv.DictReader((tmp_path / "a" / "rank.csv").open()))
    assert [r["model"] for r in rows[:2]] == [r["model"] for r in found["ranked"]] and rows[3]["skipped_reason"]
    assert (tmp_path / "a" / "rank_pareto.png").read_bytes().startswith(b"\x89PNG")
    assert "Which pretrained model" in (tmp_path / "a" / "rank.html").read_text()

    # the same seed, the candidates in another order, the features and probes now cached: the same ranking,
    # no probe fitted again
    monkeypatch.setattr(probe, "cross_validated_probe", lambda *a, **k: pytest.fail("probe fitted again"))
    reordered = ",".join(reversed(REAL.split(",")))
    code, _, err = run_cli("rank", str(data), "--models", reordered, "--offline", "--folds", "4", *SMALL, "--out",
                           str(tmp_path / "b"))
    assert code == 0, err
    again = json.loads((tmp_path / "b" / "rank.json").read_text())
    key = ("model", "accuracy", "macro_f1", "score", "accuracy_ci95", "fold_accuracy")
    assert [[r[k] for k in key] for r in again["ranked"]] == [[r[k] for k in key] for r in found["ranked"]]
    assert "computing train features" not in err  # the ranking reads the feature cache


@pytest.mark.slow
@needs_weights
def test_budget_excludes_slower_models(data, tmp_path, monkeypatch):
    """Latency is the one figure that depends on the machine: here it is set per model (by its parameter
    count) so that the budget's cut is known."""
    real = costs.measure

    def measured(model, img_size, device):
        found = real(model, img_size, device)
        found.latency_ms_b1 = 10.0 if found.params < 3e6 else 50.0  # mobilenet_v2 2.2M, Lite0 3.4M (3 classes)
        return found

    monkeypatch.setattr(costs, "measure", measured)
    code, out, err = run_cli("rank", str(data), "--models", REAL, "--offline", "--folds", "4", "--budget-ms", "20",
                             *SMALL, "--out", str(tmp_path))
    assert code == 0, err
    found = json.loads((tmp_path / "rank.json").read_text())
    assert [r["model"] for r in found["ranked"]] == ["torchvision:mobilenet_v2"]
    assert found["skipped"] == [{"model": "timm:tf_efficientnet_lite0", "latency_ms_b1": 50.0,
                                 "reason": "over the budget: 50.0 ms per image at batch 1 on this machine > "
                                           "--budget-ms 20"}]


@pytest.mark.slow
@needs_weights
def test_model_auto_trains_the_chosen_model_and_records_why(data, tmp_path):
    run = tmp_path / "run"
    code, out, err = run_cli("train", str(data), "--model", "auto", "--candidates", f"{REAL},no_such_model_xyz",
                             "--offline", "--strategy", "linear-probe", "--epochs", "2", *SMALL, "--out", str(run))
    assert code == 0, err
    ranking = json.loads((run / "rank.json").read_text())
    best = ranking["ranked"][0]["model"]
    meta = json.loads((run / "meta.json").read_text())
    assert f"{meta['model']['library']}:{meta['model']['name']}" == best
    assert meta["model"]["requested"] == "auto"
    chosen = meta["model"]["chosen_by"]
    assert chosen["method"] == "auto" and chosen["ranking"] == "rank.json"
    assert chosen["skipped"] == ["no_such_model_xyz"]
    assert "highest probe accuracy" in chosen["reason"] and f"--model auto chose {best}" in err
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["name"] == best and config["model"]["budget_ms"] is None  # repeats the run as it ran
    assert meta["requested_config"]["model"]["name"] == "auto"
    from imgtune.report import write_report

    html = write_report(run, device="cpu", gallery=0).read_text()
    assert "chosen by --model auto" in html and "Which pretrained model" in html and f"Chosen: {best}" in html


@pytest.mark.slow
@needs_weights
def test_rank_uses_the_size_training_would_and_auto_reuses_its_features(data, tmp_path):
    """No --img-size: the 40 px images are ranked at the size rule's 128 px (sizing.py), the size `imgtune
    train` runs at, so `--model auto` after `rank` computes no feature again."""
    cache = ("--cache-dir", str(tmp_path / "cache"))
    code, _, err = run_cli("rank", str(data), "--models", "torchvision:mobilenet_v2", "--offline", "--folds", "4",
                           *cache, "--out", str(tmp_path / "rank"))
    assert code == 0, err
    row = json.loads((tmp_path / "rank" / "rank.json").read_text())["ranked"][0]
    assert row["img_size"] == 128 and "computing train features" in err
    run = tmp_path / "run"
    code, _, err = run_cli("train", str(data), "--model", "auto", "--candidates", "torchvision:mobilenet_v2",
                           "--offline", "--strategy", "linear-probe", *cache, "--out", str(run))
    assert code == 0, err
    assert json.loads((run / "meta.json").read_text())["input_size"]["img_size"] == 128
    assert "computing train features" not in err and "computing val features" not in err


@pytest.mark.slow
@needs_weights
def test_model_auto_with_no_candidate_in_budget_exits_2_naming_the_fastest(data, tmp_path):
    run = tmp_path / "run"
    code, _, err = run_cli("train", str(data), "--model", "auto", "--candidates", REAL, "--offline",
                           "--budget-ms", "0.001", *SMALL, "--out", str(run))
    assert code == 2
    assert "no candidate runs within --budget-ms 0.001" in err
    assert "the fastest, " in err and " ms per image at batch 1" in err
    assert not run.exists() or not any(run.iterdir())


def test_budget_and_candidates_need_model_auto(data, tmp_path):
    code, _, err = run_cli("train", str(data), "--model", "mobilenet_v2", "--budget-ms", "20", "--out", str(tmp_path))
    assert code == 2 and "--budget-ms: only with --model auto" in err
    code, _, err = run_cli("train", str(data), "--model", "auto", "--budget-ms", "-1", "--out", str(tmp_path))
    assert code == 2 and "must be a positive number" in err


def test_probe_is_not_optimistic_on_noise_and_finds_signal():
    """Nested cross-validation: on pure noise (more features than images) the probe is near chance;
    on separable features it is near 1. LogME orders the two the same way."""
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 40)
    noise = rng.normal(size=(80, 200)).astype(np.float32)
    signal = noise.copy()
    signal[:, :10] += 3.0 * y[:, None]
    on_noise = cross_validated_probe(noise, y, 2, 5, seed=0)
    on_signal = cross_validated_probe(signal, y, 2, 5, seed=0)
    assert 0.3 <= on_noise.accuracy <= 0.7 and on_signal.accuracy >= 0.95
    assert on_signal.ci95["accuracy"][0] <= on_signal.accuracy <= on_signal.ci95["accuracy"][1]
    assert len(on_signal.fold_accuracy) == 5 and on_signal.folds == 5
    assert logme(signal, y, 2) > logme(noise, y, 2)
    again = cross_validated_probe(signal, y, 2, 5, seed=0)
    assert again.accuracy == on_signal.accuracy and again.chosen_c == on_signal.chosen_c


def test_probe_results_are_remembered_by_everything_they_read(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 10)
    x = (rng.normal(size=(30, 8)) + y[:, None]).astype(np.float32)
    store = cache.probe_store(tmp_path)
    first = scored(x, y, 3, 3, 0, store=store)
    calls = []
    real = probe.cross_validated_probe
    monkeypatch.setattr(probe, "cross_validated_probe", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert scored(x, y, 3, 3, 0, store=store) == first and calls == []  # remembered: nothing refitted
    for changed in ((x, y[::-1].copy(), 3, 3, 0), (x + 1e-3, y, 3, 3, 0), (x, y, 3, 5, 0), (x, y, 3, 3, 1)):
        again = scored(*changed, store=store)  # other labels, features, folds or seed: fitted again
    assert len(calls) == 4 and again[0].folds == 3
    assert cache.cache_size(tmp_path)[0] == 5 and cache.clear(tmp_path).entries == 5  # `imgtune cache` sees them


def test_pareto_front_and_model_lists():
    # (latency, accuracy): 1 is beaten by 0 (faster and as accurate); 3 by 2
    assert pareto_front([(10, 0.9), (20, 0.9), (30, 0.95), (40, 0.94)]) == [0, 2]
    assert parse_models(None) == DEFAULT_CANDIDATES and parse_models(" a, b ,a,") == ("a", "b")
    assert sum(":" in name for name in DEFAULT_CANDIDATES[:4]) == 4


def test_out_of_memory_and_other_failures_skip_only_that_candidate(data, tmp_path, monkeypatch):
    import torch

    from imgtune import rank as rank_module

    def create(config, num_classes, offline=False):
        if config.name == "big_one":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        raise RuntimeError("an operator this model lacks")

    monkeypatch.setattr(rank_module.models, "create", create)
    code, out, err = run_cli("rank", str(data), "--models", "big_one,odd_one", "--out", str(tmp_path))
    assert code == 4 and "no candidate could be ranked" in err
    skipped = {s["model"]: s["reason"] for s in json.loads((tmp_path / "rank.json").read_text())["skipped"]}
    assert skipped["big_one"].startswith("out of memory on ") and "smaller --batch-size" in skipped["big_one"]
    assert skipped["odd_one"].startswith("failed: RuntimeError: an operator this model lacks")
