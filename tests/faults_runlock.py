"""Fault cases of the run folder (see faultlib): two writers at once, damaged weights, data changed
under a resume. ``lost`` is computed from the files, never assumed."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml
from PIL import Image

from datagen import make_split_dataset
from faultlib import SRC, Fault, Outcome, cli

BASE = ("--model", "imgtune:small_cnn", "--img-size", "32", "--strategy", "scratch", "--device", "cpu",
        "--workers", "0", "--offline", "--batch-size", "4")


def _train(data: Path, run: Path, *args: str) -> list[str]:
    return ["train", str(data), "--out", str(run), "--cache-dir", str(run.parent / "cache"), *BASE, *args]


def run_consistency(run: Path) -> str | None:
    """What in a finished run folder does not belong to one run (None: config.yaml, meta.json,
    metrics.csv, the newest checkpoint and the weights all agree)."""
    import torch

    from imgtune import checkpoint

    missing = [n for n in ("config.yaml", "meta.json", "metrics.csv", "model.safetensors") if not (run / n).is_file()]
    if missing:
        return f"{', '.join(missing)} missing in {run.name}"
    config = yaml.safe_load((run / "config.yaml").read_text())
    meta = json.loads((run / "meta.json").read_text())
    problems = []
    if meta["config"]["train"] != config["train"]:
        problems.append("meta.json and config.yaml are from different runs")
    with open(run / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    if len(rows) != config["train"]["epochs"]:
        problems.append(f"metrics.csv has {len(rows)} epochs, config.yaml {config['train']['epochs']}")
    saved = checkpoint.listed(run / "checkpoints")
    newest = torch.load(saved[-1], map_location="cpu", weights_only=True) if saved else None
    if newest is None or [float(r["train_loss"]) for r in newest["rows"]] != [float(r["train_loss"]) for r in rows]:
        problems.append("the newest checkpoint and metrics.csv are from different runs")
    if meta.get("weights_sha256") != hashlib.sha256((run / "model.safetensors").read_bytes()).hexdigest():
        problems.append("model.safetensors is not the one meta.json recorded")
    return "; ".join(problems) or None


def _two_overwrite_runs(tmp: Path) -> Outcome:
    """One run trains (in another process) while a second `train --overwrite` starts on the same --out."""
    data, run = make_split_dataset(tmp / "data", train=8, val=3), tmp / "run"
    first = cli(*_train(data, run, "--epochs", "1", "--seed", "1"))  # the run both would overwrite
    longer = _in_background(_train(data, run, "--epochs", "6", "--seed", "2", "--overwrite"))
    try:
        if not _wait_for_start(run, 2, longer):
            return Outcome(first.exit_code, "the longer run never started", lost=f"no run: {longer.stderr.read()}")
        second = cli(*_train(data, run, "--epochs", "1", "--seed", "3", "--overwrite"))
        code = longer.wait(timeout=300)
    finally:
        longer.kill()
    if code != 0:
        return Outcome(second.exit_code, second.message, lost=f"the running run failed ({code}): {longer.stderr.read()}")
    lost = run_consistency(run)
    if str(longer.pid) not in second.message:
        lost = lost or "the refusal does not name the holder's process id"
    return Outcome(second.exit_code, second.message, lost)


def _in_background(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "imgtune", "-q", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _killed_then_resumed(tmp: Path) -> Outcome:
    """kill -9 while training holds the run folder, then `train --resume` (the lock must not outlive it)."""
    data, run = make_split_dataset(tmp / "data", train=8, val=3), tmp / "run"
    proc = _in_background(_train(data, run, "--epochs", "6", "--seed", "2"))
    try:
        deadline = time.monotonic() + 120
        while not list((run / "checkpoints").glob("epoch*-end.pt")) and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()
    if not list((run / "checkpoints").glob("epoch*-end.pt")):
        return Outcome(1, "the run wrote no checkpoint", lost=f"no checkpoint: {proc.stderr.read()}")
    resumed = cli("train", "--resume", str(run))
    return Outcome(resumed.exit_code, resumed.message, run_consistency(run) if resumed.exit_code == 0 else None)


def _wait_for_start(run: Path, seed: int, proc: subprocess.Popen, limit: float = 120) -> bool:
    """Until the run with ``seed`` has written its meta.json (it is then training)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if json.loads((run / "meta.json").read_text())["config"]["train"]["seed"] == seed:
                return True
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    return False


def _flipped_weights(tmp: Path) -> Outcome:
    """Bits flipped inside the tensor data of model.safetensors, then predict."""
    data, run = make_split_dataset(tmp / "data", train=4, val=2), tmp / "run"
    trained = cli(*_train(data, run, "--epochs", "1"))
    if trained.exit_code != 0:
        return trained
    weights = run / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-100] ^= 0x10  # inside the last tensor: the header stays valid
    weights.write_bytes(bytes(raw))
    image = next((data / "val").rglob("*.png"))
    outcome = cli("predict", str(run), str(image))
    wrong = outcome.exit_code == 0 and "predicted from damaged weights"
    return Outcome(outcome.exit_code, outcome.message, wrong or None)


def _changed_image(tmp: Path) -> Outcome:
    """One image's pixels changed (same name, same counts), then `train --resume`."""
    data, run = make_split_dataset(tmp / "data", train=4, val=2), tmp / "run"
    trained = cli(*_train(data, run, "--epochs", "1"))
    if trained.exit_code != 0:
        return trained
    image = sorted((data / "train").rglob("*.png"))[0]
    Image.effect_noise((40, 40), 50).convert("RGB").save(image)
    before = (run / "model.safetensors").read_bytes()
    outcome = cli("train", "--resume", str(run))
    lost = None
    if outcome.exit_code == 0:
        lost = "resumed on changed data"
    elif image.name not in outcome.message:
        lost = f"the message does not name {image.name}"
    elif (run / "model.safetensors").read_bytes() != before:
        lost = "the run's weights changed"
    return Outcome(outcome.exit_code, outcome.message, lost)


FAULTS = [
    Fault("two `train --overwrite` on one --out at once", "run folder", 2, _two_overwrite_runs),
    Fault("kill -9 during training, then train --resume", "run folder", 0, _killed_then_resumed),
    Fault("bits flipped in model.safetensors, then predict", "run folder", 4, _flipped_weights),
    Fault("one image's content changed, then train --resume", "run folder", 3, _changed_image),
]
