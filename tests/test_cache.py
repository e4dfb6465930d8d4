"""The feature cache (frozen backbones) and the decoded-pixel cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datagen import PRETRAINED_ARGS, make_split_dataset
from imgtune import cache, features
from imgtune.cli import main
from imgtune.data import eval_transform, train_transform
from imgtune.data.dataset import ImageDataset
from imgtune.data.scan import check_files, find_samples
from imgtune.data.transforms import Preprocessing


def train(data: Path, out: Path, cache_dir: Path, *args: str) -> int:
    return main(["-q", "train", str(data), "--workers", "0", "--out", str(out), "--cache-dir", str(cache_dir),
                 *PRETRAINED_ARGS, *args])


@pytest.fixture
def counted(monkeypatch):
    """Counts the images whose backbone features are actually computed."""
    calls = []
    original = features._compute

    def spy(built, run, samples, *args, **kwargs):
        calls.append(len(samples))
        return original(built, run, samples, *args, **kwargs)

    monkeypatch.setattr(features, "_compute", spy)
    return calls


def test_features_are_computed_once_and_reused_by_other_head_settings(tmp_path, counted):
    data = make_split_dataset(tmp_path / "data", train=6, val=3)
    store = tmp_path / "cache"
    assert train(data, tmp_path / "a", store, "--strategy", "linear-probe", "--epochs", "2") == 0
    assert sum(counted) == 27  # 18 train + 9 val images
    counted.clear()
    assert train(data, tmp_path / "b", store, "--strategy", "linear-probe", "--epochs", "3", "--lr", "0.01",
                 "--head", "mlp") == 0
    assert counted == []
    files, _ = cache.cache_size(store / "features")
    assert files == 27


def test_changed_and_added_files_are_recomputed_nothing_else(tmp_path, counted):
    data = make_split_dataset(tmp_path / "data", train=6, val=3)
    store = tmp_path / "cache"
    assert train(data, tmp_path / "a", store, "--strategy", "linear-probe", "--epochs", "1") == 0
    counted.clear()
    changed = sorted((data / "train" / "red_circle").glob("*.png"))[0]
    image = np.array(Image.open(changed))
    image[0, 0] = 255 - image[0, 0]
    Image.fromarray(image).save(changed)
    (data / "val" / "red_circle" / "copy.png").write_bytes(changed.read_bytes())
    # (a copy in val is leakage, refused without --allow-leakage: tests/test_duplicates.py)
    assert train(data, tmp_path / "b", store, "--strategy", "linear-probe", "--epochs", "1", "--allow-leakage") == 0
    assert counted == [1]  # the changed file; its copy in val has the same content, so it is found cached


def test_other_preprocessing_is_another_cache_entry(tmp_path, counted):
    data = make_split_dataset(tmp_path / "data", train=4, val=2)
    store = tmp_path / "cache"
    assert train(data, tmp_path / "a", store, "--strategy", "linear-probe", "--epochs", "1") == 0
    counted.clear()
    assert train(data, tmp_path / "b", store, "--strategy", "linear-probe", "--epochs", "1", "--img-size", "96") == 0
    assert sum(counted) == 18
    assert len(list((store / "features").iterdir())) == 2


def test_cached_metrics_match_a_fresh_evaluation_of_the_saved_model(tmp_path):
    """Final metrics computed from cached features equal `imgtune evaluate` running the whole model."""
    data = make_split_dataset(tmp_path / "data", train=6, val=4)
    run = tmp_path / "run"
    assert train(data, run, tmp_path / "cache", "--strategy", "linear-probe", "--epochs", "2") == 0
    saved = json.loads((run / "metrics.json").read_text())
    from imgtune.evaluation import evaluate

    fresh = evaluate(run, device="cpu").report
    assert fresh["accuracy"] == saved["accuracy"]
    assert fresh["loss"] == pytest.approx(saved["loss"], abs=1e-5)


def test_no_cache_writes_nothing(tmp_path):
    data = make_split_dataset(tmp_path / "data", train=4, val=2)
    store = tmp_path / "cache"
    assert train(data, tmp_path / "a", store, "--strategy", "gradual", "--epochs", "2", "--no-cache") == 0
    assert cache.cache_size(store) == (0, 0)


def test_pixel_cache_is_filled_by_training_and_exact_for_evaluation(tmp_path):
    data = make_split_dataset(tmp_path / "data", train=4, val=2, size=300)
    store = tmp_path / "cache"
    assert train(data, tmp_path / "a", store, "--strategy", "finetune", "--epochs", "1") == 0
    files, _ = cache.cache_size(store / "pixels")
    assert files == 18
    samples, _ = find_samples(data)
    good, _, _ = check_files(samples, progress=False)
    pre = Preprocessing(64, 73)  # what PRETRAINED_ARGS (--img-size 64) gives mobilenet_v2
    pixels = cache.pixel_store(store, pre.resize_size, pre.interpolation)
    cached = ImageDataset(good, ["blue_triangle", "green_square", "red_circle"], eval_transform(pre),
                          draft_size=pre.resize_size, pixels=pixels, preprocessing=pre)
    direct = ImageDataset(good, cached.class_to_idx, eval_transform(pre), draft_size=pre.resize_size)
    for i in range(len(good)):
        assert torch.equal(cached[i][0], direct[i][0])
    stored = pixels.get(good[0].digest)
    assert stored.dtype == np.uint8 and min(stored.shape[:2]) == pre.resize_size
    augmented = ImageDataset(good, cached.class_to_idx, train_transform(pre, "strong"), pixels=pixels,
                             preprocessing=pre)
    assert augmented[0][0].shape == (3, 64, 64)


def test_damaged_cache_file_is_recomputed(tmp_path):
    store = cache.ArrayStore(tmp_path / "s", {"kind": "test"})
    store.put("ab" * 16, np.arange(4, dtype=np.float32))
    assert np.array_equal(store.get("ab" * 16), np.arange(4, dtype=np.float32))
    store.path("ab" * 16).write_bytes(b"\x93NUMPY garbage")
    assert store.get("ab" * 16) is None


def _own_format(array):
    def write(path):
        cache.write_entry(path, array)
    return write


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def _npy(array):
    def write(path):
        with path.open("wb") as handle:
            np.save(handle, array)
    return write


DAMAGE = {
    "zero bytes": lambda path: path.write_bytes(b""),
    "a bare .npy of the right shape (format 1)": _npy(np.ones(8, np.float32)),
    "NaN garbage in .npy format": _npy(np.full(8, np.nan, np.float32)),
    "another shape": _own_format(np.ones(9, np.float32)),
    "another dtype": _own_format(np.ones(8, np.float64)),
    "NaN with a valid checksum": _own_format(np.full(8, np.nan, np.float32)),
    "a flipped bit (checksum)": _flip_last_byte,
    "cut short": lambda path: path.write_bytes(path.read_bytes()[:-4]),
    "a header claiming 2**40 values": lambda path: path.write_bytes(
        path.read_bytes().replace(b"[8]", b"[1099511627776]")),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_every_damaged_entry_is_named_and_treated_as_absent(tmp_path, caplog, damage):
    store = cache.feature_store(tmp_path, {"name": "test"}, num_features=8)
    good = np.linspace(0, 1, 8, dtype=np.float32)
    store.put("cd" * 16, good)
    assert np.array_equal(store.get("cd" * 16), good)
    DAMAGE[damage](store.path("cd" * 16))
    with caplog.at_level("WARNING"):
        assert store.get("cd" * 16) is None
    assert str(store.path("cd" * 16)) in caplog.text
    store.put("cd" * 16, good)  # what the caller does next: computed again, and stored
    assert np.array_equal(store.get("cd" * 16), good)


def test_pixel_entries_must_have_the_stores_shorter_side(tmp_path, caplog):
    store = cache.pixel_store(tmp_path, 73, "bilinear")
    store.put("ef" * 16, np.zeros((73, 90, 3), np.uint8))
    assert store.get("ef" * 16).shape == (73, 90, 3)
    store.get("ef" * 16)[0, 0, 0] = 1  # writable, as torch.from_numpy wants
    for shape in ((64, 90, 3), (73, 90, 4), (73, 90)):
        store.put("ef" * 16, np.zeros(shape, np.uint8))
        assert store.get("ef" * 16) is None
    assert "expected a shorter side of 73" in caplog.text and "expected *x*x3" in caplog.text


def test_a_new_cache_folder_is_marked_and_tagged_an_existing_one_only_marked(tmp_path):
    cache.pixel_store(tmp_path / "new", 73, "bilinear")
    assert (tmp_path / "new" / cache.MARKER).is_file()
    assert (tmp_path / "new" / cache.TAG).read_text().startswith("Signature: 8a477f597d28d172789f06886806bc55")
    project = tmp_path / "project"
    project.mkdir()
    (project / "train.py").write_text("")
    cache.pixel_store(project, 73, "bilinear")
    assert (project / cache.MARKER).is_file()
    assert not (project / cache.TAG).exists()  # backup tools would skip the whole project


def test_clear_refuses_an_unmarked_folder_that_is_not_only_an_old_cache(tmp_path, capsys):
    old = tmp_path / "old"
    store = old / "pixels" / "73-bilinear"
    (store / "ab").mkdir(parents=True)
    (store / "key.json").write_text("{}")
    np.save(store / "ab" / ("ab" * 16 + ".npy"), np.zeros((73, 73, 3), np.uint8))
    (store / "ab" / "mine.txt").write_text("not imgtune's")
    before = sorted(old.rglob("*"))
    assert main(["cache", "clear", "--cache-dir", str(old)]) == 2
    assert "mine.txt, which imgtune did not write" in capsys.readouterr().err
    assert sorted(old.rglob("*")) == before
    (store / "ab" / "mine.txt").unlink()
    assert main(["cache", "clear", "--cache-dir", str(old)]) == 0
    assert "removed 1 cached file(s) and 1 other file(s)" in capsys.readouterr().out
    assert not any(path.is_file() for path in old.rglob("*"))


def test_clear_of_a_file_or_a_missing_folder(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["cache", "clear", "--cache-dir", str(tmp_path / "file")]) == 2
    assert (tmp_path / "file").read_text() == "x"
    assert main(["cache", "clear", "--cache-dir", str(tmp_path / "missing")]) == 0
    assert "removed 0 cached file(s)" in capsys.readouterr().out


def test_cache_command_info_and_clear(tmp_path, capsys):
    data = make_split_dataset(tmp_path / "data", train=4, val=2)
    store = tmp_path / "cache"
    assert train(data, tmp_path / "a", store, "--strategy", "linear-probe", "--epochs", "1") == 0
    capsys.readouterr()
    assert main(["cache", "info", "--cache-dir", str(store)]) == 0
    assert "features: 18 file(s)" in capsys.readouterr().out
    assert len(list(store.glob("features/*/body-*.onnx"))) == 1  # the body ONNX Runtime ran (imgtune.body_runtime)
    assert main(["cache", "clear", "--cache-dir", str(store)]) == 0
    # 18 feature vectors and 18 file checks; the key.json of both stores and the exported body
    assert "removed 36 cached file(s) and 3 other file(s)" in capsys.readouterr().out
    assert cache.cache_size(store) == (0, 0)
    assert sorted(path.name for path in store.rglob("*")) == ["CACHEDIR.TAG", "IMGTUNE_CACHE.json", "checks",
                                                               "features"]


def test_file_checks_are_remembered_by_content_and_redone_when_damaged(tmp_path, monkeypatch, caplog):
    from imgtune.data import scan

    data = make_split_dataset(tmp_path / "data", train=3, val=1)
    store = cache.check_store(tmp_path / "cache")
    samples, _ = find_samples(data)
    decoded = []
    probe = scan.probe
    monkeypatch.setattr(scan, "probe", lambda *a, **k: decoded.append(1) or probe(*a, **k))
    first = scan.inspect_files(samples, progress=False, checks=store)
    assert len(decoded) == len(samples) == 12
    again = scan.inspect_files(samples, progress=False, checks=store)
    assert len(decoded) == 12  # nothing decoded the second time
    assert [(c.sample, c.info) for c in again] == [(c.sample, c.info) for c in first]  # digests and fingerprints
    entry = store.path(first[0].sample.digest)
    _flip_last_byte(entry)
    scan.inspect_files(samples, progress=False, checks=store)
    assert len(decoded) == 13 and f"damaged cache entry {entry}" in caplog.text
    write_unreadable_copy = data / "train" / "red_circle" / "broken.png"
    write_unreadable_copy.write_bytes(b"not an image")
    for _ in range(2):  # a broken file is never remembered: checked (and skipped) every time
        good, skipped, _ = check_files([*samples, scan.Sample(write_unreadable_copy, "red_circle")], False, store)
        assert len(good) == 12 and skipped[0][0] == str(write_unreadable_copy)
    assert len(decoded) == 15
