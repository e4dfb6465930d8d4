"""The ``imgtune`` command: exit codes and their messages, the run folder guard, ``sample``, and a
real subprocess. Everything runs in-process through ``imgtune.cli.main`` except the subprocess tests."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from datagen import CLASSES, PRETRAINED_ARGS, SCRATCH_ARGS, make_class_folders, make_split_dataset
from imgtune import training
from imgtune.cli import main
from imgtune.errors import (EXIT_CODES, EXIT_OK, EXIT_UNEXPECTED, DataError, FederationError, Interrupted, ModelError,
                            TrainingDiverged, UsageError)

FAST = (*SCRATCH_ARGS, "--epochs", "1", "--workers", "0")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_split_dataset(tmp_path_factory.mktemp("data"), train=8, val=4)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def expect_failure(capsys, argv: list[str], code: int, *fragments: str) -> str:
    """Run ``imgtune argv``; check the exit code and that stderr names the problem."""
    assert main(argv) == code
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    return err


def test_train_success_exit_0(data, tmp_path, capsys):
    assert main(["train", str(data), *FAST, "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "3 classes" in out
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_bad_flag_value_is_exit_2(data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:  # argparse rejects it before imgtune runs
        main(["train", str(data), "--epochs", "many"])
    assert exc.value.code == 2
    assert "--epochs" in capsys.readouterr().err
    expect_failure(capsys, ["train", str(data), *FAST, "--val-fraction", "1.5", "--out", str(tmp_path / "r")],
                   2, "data.val_fraction", "1.5")
    assert not (tmp_path / "r").exists()


def test_unknown_preset_is_exit_2(data, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", str(data), "--preset", "no-such-preset"])
    assert exc.value.code == 2
    assert "no-such-preset" in capsys.readouterr().err


@pytest.mark.parametrize("text, fragment", [("train: [epochs: 3\n", "not valid YAML"),
                                            ("train:\n  epochz: 3\n", "epochz")])
def test_bad_yaml_config_is_exit_2(data, tmp_path, capsys, text, fragment):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    expect_failure(capsys, ["train", str(data), *FAST, "--config", str(bad), "--out", str(tmp_path / "r")],
                   2, str(bad), fragment)


def test_freeze_epochs_not_below_epochs_is_exit_2(data, tmp_path, capsys):
    expect_failure(capsys, ["train", str(data), *PRETRAINED_ARGS, "--strategy", "gradual", "--epochs", "2",
                            "--freeze-epochs", "2", "--out", str(tmp_path / "r")], 2, "freeze_epochs (2)")
    assert not (tmp_path / "r").exists()


def test_missing_data_folder_is_exit_3(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    expect_failure(capsys, ["train", str(missing), *FAST, "--out", str(tmp_path / "r")], 3,
                   str(missing), "does not exist")
    assert not (tmp_path / "r").exists()


def test_single_class_is_exit_3(tmp_path, capsys):
    data = make_class_folders(tmp_path / "data", classes=("red_circle",), per_class=6)
    expect_failure(capsys, ["train", str(data), *FAST, "--out", str(tmp_path / "r")], 3,
                   "only one class", "red_circle")


def test_val_missing_a_class_is_exit_3(tmp_path, capsys):
    data = make_split_dataset(tmp_path / "data", train=4, val=2)
    for image in (data / "val" / "green_square").iterdir():
        image.unlink()
    (data / "val" / "green_square").rmdir()
    expect_failure(capsys, ["train", str(data), *FAST, "--out", str(tmp_path / "r")], 3,
                   "val split has no images", "green_square")
    assert not (tmp_path / "r").exists()


def test_unknown_model_is_exit_4(data, tmp_path, capsys):
    expect_failure(capsys, ["train", str(data), *FAST, "--model", "mobilenet_v9", "--out", str(tmp_path / "r")],
                   4, "no model named 'mobilenet_v9'")
    assert not (tmp_path / "r").exists()


def test_pretrained_weights_unavailable_offline_is_exit_4(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    err = expect_failure(capsys, ["train", str(data), "--model", "resnet18", "--offline", "--workers", "0",
                                  "--out", str(tmp_path / "r")], 4, "no pretrained weights", "resnet18", "--offline")
    assert str(tmp_path / "torch") in err  # says where it looked
    assert not (tmp_path / "r").exists()


def test_missing_weights_file_is_exit_4(data, tmp_path, capsys):
    missing = tmp_path / "absent.safetensors"
    expect_failure(capsys, ["train", str(data), *PRETRAINED_ARGS, "--weights", str(missing),
                            "--out", str(tmp_path / "r")], 4, str(missing), "no such file")


def test_unexpected_exception_is_exit_1(data, tmp_path, monkeypatch, capsys):
    def broken_fit(*args, **kwargs):
        raise RuntimeError("simulated failure inside training")

    monkeypatch.setattr(training, "fit", broken_fit)
    expect_failure(capsys, ["train", str(data), *FAST, "--out", str(tmp_path / "r")], 1,
                   "unexpected failure", "RuntimeError: simulated failure inside training")


def test_help_lists_every_exit_code_of_the_errors_table(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the epilog
    for meaning, code in EXIT_CODES.items():
        assert f"{code} {meaning}" in text
    returned = {EXIT_OK, EXIT_UNEXPECTED, UsageError.exit_code, DataError.exit_code, ModelError.exit_code,
                TrainingDiverged.exit_code, FederationError.exit_code,
                Interrupted("", signal.SIGINT).exit_code, Interrupted("", signal.SIGTERM).exit_code}
    assert returned == set(EXIT_CODES.values())


def test_readme_lists_the_exit_codes_of_the_errors_table():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    first_cells = [row.split("|")[1] for row in table.splitlines() if row.startswith("| ")]
    assert {int(code) for cell in first_cells for code in re.findall(r"\d+", cell)} == set(EXIT_CODES.values())


def test_out_not_empty_is_refused_then_overwrite_works(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["-q", "train", str(data), *FAST, "--out", str(out)]) == 0
    assert main(["-q", "evaluate", str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    capsys.readouterr()
    expect_failure(capsys, ["train", str(data), *FAST, "--epochs", "2", "--out", str(out)], 2,
                   str(out), "not empty", "--overwrite")
    assert snapshot(out) == before

    assert main(["-q", "train", str(data), *FAST, "--epochs", "2", "--out", str(out), "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine"  # only imgtune's own files are replaced
    assert "epochs: 2" in (out / "config.yaml").read_text()
    assert len((out / "metrics.csv").read_text().splitlines()) == 1 + 2
    # the previous model's evaluation does not survive next to the new model
    assert not list(out.glob("confusion_matrix_*")) and not list(out.glob("evaluation_*"))


def test_sample_writes_dataset_and_refuses_non_empty_dir(tmp_path, capsys):
    root = tmp_path / "sample"
    assert main(["sample", str(root), "--train-per-class", "2", "--val-per-class", "1"]) == 0
    files = snapshot(root)
    for shape in ("circle", "square", "triangle"):
        assert len(list((root / "train" / shape).glob("*.jpg"))) == 2 + (shape == "square")  # + broken file
        assert len(list((root / "val" / shape).glob("*.jpg"))) == 1
    capsys.readouterr()
    expect_failure(capsys, ["sample", str(root)], 2, str(root), "not empty")
    assert snapshot(root) == files


def run_imgtune(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "IMGTUNE_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "imgtune", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_subprocess_train(data, tmp_path):
    done = run_imgtune("train", str(data), *FAST, "--out", "run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "accuracy" in done.stdout
    assert json.loads((tmp_path / "run" / "meta.json").read_text())["classes"] == sorted(CLASSES)


@pytest.mark.slow
def test_subprocess_data_error_exit_3(tmp_path):
    done = run_imgtune("train", "missing_folder", "--offline", cwd=tmp_path)
    assert done.returncode == 3
    assert "missing_folder does not exist" in done.stderr
    assert "Traceback" not in done.stderr
