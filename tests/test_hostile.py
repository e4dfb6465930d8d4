"""Hostile input and ordinary mistakes: only regular files are read, and never more than the size limit;
CSV paths stay in the CSV's folder; every option has its field's type and a finite, sensible value;
folders that cannot be written, a full disk and odd CSVs are usage or data errors that say what to do."""

from __future__ import annotations

import errno
import logging
import os
import threading
from pathlib import Path

import pytest
import torch

from datagen import SCRATCH_ARGS, make_class_folders
from imgtune import atomic
from imgtune import config as cfg
from imgtune.cli import main
from imgtune.data.decode import DecodeError, load_rgb
from imgtune.data.reading import FileTooLarge, NotRegularFile, read_bounded
from imgtune.data.scan import inspect_file, load_splits, read_csv, Sample
from imgtune.errors import DataError, ModelError, UsageError
from imgtune.predict import expand_paths
from imgtune.weights import load_file


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_class_folders(tmp_path_factory.mktemp("hostile") / "data", per_class=6, size=32)


def make_fifo(path: Path) -> Path:
    """A FIFO that unblocks a reader after a few seconds (by opening its other end), so that code which
    opens it anyway sees an empty file instead of hanging the test run."""
    os.mkfifo(path)

    def release():
        fd = os.open(path, os.O_WRONLY)  # waits for a reader; a fixed program never opens it
        os.close(fd)

    threading.Timer(3.0, lambda: threading.Thread(target=release, daemon=True).start()).start()
    return path


# ---- only regular files, never more than the limit ---------------------------------------------------


def test_fifo_in_data_is_skipped_with_its_reason(tmp_path):
    root = make_class_folders(tmp_path / "d", per_class=4, size=32)
    fifo = make_fifo(root / "red_circle" / "x.jpg")
    splits = load_splits(root, progress=False)
    assert [(p, r) for p, r in splits.skipped] == [(str(fifo), splits.skipped[0][1])]
    assert "FIFO" in splits.skipped[0][1] and "regular file" in splits.skipped[0][1]


def test_devices_are_refused_before_reading(tmp_path):
    # /dev/null: reading it is harmless should this regress (/dev/zero is tried in faults_hostile.py,
    # in a child process with a memory limit)
    check = inspect_file(Sample(Path("/dev/null"), "a"))
    assert check.problem == "not-a-file" and "character device" in check.reason
    with pytest.raises(NotRegularFile):
        read_bounded("/dev/zero")
    with pytest.raises(DecodeError, match="character device"):
        load_rgb("/dev/null")


def test_every_read_is_bounded_by_the_size_limit(tmp_path, monkeypatch):
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * 4096)
    monkeypatch.setenv("IMGTUNE_MAX_FILE_MB", str(2048 / (1 << 20)))  # 2 KiB
    check = inspect_file(Sample(big, "a"))
    assert check.problem == "too-large" and "IMGTUNE_MAX_FILE_MB" in check.reason
    with pytest.raises(FileTooLarge):
        read_bounded(big)
    with pytest.raises(DecodeError, match="size limit"):
        load_rgb(big)
    monkeypatch.setenv("IMGTUNE_MAX_FILE_MB", "lots")
    with pytest.raises(UsageError, match="IMGTUNE_MAX_FILE_MB"):
        read_bounded(big)


def test_predict_skips_what_is_not_a_regular_file_in_a_folder(tmp_path, caplog):
    root = make_class_folders(tmp_path / "d", classes=("red_circle",), per_class=2, size=32)
    fifo = make_fifo(root / "red_circle" / "pipe.png")
    with caplog.at_level(logging.WARNING):
        found = expand_paths([root])
    assert fifo not in found and len(found) == 2
    assert f"skipping {fifo}: a FIFO" in caplog.text


# ---- CSVs --------------------------------------------------------------------------------------------


def write_csv(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(["path,label", *lines]) + "\n")
    return path


@pytest.mark.parametrize("name", ["../outside.png", "red_circle/../../outside.png", "/etc/passwd"])
def test_csv_paths_leaving_its_folder_are_refused(data, tmp_path, name):
    csv_path = write_csv(data / "rows.csv", ["red_circle/red_circle_00.png,a", f"{name},b"])
    with pytest.raises(DataError, match=r"line 3: .* is outside the CSV's folder.*--allow-outside-paths"):
        read_csv(csv_path)
    assert len(read_csv(csv_path, allow_outside_paths=True)) == 2


def test_csv_symlinks_inside_its_folder_may_lead_anywhere(data, tmp_path):
    (tmp_path / "store").mkdir()
    target = tmp_path / "store" / "blob.png"
    target.write_bytes((data / "red_circle" / "red_circle_00.png").read_bytes())
    folder = tmp_path / "annexed"
    folder.mkdir()
    (folder / "x.png").symlink_to(target)  # git-annex, DVC: the data folder holds links
    csv_path = write_csv(folder / "rows.csv", ["x.png,a", f"{folder}/x.png,b"])
    assert [s.path for s in read_csv(csv_path)] == [target, target]


def test_non_utf8_csv_error_gives_the_line(tmp_path):
    csv_path = tmp_path / "rows.csv"
    csv_path.write_bytes(b"path,label\na.png,a\nb.png,b\n\xe9t\xe9.png,c\n")
    with pytest.raises(DataError, match=r"line 4: not UTF-8"):
        read_csv(csv_path)


