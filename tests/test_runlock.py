"""The run folder: one writer at a time (an OS lock that dies with its holder), --overwrite removing
what was derived from the old run, weights checked against the SHA-256 in meta.json, and a resume
refused when an image's content changed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from datagen import make_split_dataset
from faultlib import SRC
from faults_runlock import _train, run_consistency
from imgtune import artifact, runlock
from imgtune.cli import main
from imgtune.data import content
from imgtune.data.scan import load_splits
from imgtune.data.shards import write_shards
from imgtune.errors import DataError, UsageError

HOLDER = ("import sys, time\nfrom imgtune import runlock\nwith runlock.hold(sys.argv[1], sys.argv[2]):\n"
          "    print('held', flush=True)\n    time.sleep(600)\n")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_split_dataset(tmp_path_factory.mktemp("data"), train=4, val=2)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(["-q", *_train(data, run, "--epochs", "1")]) == 0
    return run


def hold_elsewhere(run: Path, doing: str = "train") -> subprocess.Popen:
    """Another process holding ``run`` (until killed)."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run), doing], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture
def holder():
    started = []

    def start(run: Path, doing: str = "train") -> subprocess.Popen:
        started.append(hold_elsewhere(run, doing))
        return started[-1]

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def files_of(run: Path) -> dict[str, bytes]:
    """Every file of a run but the lock file (whose holder record changes with each holder)."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != runlock.LOCK_FILE}


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to, ignore=shutil.ignore_patterns(runlock.LOCK_FILE))
    return to


# --- the lock ---------------------------------------------------------------------------------------

def test_second_writer_is_refused_naming_the_holder(tmp_path, holder):
    proc = holder(tmp_path, "resume")
    with pytest.raises(UsageError, match=rf"in use by process {proc.pid} \(resume"):
        with runlock.hold(tmp_path, "train"):
            pass


def test_lock_dies_with_a_killed_holder(tmp_path, holder):
    proc = holder(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (tmp_path / runlock.LOCK_FILE).is_file()  # the file stays; the lock went with the process
    with runlock.hold(tmp_path, "resume"):
        assert runlock.inside(tmp_path / "x", tmp_path)


def test_holding_is_reentrant_and_released(tmp_path):
    with runlock.hold(tmp_path, "evaluate"), runlock.hold(tmp_path, "evaluate"):
        pass
    with runlock.hold(tmp_path, "train"):
        pass


def test_overwrite_while_held_is_refused_and_nothing_is_removed(data, trained, tmp_path, holder, capsys):
    run = copy_run(trained, tmp_path / "run")
    before = files_of(run)
    proc = holder(run)
    capsys.readouterr()
    assert main(_train(data, run, "--epochs", "1", "--overwrite")) == 2
    assert f"in use by process {proc.pid} (train" in capsys.readouterr().err
    assert files_of(run) == before


@pytest.mark.parametrize("command", ["evaluate", "report", "explain", "export"])
def test_evaluate_report_explain_are_refused_while_training_holds(data, trained, holder, command, capsys):
    if command == "export":
        pytest.importorskip("onnxruntime")
    proc = holder(trained)
    args = {"evaluate": ["evaluate", str(trained), "--device", "cpu"],
            "report": ["report", str(trained), "--device", "cpu"],
            "explain": ["explain", str(trained), str(next((data / "val").rglob("*.png"))), "--device", "cpu"],
            "export": ["export", str(trained)]}
    capsys.readouterr()
    assert main(args[command]) == 2
    assert f"in use by process {proc.pid} (train" in capsys.readouterr().err


def test_explain_elsewhere_and_predict_need_no_lock(data, trained, tmp_path, holder):
    holder(trained)
    image = str(next((data / "val").rglob("*.png")))
    assert main(["-q", "predict", str(trained), image, "--device", "cpu"]) == 0
    assert main(["-q", "explain", str(trained), image, "--out", str(tmp_path / "heat"), "--device", "cpu"]) == 0


def test_overwrite_removes_the_old_runs_derived_files(data, tmp_path):
    run = tmp_path / "run"
    assert main(["-q", *_train(data, run, "--epochs", "1")]) == 0
    derived = ["report.html", "report_test.html", "evaluation_val.json", "confusion_matrix_val.png",
               "explanations/a.gradcam.png", "export/model.onnx", "export/sub/labels.txt"]
    for name in derived:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("old")
    (run / "notes.txt").write_text("mine")  # not imgtune's: kept
    assert main(["-q", *_train(data, run, "--epochs", "1", "--overwrite")]) == 0
    assert [name for name in derived if (run / name).exists()] == []
    assert not (run / "explanations").exists() and not (run / "export").exists()
    assert (run / "notes.txt").read_text() == "mine" and (run / runlock.LOCK_FILE).is_file()
    assert run_consistency(run) is None


def test_a_lock_file_alone_does_not_make_a_folder_non_empty(data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / runlock.LOCK_FILE).write_text("")
    assert main(["-q", *_train(data, run, "--epochs", "1")]) == 0


# --- weights checksum -------------------------------------------------------------------------------

def test_weights_checksum_is_recorded_and_checked(data, trained, tmp_path, capsys):
    meta = json.loads((trained / "meta.json").read_text())
    assert meta["weights_sha256"] == artifact.file_sha256(trained / "model.safetensors")
    run = copy_run(trained, tmp_path / "copy")
    raw = bytearray((run / "model.safetensors").read_bytes())
    raw[-7] ^= 0x01
    (run / "model.safetensors").write_bytes(bytes(raw))
    capsys.readouterr()
    assert main(["predict", str(run), str(next((data / "val").rglob("*.png"))), "--device", "cpu"]) == 4
    err = capsys.readouterr().err
    assert f"{run / 'model.safetensors'} is damaged" in err and "--resume" in err


def test_runs_without_a_checksum_still_load(data, trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path / "old")
    meta = json.loads((run / "meta.json").read_text())
    del meta["weights_sha256"]
    (run / "meta.json").write_text(json.dumps(meta))
    assert main(["-v", "predict", str(run), str(next((data / "val").rglob("*.png"))), "--device", "cpu"]) == 0
    assert "no checksum in meta.json (written before imgtune recorded one); loading unchecked" in \
        capsys.readouterr().err


def test_resume_records_the_checksum_again(data, tmp_path):
    run = tmp_path / "run"
    assert main(["-q", *_train(data, run, "--epochs", "1")]) == 0
    assert main(["-q", "train", "--resume", str(run), "--epochs", "2"]) == 0
    assert run_consistency(run) is None


# --- content of the data on resume ------------------------------------------------------------------

def test_resume_refuses_an_image_with_changed_content(tmp_path, capsys):
    data, run = make_split_dataset(tmp_path / "data", train=4, val=2), tmp_path / "run"
    assert main(["-q", *_train(data, run, "--epochs", "1")]) == 0
    assert set(json.loads((run / "meta.json").read_text())["content"]) == {"train", "val"}
    image = data / "val" / "green_square" / sorted(os.listdir(data / "val" / "green_square"))[1]
    Image.effect_noise((40, 40), 50).convert("RGB").save(image)
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 3
    err = capsys.readouterr().err
    assert "changed since the run started" in err and f"val/green_square/{image.name} (val) changed content" in err


def test_runs_without_content_digests_still_resume(tmp_path):
    data, run = make_split_dataset(tmp_path / "data", train=4, val=2), tmp_path / "run"
    assert main(["-q", *_train(data, run, "--epochs", "1")]) == 0
    meta = json.loads((run / "meta.json").read_text())
    del meta["content"]
    (run / "meta.json").write_text(json.dumps(meta))
    (run / artifact.DATA_FILES).unlink()
    assert main(["-q", "train", "--resume", str(run)]) == 0


def test_changed_files_are_named_without_a_file_list_by_split(tmp_path):
    then = {"train": [["a.png", "x", "1"], ["b.png", "x", "2"]], "val": [["c.png", "y", "3"]]}
    now = {"train": [["a.png", "x", "1"], ["b.png", "y", "2"]], "val": [["c.png", "y", "3"]]}
    (tmp_path / "files.json.gz").write_bytes(content.encode_files(then))
    with pytest.raises(DataError, match=r"b.png \(train\) moved from class x to y"):
        content.check_same(content.split_digests(then), content.split_digests(now), "DATA",
                           tmp_path / "files.json.gz", now)
    with pytest.raises(DataError, match="the content of the train split"):
        content.check_same(content.split_digests(then), content.split_digests(now), "DATA", tmp_path / "none", None)
    content.check_same(content.split_digests(then), content.split_digests(then), "DATA", tmp_path / "none", None)


def test_shard_manifests_record_content_that_follows_the_images(tmp_path):
    data = make_split_dataset(tmp_path / "data", train=3, val=2)
    digests = []
    for attempt in range(2):
        out = tmp_path / f"shards{attempt}"
        out.mkdir()
        digests.append(write_shards(load_splits(data, progress=False), out, str(data), progress=False)["content"])
        Image.effect_noise((40, 40), 50).convert("RGB").save(sorted((data / "train").rglob("*.png"))[0])
    assert digests[0]["val"] == digests[1]["val"] and digests[0]["train"] != digests[1]["train"]
