"""Distributed data-parallel training with torchrun on CPU (gloo): two processes, one run folder, and
the same weights as one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from datagen import make_split_dataset
from imgtune.data.sampler import EpochSampler, ShardedEpochSampler, ShardSampler

# Group norm and no dropout: a batch split over ranks gives the same gradient as the whole batch. SGD:
# its step is linear in the gradient, so float rounding stays at rounding size (measured 1.2e-7 here);
# Adam divides by the root of tiny second moments, which turns the same rounding into up to 7e-5.
TRAIN = ("--model", "imgtune:small_cnn_gn", "--img-size", "32", "--strategy", "scratch", "--epochs", "2",
         "--batch-size", "8", "--augment", "none", "--device", "cpu", "--optimizer", "sgd", "--lr", "0.01")


def run_imgtune(args, tmp_path: Path, ranks: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "IMGTUNE_CACHE": str(tmp_path / "cache"), "IMGTUNE_THREADS": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] \
        if ranks > 1 else [sys.executable]
    return subprocess.run([*launcher, "-m", "imgtune", "train", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    data = make_split_dataset(tmp / "data", train=16, val=7)  # 48 training images: 6 whole batches of 8
    outs = tmp / "runs"
    single = run_imgtune([str(data), *TRAIN, "--out", str(outs / "single")], tmp)
    double = run_imgtune([str(data), *TRAIN, "--out", str(outs / "ddp")], tmp, ranks=2)
    return outs, single, double


@pytest.mark.slow
def test_both_ranks_trained_to_the_single_process_weights(runs):
    outs, single, double = runs
    assert single.returncode == 0, single.stderr[-3000:]
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = weights(outs / "single"), weights(outs / "ddp")
    assert one.keys() == two.keys()
    # Identical up to float rounding: the mean of two half-batch gradients is the whole batch's mean.
    # Had rank 1 not trained (or trained on rank 0's images), each step would have used half the
    # batch and the weights would differ by far more than this.
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6, msg=name)
    losses = [float(row.split(",")[3]) for row in (outs / "ddp" / "metrics.csv").read_text().splitlines()[1:]]
    assert losses[1] < losses[0]  # they did train


@pytest.mark.slow
def test_one_run_folder_written_once_and_metrics_agree(runs):
    outs, single, double = runs
    assert sorted(p.name for p in outs.iterdir()) == ["ddp", "single"]
    ddp = outs / "ddp"
    assert sorted(p.name for p in ddp.iterdir()) == sorted(p.name for p in (outs / "single").iterdir())
    assert not list(ddp.rglob("*.tmp")) and [p.name for p in ddp.rglob(".*")] == [".imgtune.lock"]  # rank 0's
    rows = (ddp / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3  # header + 2 epochs, written by rank 0 alone
    assert double.stdout.count("run folder:") == 1  # one report, from rank 0
    import json

    a, b = (json.loads((outs / name / "metrics.json").read_text()) for name in ("single", "ddp"))
    assert b["n"] == a["n"] == 21  # every val image counted once: no padded duplicates
    assert b["accuracy"] == pytest.approx(a["accuracy"], abs=1e-9)
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-3)


def test_sharded_order_covers_the_single_process_batches():
    whole = EpochSampler(48, seed=3)
    whole.set_epoch(2)
    order = whole.order()
    shards = []
    for rank in range(2):
        sampler = ShardedEpochSampler(48, 3, rank, 2)
        sampler.set_epoch(2)
        shards.append(list(sampler))
    assert [len(s) for s in shards] == [24, 24]
    for step in range(6):  # step k of both ranks (4 each) = batch k of one process (8)
        together = shards[0][step * 4:(step + 1) * 4] + shards[1][step * 4:(step + 1) * 4]
        assert sorted(together) == sorted(order[step * 8:(step + 1) * 8])


def test_sharded_order_pads_to_equal_lengths_and_resumes():
    samplers = [ShardedEpochSampler(5, 0, rank, 2) for rank in range(2)]
    lengths = [len(list(s)) for s in samplers]
    assert lengths == [3, 3] and all(len(s) == 3 for s in samplers)
    assert set(list(samplers[0]) + list(samplers[1])) == set(range(5))
    samplers[1].set_epoch(0, start=1)
    assert list(samplers[1]) == ShardedEpochSampler(5, 0, 1, 2).order()[1:]


def test_evaluation_shards_are_unpadded_and_disjoint():
    parts = [list(ShardSampler(7, rank, 3)) for rank in range(3)]
    assert sorted(sum(parts, [])) == list(range(7))
    assert [len(ShardSampler(7, rank, 3)) for rank in range(3)] == [3, 2, 2]


@pytest.mark.slow
def test_accumulating_two_half_batches_equals_one_whole_batch(tmp_path):
    """--accumulate 2 with batches of 4 takes the same steps as batches of 8 (same order, same
    schedule length, the summed halves' gradient equals the whole batch's)."""
    from imgtune.cli import main

    data = make_split_dataset(tmp_path / "data", train=16, val=3)
    common = [arg for arg in TRAIN if arg not in ("--batch-size", "8")] + ["--workers", "0"]
    assert main(["-q", "train", str(data), *common, "--batch-size", "8", "--out", str(tmp_path / "whole")]) == 0
    assert main(["-q", "train", str(data), *common, "--batch-size", "4", "--accumulate", "2",
                 "--out", str(tmp_path / "halves")]) == 0
    assert main(["-q", "train", str(data), *common, "--batch-size", "4", "--out", str(tmp_path / "small")]) == 0
    whole, halves, small = (weights(tmp_path / name) for name in ("whole", "halves", "small"))
    for name in whole:
        torch.testing.assert_close(halves[name], whole[name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(not torch.allclose(small[name], whole[name], atol=1e-4) for name in whole)  # it matters


@pytest.mark.slow
def test_two_ranks_stream_uneven_shards(tmp_path):
    """3 training shards over 2 ranks: a rank whose shards hold fewer images reads them again, so both
    take the same number of steps (DDP would wait for ever otherwise)."""
    from imgtune.cli import main

    data = make_split_dataset(tmp_path / "data", train=16, val=7)
    shards = tmp_path / "shards"
    assert main(["shard", str(data), str(shards), "--max-count", "20"]) == 0
    assert len(list(shards.glob("train-*.tar"))) == 3
    args = [a for a in TRAIN if a not in ("--optimizer", "sgd")]
    done = run_imgtune([str(shards), *args, "--out", str(tmp_path / "run"), "--workers", "0"], tmp_path, ranks=2)
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["n"] == 21