def test_repeated_csv_rows_count_once_with_a_warning(data, caplog):
    csv_path = write_csv(data / "twice.csv", ["red_circle/red_circle_00.png,a", "red_circle/red_circle_01.png,a",
                                               "red_circle/red_circle_00.png,a"])
    with caplog.at_level(logging.WARNING):
        samples = read_csv(csv_path)
    assert len(samples) == 2
    assert "1 repeated row(s) counted once: line 4 repeats line 2 (red_circle_00.png)" in caplog.text


# ---- option values -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, fragment", [
    ("train:\n  lr: fast\n", "train.lr (--lr) must be a number or auto; got 'fast'"),
    ("train:\n  seed: abc\n", "train.seed (--seed) must be a whole number; got 'abc'"),
    ("train:\n  epochs: 2.5\n", "train.epochs (--epochs) must be a whole number"),
    ("data:\n  cache: maybe\n", "data.cache (--cache) must be true or false"),
    ("model:\n  name: 3\n", "model.name (--model) must be text"),
    ("train:\n  lr: .nan\n", "train.lr (--lr) must be a finite number"),
    ("train:\n  weight_decay: .inf\n", "train.weight_decay (--weight-decay) must be a finite number"),
])
def test_yaml_values_of_the_wrong_type_or_not_finite_are_usage_errors(tmp_path, text, fragment):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(UsageError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        cfg.resolve(cfg.build("d", config_file=path))


def test_yaml_numbers_without_a_dot_are_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-3\n")  # YAML 1.1 reads this as a string
    assert cfg.resolve(cfg.build("d", config_file=path)).train.lr == 1e-3


@pytest.mark.parametrize("flags, fragment", [
    (["--lr", "nan"], "train.lr (--lr) must be a finite number"),
    (["--lr", "inf"], "train.lr (--lr) must be a finite number"),
    (["--weight-decay", "nan"], "must be a finite number"),
    (["--momentum", "-1", "--optimizer", "sgd"], "train.momentum (--momentum) must be 0 or more"),
    (["--seed", "-5"], "train.seed (--seed) must be 0 or more"),
    (["--seed", str(2**40)], "train.seed (--seed) must be at most"),
    (["--warmup-epochs", "-1"], "train.warmup_epochs (--warmup-epochs) must be 0 or more"),
    (["--weight-decay", "-0.1"], "must be 0 or more"),
])
def test_bad_values_stop_before_the_run_folder_exists(data, tmp_path, capsys, flags, fragment):
    out = tmp_path / "run"
    assert main(["train", str(data), *SCRATCH_ARGS, "--epochs", "1", "--out", str(out), *flags]) == 2
    assert fragment in capsys.readouterr().err
    assert not out.exists()


def test_empty_config_file_warns(tmp_path, caplog):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with caplog.at_level(logging.WARNING):
        assert cfg.build("d", config_file=path) == cfg.build("d")
    assert f"config file {path} is empty" in caplog.text


@pytest.mark.parametrize("flag", ["--batch-size", "--top-k"])
def test_predict_counts_below_one_are_refused(tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as stopped:
        main(["predict", str(tmp_path), "x.png", flag, "0"])
    assert stopped.value.code == 2 and "must be at least 1" in capsys.readouterr().err


# ---- where imgtune writes ----------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["file", "proc", "inside-a-file"])
def test_unusable_out_is_refused_before_any_work(data, tmp_path, capsys, where):
    (tmp_path / "afile").write_text("keep me\n")
    out = {"file": tmp_path / "afile", "proc": Path("/proc/imgtune-run"),
           "inside-a-file": tmp_path / "afile" / "run"}[where]
    assert main(["train", str(data), *SCRATCH_ARGS, "--epochs", "1", "--out", str(out)]) == 2
    assert f"--out {out}" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "keep me\n"


def test_unwritable_cache_folder_is_refused_before_any_work(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(data), *SCRATCH_ARGS, "--epochs", "1", "--out", str(out),
                 "--cache-dir", "/proc/imgtune-cache"]) == 2
    assert "cache folder" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("argv", [["explain", "RUN", "x.png", "--out", "FILE"], ["doctor", "DATA", "--no-labels",
                                  "--out", "FILE"], ["sample", "FILE"]])
def test_out_that_is_a_file_is_a_usage_error(data, tmp_path, capsys, argv):
    (tmp_path / "file").write_text("keep me\n")
    names = {"RUN": str(tmp_path / "run"), "DATA": str(data), "FILE": str(tmp_path / "file")}
    assert main([names.get(a, a) for a in argv]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "keep me\n"


def test_full_disk_is_a_data_error_naming_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    target.write_text("old\n")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full)
    with pytest.raises(DataError, match=f"the disk is full: could not write {target}"):
        atomic.atomic_write_text(target, "new\n")
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


# ---- weights files -----------------------------------------------------------------------------------


class Pickled:
    pass


def test_weights_with_pickled_objects_say_what_imgtune_accepts(tmp_path, recwarn):
    path = tmp_path / "model.pt"
    torch.save({"w": Pickled()}, path)
    with pytest.raises(ModelError) as failed:
        load_file(path)
    message = str(failed.value)
    assert "weights_only=False" not in message and "retry" not in message
    assert ".safetensors" in message and "state_dict" in message and "Pickled" in message
    assert not [w for w in recwarn if "weights_only" in str(w.message)]
