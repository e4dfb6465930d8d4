"""scan.load_splits: layouts, seeded stratified splits, skipped files, and DataErrors that name the culprit."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest
import torch
from imagegen import (write_animated_gif, write_class_tree, write_csv, write_solid, write_text,
                      write_truncated_jpeg)

from imgtune.data.dataset import ImageDataset, collate_skipping_none
from imgtune.data.scan import format_counts, load_splits
from imgtune.errors import DataError


def load(source, **kwargs):
    return load_splits(source, progress=False, **kwargs)


def per_split(data) -> dict[str, Counter]:
    return {name: Counter(s.label for s in data.split(name)) for name in ("train", "val", "test")}


def split_of(data) -> dict[str, str]:
    return {s.path.name + s.label: s.split for s in data.samples}


# ---- layouts ------------------------------------------------------------------------------------------


def test_train_val_test_folders_are_used_as_given(tmp_path):
    write_class_tree(tmp_path / "train", {"cat": 3, "dog": 2})
    write_class_tree(tmp_path / "val", {"cat": 1, "dog": 1})
    write_class_tree(tmp_path / "test", {"cat": 2, "dog": 1})
    data = load(tmp_path)
    assert data.classes == ["cat", "dog"]
    assert data.layout == "split folders (train, val, test)"
    assert data.counts() == {"train": {"cat": 3, "dog": 2}, "val": {"cat": 1, "dog": 1},
                             "test": {"cat": 2, "dog": 1}}
    assert all(s.path.parent.parent.name == s.split and s.path.parent.name == s.label for s in data.samples)
    assert data.skipped == []


def test_train_and_valid_alias_folders(tmp_path):
    write_class_tree(tmp_path / "train", {"a": 2, "b": 2})
    write_class_tree(tmp_path / "valid", {"a": 1, "b": 1})
    data = load(tmp_path)
    assert data.layout == "split folders (train, val)"
    assert data.counts()["val"] == {"a": 1, "b": 1}


def test_train_folder_without_val_splits_train(tmp_path):
    write_class_tree(tmp_path / "train", {"a": 10, "b": 10})
    data = load(tmp_path, val_fraction=0.2)
    assert per_split(data)["val"] == Counter(a=2, b=2)
    assert per_split(data)["train"] == Counter(a=8, b=8)


def test_class_folders_split_stratified_and_seeded(tmp_path):
    write_class_tree(tmp_path, {"a": 20, "b": 10, "c": 5})
    first = load(tmp_path, val_fraction=0.2, test_fraction=0.2, seed=1)
    assert first.layout == "class folders"
    assert first.classes == ["a", "b", "c"]
    counts = per_split(first)
    assert counts["val"] == Counter(a=4, b=2, c=1) and counts["test"] == Counter(a=4, b=2, c=1)
    assert counts["train"] == Counter(a=12, b=6, c=3)
    assert len(first.samples) == 35 and len({s.path for s in first.samples}) == 35
    assert split_of(load(tmp_path, val_fraction=0.2, test_fraction=0.2, seed=1)) == split_of(first)
    assert split_of(load(tmp_path, val_fraction=0.2, test_fraction=0.2, seed=2)) != split_of(first)


def test_every_class_gets_val_and_test_even_when_tiny(tmp_path):
    write_class_tree(tmp_path, {"big": 40, "small": 3})
    data = load(tmp_path, val_fraction=0.1, test_fraction=0.1, seed=0)
    counts = per_split(data)
    assert counts["val"]["small"] == 1 and counts["test"]["small"] == 1 and counts["train"]["small"] == 1
    assert counts["val"]["big"] == 4 and counts["test"]["big"] == 4
    assert "test" not in load(tmp_path, val_fraction=0.1, test_fraction=0.0).counts()


def test_csv_with_path_and_label_relative_to_csv_folder(tmp_path, monkeypatch):
    rows = []
    for label, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        for i in range(5):
            write_solid(tmp_path / "images" / f"{label}{i}.png", colour)
            rows.append([f"../images/{label}{i}.png", label])
    csv_path = write_csv(tmp_path / "lists" / "labels.csv", ["path", "label"], rows)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # relative to the CSV, not to the working directory
    with pytest.raises(DataError, match="line 2: '../images/cat0.png' is outside the CSV's folder"):
        load(csv_path, val_fraction=0.2)  # ../ leaves the CSV's folder: only with allow_outside_paths
    data = load(csv_path, val_fraction=0.2, allow_outside_paths=True)
    assert data.layout == "csv" and data.classes == ["cat", "dog"]
    assert per_split(data)["val"] == Counter(cat=1, dog=1)
    assert all(s.path.is_file() and s.path.name.startswith(s.label) for s in data.samples)


def test_csv_with_split_column_and_valid_alias(tmp_path):
    rows = []
    for label in ("a", "b"):
        for i, split in enumerate(["train", "train", "Valid", "test"]):
            write_solid(tmp_path / "img" / f"{label}{i}.png")
            rows.append([f"img/{label}{i}.png", label, split])
    data = load(write_csv(tmp_path / "data.csv", ["Path", " label", "split"], rows))
    assert data.counts() == {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}, "test": {"a": 1, "b": 1}}
    assert {s.path.name for s in data.split("val")} == {"a2.png", "b2.png"}


def test_formats_are_counted(tmp_path):
    for i in range(3):
        write_solid(tmp_path / "train" / "a" / f"{i}.jpg")
    write_animated_gif(tmp_path / "train" / "b" / "0.gif", [(0, 0, 255), (0, 255, 0)])
    write_solid(tmp_path / "val" / "a" / "0.png")
    write_solid(tmp_path / "val" / "b" / "0.png")
    data = load(tmp_path)
    assert data.formats == Counter(JPEG=3, PNG=2, GIF=1)
    assert format_counts(data.formats) == "3 JPEG, 2 PNG, 1 GIF"
    assert data.summary()["formats_text"] == "3 JPEG, 2 PNG, 1 GIF"
    assert format_counts(Counter()) == "no images"


def test_undecodable_files_are_skipped_with_reasons(tmp_path):
    write_class_tree(tmp_path, {"a": 5, "b": 5})
    write_text(tmp_path / "a" / "fake.jpg")
    write_truncated_jpeg(tmp_path / "b" / "cut.jpg")
    (tmp_path / "b" / "empty.png").write_bytes(b"")
    data = load(tmp_path)
    skipped = {p.rsplit("/", 1)[-1]: reason for p, reason in data.skipped}
    assert set(skipped) == {"fake.jpg", "cut.jpg", "empty.png"}
    assert "not an image" in skipped["fake.jpg"] and "truncated" in skipped["cut.jpg"]
    assert not {s.path.name for s in data.samples} & set(skipped)
    assert len(data.samples) == 10
    assert [entry["path"] for entry in data.summary()["skipped"]] == [p for p, _ in data.skipped]


def test_csv_rows_for_missing_files_are_skipped(tmp_path):
    rows = [[f"{label}{i}.png", label] for label in "ab" for i in range(3)]
    for name, _ in rows:
        write_solid(tmp_path / name)
    csv_path = write_csv(tmp_path / "d.csv", ["path", "label"], rows + [["gone.png", "a"]])
    data = load(csv_path)
    assert [(p.rsplit("/", 1)[-1], r) for p, r in data.skipped] == [("gone.png", "file not found")]
    assert len(data.samples) == 6


def test_hidden_files_folders_and_other_extensions_are_ignored(tmp_path):
    write_class_tree(tmp_path, {"a": 2, "b": 2})
    write_solid(tmp_path / "a" / ".hidden.png")
    write_solid(tmp_path / "a" / ".thumbs" / "x.png")
    write_solid(tmp_path / ".cache" / "0.png")
    write_text(tmp_path / "a" / "notes.txt")
    write_text(tmp_path / "b" / "labels.csv", "path,label\n")
    (tmp_path / "b" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    write_solid(tmp_path / "a" / "nested" / "deep.png")  # sub-folders of a class are part of it
    data = load(tmp_path, val_fraction=0.3)
    assert data.classes == ["a", "b"] and data.skipped == []
    assert sorted(s.path.name for s in data.samples) == ["0.png", "0.png", "1.png", "1.png", "deep.png"]


# ---- errors -------------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "nope")) + ".*does not exist"):
        load(tmp_path / "nope")


def test_file_that_is_not_csv(tmp_path):
    path = write_solid(tmp_path / "one.png")
    with pytest.raises(DataError, match="one.png.*not a .csv"):
        load(path)


def test_folder_without_class_folders(tmp_path):
    write_solid(tmp_path / "loose.png")
    with pytest.raises(DataError, match="no class folders in " + re.escape(str(tmp_path))):
        load(tmp_path)


def test_empty_class_folder(tmp_path):
    write_class_tree(tmp_path, {"a": 3, "b": 3})
    write_text(tmp_path / "empty" / "readme.txt")
    with pytest.raises(DataError, match="class folder .*empty holds no image files"):
        load(tmp_path)


def test_single_class(tmp_path):
    write_class_tree(tmp_path, {"only": 5})
    with pytest.raises(DataError, match="only one class .*'only'"):
        load(tmp_path)


def test_val_split_missing_a_class(tmp_path):
    write_class_tree(tmp_path / "train", {"a": 2, "b": 2})
    write_class_tree(tmp_path / "val", {"a": 1})
    with pytest.raises(DataError, match=r"val split has no images of class\(es\) \['b'\]"):
        load(tmp_path)


def test_test_split_missing_a_class(tmp_path):
    write_class_tree(tmp_path / "train", {"a": 2, "b": 2})
    write_class_tree(tmp_path / "val", {"a": 1, "b": 1})
    write_class_tree(tmp_path / "test", {"b": 1})
    with pytest.raises(DataError, match=r"test split has no images of class\(es\) \['a'\]"):
        load(tmp_path)


def test_val_class_not_in_train(tmp_path):
    write_class_tree(tmp_path / "train", {"a": 2, "b": 2})
    write_class_tree(tmp_path / "val", {"a": 1, "b": 1, "stray": 1})
    with pytest.raises(DataError, match=r"\['stray'\] have no readable training images"):
        load(tmp_path)


def test_class_whose_only_images_are_undecodable(tmp_path):
    write_class_tree(tmp_path, {"a": 3, "b": 3})
    write_text(tmp_path / "broken" / "1.jpg")
    write_truncated_jpeg(tmp_path / "broken" / "2.jpg")
    with pytest.raises(DataError, match=r"\['broken'\] have no readable training images"):
        load(tmp_path)


def test_csv_class_whose_only_files_are_missing(tmp_path):
    rows = [[f"{label}{i}.png", label] for label in "ab" for i in range(3)]
    for name, _ in rows:
        write_solid(tmp_path / name)
    csv_path = write_csv(tmp_path / "d.csv", ["path", "label"], rows + [["gone.png", "ghost"]])
    with pytest.raises(DataError, match="'ghost'"):
        load(csv_path)


def test_val_folder_whose_images_are_all_unreadable(tmp_path):
    """A val/ folder that was given must not be silently replaced by a split of train/."""
    write_class_tree(tmp_path / "train", {"a": 5, "b": 5})
    write_text(tmp_path / "val" / "a" / "0.jpg")
    write_text(tmp_path / "val" / "b" / "0.jpg")
    with pytest.raises(DataError, match="no readable validation images"):
        load(tmp_path)


def test_nothing_readable(tmp_path):
    write_text(tmp_path / "a" / "0.jpg")
    write_text(tmp_path / "b" / "0.jpg")
    with pytest.raises(DataError, match=r"no readable training images \(2 file\(s\) could not be read\)"):
        load(tmp_path)


@pytest.mark.parametrize("header", [["file", "label"], ["path", "class"], ["path"], []])
def test_csv_missing_columns(tmp_path, header):
    path = write_csv(tmp_path / "bad.csv", header, [["x.png", "a"]] if header else [])
    with pytest.raises(DataError, match="bad.csv needs a header with columns path,label"):
        load(path)


def test_csv_bad_split_value(tmp_path):
    write_solid(tmp_path / "x.png")
    rows = [["x.png", "a", "train"], ["x.png", "b", "holdout"]]
    path = write_csv(tmp_path / "d.csv", ["path", "label", "split"], rows)
    with pytest.raises(DataError, match=r"d.csv line 3: split 'holdout' is not one of train, val, test"):
        load(path)


def test_csv_empty_split_cell(tmp_path):
    write_solid(tmp_path / "x.png")
    path = write_csv(tmp_path / "d.csv", ["path", "label", "split"], [["x.png", "a", "train"], ["x.png", "b", ""]])
    with pytest.raises(DataError, match="d.csv line 3: the split column is empty"):
        load(path)


def test_csv_empty_label(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["path", "label"], [["x.png", ""]])
    with pytest.raises(DataError, match="d.csv line 2: empty path or label"):
        load(path)


def test_csv_row_with_more_fields_than_header(tmp_path):
    """An unquoted comma in a path shifts the columns: say which line, do not crash."""
    path = tmp_path / "d.csv"
    path.write_text("path,label\na.png,cat\nmy,photo.png,dog\n")
    with pytest.raises(DataError, match="d.csv line 3"):
        load(path)


def test_csv_header_only(tmp_path):
    with pytest.raises(DataError, match="has a header but no rows"):
        load(write_csv(tmp_path / "d.csv", ["path", "label"], []))


@pytest.mark.parametrize("test_fraction,needed", [(0.0, 2), (0.2, 3)])
def test_class_too_small_to_split(tmp_path, test_fraction, needed):
    write_class_tree(tmp_path, {"a": 5, "tiny": needed - 1})
    with pytest.raises(DataError, match=f"class 'tiny' has only {needed - 1} readable image.*at least {needed} distinct"):
        load(tmp_path, test_fraction=test_fraction)


# ---- dataset ------------------------------------------------------------------------------------------


def to_tensor(image):
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def test_file_unreadable_after_scan_is_skipped_by_dataset(tmp_path):
    write_class_tree(tmp_path, {"a": 3, "b": 3})
    data = load(tmp_path, val_fraction=0.3)
    train = data.split("train")
    broken = train[0].path
    broken.write_bytes(b"")  # broke between the scan and training
    dataset = ImageDataset(train, data.classes, to_tensor)
    assert dataset[0] is None
    image, label, index = dataset[1]
    assert image.shape == (3, 16, 16) and label == data.classes.index(train[1].label) and index == 1
    batch = collate_skipping_none([dataset[i] for i in range(len(dataset))])
    images, labels, indices = batch
    assert images.shape == (len(train) - 1, 3, 16, 16)
    assert indices.tolist() == list(range(1, len(train)))
    assert collate_skipping_none([None, None]) is None


@pytest.mark.parametrize("times", [(0.0, 1.0, 0.0, 2.0), (0.0, 2.0, 0.0, 1.0)], ids=["this-thread", "threads"])
def test_inspect_files_gives_every_check_in_order_either_way(tmp_path, monkeypatch, times):
    """The first files are checked in this thread, the next in threads; the faster way (here a fake clock
    decides) checks the rest, and the checks come back in the samples' order, unreadable files included."""
    from imgtune.data import scan

    write_class_tree(tmp_path, {"a": 9, "b": 9})
    write_text(tmp_path / "a" / "broken.png", "not an image")
    samples, _ = scan.find_samples(tmp_path)
    expected = [scan.inspect_file(s) for s in samples]
    monkeypatch.setattr(scan, "TRIAL", 3)
    clock = iter(times)
    monkeypatch.setattr(scan.time, "perf_counter", lambda: next(clock))
    got = scan.inspect_files(samples, progress=False)
    assert [(c.sample, c.info, c.problem) for c in got] == [(c.sample, c.info, c.problem) for c in expected]
    assert sum(c.problem is not None for c in got) == 1 and next(clock, None) is None  # both ways were timed
