"""The one setup of a run (prepare.py): the saved config is the config that ran, and repeats the run;
data sources answer the same questions; the small mechanics (atomic writes, accumulation) are right."""

from __future__ import annotations

import csv
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from torch import nn

from datagen import PRETRAINED_ARGS, make_split_dataset
from imgtune import config
from imgtune.atomic import atomic_write_bytes
from imgtune.cli import main
from imgtune.data.sources import FolderSource, ShardSource
from imgtune.engine import train_one_epoch

GRADUAL = (*PRETRAINED_ARGS, "--strategy", "gradual", "--epochs", "3", "--freeze-epochs", "1", "--batch-size", "8")


def rows(run: Path) -> list[dict]:
    with (run / "metrics.csv").open(newline="") as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_split_dataset(tmp_path_factory.mktemp("data"), train=8, val=4)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "gradual"
    assert main(["-q", "train", str(data), *GRADUAL, "--out", str(out)]) == 0
    return out


def test_saved_config_holds_what_ran(run, data):
    """No value is left to be chosen again: size, workers, device, balance, data and folder."""
    saved = config.load_yaml(run / "config.yaml")
    assert saved.model.img_size == 64
    assert saved.data.num_workers == 0  # on a CPU loading stays in the main process
    assert saved.train.device == "cpu"
    assert saved.train.balance == "none"
    assert saved.data.source == str(data.resolve()) and saved.out == str(run)
    assert saved.train.lr == config.STRATEGY_DEFAULTS["gradual"]["lr"]
    assert None not in (saved.train.epochs, saved.train.freeze_epochs, saved.train.backbone_lr_factor)
    meta = json.loads((run / "meta.json").read_text())
    assert meta["config"] == config.to_dict(saved)
    requested = meta["requested_config"]  # what was asked, beside what ran
    assert requested["train"]["device"] == "auto" and requested["train"]["balance"] is None
    assert requested["data"]["num_workers"] is None


def test_saved_config_repeats_the_run_exactly(run, data, tmp_path):
    """``imgtune train --config RUN/config.yaml`` on the same data: the same per-epoch metrics, both
    phases (cached features, then the unfrozen backbone on cached pixels)."""
    again = tmp_path / "again"
    assert main(["-q", "train", "--config", str(run / "config.yaml"), "--out", str(again)]) == 0
    first, second = rows(run), rows(again)
    assert [r["phase"] for r in first] == ["frozen", "unfrozen", "unfrozen"]
    assert first == second
    saved, repeated = config.load_yaml(run / "config.yaml"), config.load_yaml(again / "config.yaml")
    assert config.to_dict(repeated) == {**config.to_dict(saved), "out": str(again)}
    assert (again / "model.safetensors").read_bytes() == (run / "model.safetensors").read_bytes()


def test_run_files_take_the_umask_mode(run):
    """Weights, metrics and cache entries are written atomically with the mode any new file gets."""
    expected = 0o666 & ~_umask()
    for name in ("model.safetensors", "config.yaml", "meta.json", "metrics.csv", "metrics.json"):
        assert stat.S_IMODE((run / name).stat().st_mode) == expected, name
    cached = list(Path(os.environ["IMGTUNE_CACHE"]).rglob("*.arr"))
    assert cached and all(stat.S_IMODE(p.stat().st_mode) == expected for p in cached)


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "file.bin"
    atomic_write_bytes(target, b"old")

    with pytest.raises(TypeError):
        atomic_write_bytes(target, object())  # not bytes: the write fails half-way
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]  # no temporary file left


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_sources_answer_the_same_questions():
    """Training asks a source the same things whatever it is (no isinstance in the training flow)."""
    def public(cls) -> set[str]:
        return {name for name in dir(cls) if not name.startswith("_")}

    assert public(FolderSource) == public(ShardSource) == {"counts", "summary", "size", "check", "images",
                                                           "features", "files", "content", "image_sides",
                                                           "train_weights"}
    for name in ("size", "check", "images", "features"):  # each source answers in its own way
        assert name in vars(FolderSource) and name in vars(ShardSource)


def test_shards_make_no_pixel_cache(data, tmp_path):
    """A stream has no files to key the pixel cache by: training from shards leaves none."""
    shards, cache = tmp_path / "shards", tmp_path / "cache"
    assert main(["-q", "shard", str(data), str(shards)]) == 0
    assert main(["-q", "train", str(shards), *PRETRAINED_ARGS, "--strategy", "finetune", "--epochs", "1",
                 "--cache-dir", str(cache), "--out", str(tmp_path / "run"), "--workers", "0"]) == 0
    assert not (cache / "pixels").exists()
    assert main(["-q", "train", str(data), *PRETRAINED_ARGS, "--strategy", "finetune", "--epochs", "1",
                 "--cache-dir", str(cache), "--out", str(tmp_path / "run2"), "--workers", "0"]) == 0
    assert any((cache / "pixels").rglob("*.arr"))  # the folder's images are cached


def _epoch(batches: list[tuple[torch.Tensor, torch.Tensor]], accumulate: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    loader = [(x, y, torch.arange(len(y))) for x, y in batches]
    train_one_epoch(model, loader, optimizer, scheduler, nn.CrossEntropyLoss(), torch.device("cpu"), None,
                    "test", accumulate=accumulate)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_accumulation_divides_a_short_last_group_by_its_size():
    """Three batches of 4 with --accumulate 2 step as batches of 8 and 4: the last group holds one batch,
    so its loss is divided by 1, not 2 (timm's last_accum_steps)."""
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 4, generator=generator), torch.randint(0, 3, (12,), generator=generator)
    quarters = [(x[i:i + 4], y[i:i + 4]) for i in (0, 4, 8)]
    accumulated = _epoch(quarters, accumulate=2)
    larger = _epoch([(x[:8], y[:8]), (x[8:], y[8:])], accumulate=1)
    for name in larger:
        torch.testing.assert_close(accumulated[name], larger[name], rtol=1e-5, atol=1e-6)
