"""The input size chosen from the data (imgtune.sizing): the rule, its record in the run folder, and
prediction at that size. Tiny generated images (40 px) and the real pretrained MobileNetV2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from datagen import make_split_dataset
from imgtune import models, sizing
from imgtune.cli import main
from imgtune.config import ModelConfig
from imgtune.predict import Predictor


@pytest.mark.parametrize("sides, expected", [
    ([60, 60, 58, 64], 160),  # median 60: 2.5 x 60 = 150, rounded up to 160
    ([64] * 5, 160),  # scikit-learn's digits upscaled to 64 px (the benchmark's): 160
    ([28] * 5, 128),  # MNIST's 28 px: 70 px is below the floor
    ([32] * 9 + [500], 128),  # the median, not the mean: one large photo does not move it
    ([80, 84, 90], 224),  # 2.5 x 84 = 210 -> 224, capped at the pretrained size
    ([150, 300, 400], 224),  # not much smaller than 224: the pretrained size
    ([], 224),  # sizes unknown (shards): the pretrained size
])
def test_rule_picks_the_documented_size(sides, expected):
    assert sizing.rule_size(sides, 224)[0] == expected


def test_sizes_are_multiples_the_architecture_takes():
    assert sizing.multiple_for(224) == 32
    assert sizing.multiple_for(518) == 14  # DINOv2's patch grid
    assert sizing.rule_size([60] * 3, 518)[0] == 154  # 150 rounded up to a multiple of 14


def test_a_transformer_built_for_its_grid_keeps_its_pretrained_size():
    built = models.create(ModelConfig(name="vit_tiny_patch16_224", pretrained=False), 2)
    choice = sizing.choose(_config(), [40] * 10, built)
    assert (choice.img_size, choice.method) == (224, "pretrained")  # with --size-from data
    assert "only takes its pretrained size" in choice.reason


def _config(**model):
    from imgtune.config import RunConfig

    return RunConfig(model=ModelConfig(size_from="data", **model))


def train(data: Path, out: Path, *args: str) -> None:
    assert main(["-q", "train", str(data), "--workers", "0", "--out", str(out), "--model", "mobilenet_v2",
                 "--offline", "--strategy", "linear-probe", "--epochs", "1", *args]) == 0


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_split_dataset(tmp_path_factory.mktemp("data"), train=6, val=3, size=40)


@pytest.mark.slow
def test_run_records_the_size_and_predict_uses_it(data, tmp_path):
    run = tmp_path / "run"
    train(data, run)  # the default: --size-from data
    meta = json.loads((run / "meta.json").read_text())
    assert meta["input_size"]["method"] == "data"
    assert meta["input_size"]["median_side"] == 40
    assert meta["input_size"]["img_size"] == meta["preprocessing"]["img_size"] == 128
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["img_size"] == 128
    predictor = Predictor.from_run(run, device="cpu")
    image = next((data / "val").rglob("*.png"))
    assert tuple(predictor.load_one(image).shape) == (3, 128, 128)
    assert main(["-q", "predict", str(run), str(image), "--device", "cpu"]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("flags, size, method", [(["--img-size", "64"], 64, "flag"),
                                                 (["--size-from", "pretrained"], 224, "pretrained"),
                                                 ([], 128, "data")])  # the default: the rule
def test_flags_override_the_rule(data, tmp_path, flags, size, method):
    train(data, tmp_path / "run", *flags)
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert (meta["preprocessing"]["img_size"], meta["input_size"]["method"]) == (size, method)
