"""Checkpoints and resume: a run interrupted anywhere (SIGKILL, SIGTERM, SIGINT, a damaged checkpoint)
and resumed ends bit-identical to the same run left alone (on a CPU, with workers=0). Tiny generated
images, a small CNN from scratch at 32 px, batch size 2 so that an epoch has 15 steps to stop in."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from datagen import make_split_dataset
from imgtune import checkpoint, engine, optim
from imgtune.balance import balanced_sampler
from imgtune.cli import main
from imgtune.data.sampler import EpochSampler
from imgtune.errors import DataError
from imgtune.interrupt import StopRequest

STEPS_PER_EPOCH = 15  # 30 training images, batch size 2
BASE = ("--model", "imgtune:small_cnn", "--img-size", "32", "--batch-size", "2", "--device", "cpu", "--workers", "0",
        "--seed", "3", "--offline")
SCRATCH = (*BASE, "--strategy", "scratch", "--epochs", "3")
# --no-never-worse: all 30 training images train (STEPS_PER_EPOCH), none held out for the never-worse rule
GRADUAL = (*BASE, "--strategy", "gradual", "--no-pretrained", "--epochs", "3", "--freeze-epochs", "1",
           "--no-never-worse")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread here and in the child processes (``OMP_NUM_THREADS``): on a CPU shared with
    other work these tiny models then train several times faster, and runs compared bit for bit must
    use the same number of threads (a parallel sum may round differently with another split)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_split_dataset(tmp_path_factory.mktemp("data"), train=10, val=5)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def train_args(data: Path, out: Path, cache: Path, *args: str) -> list[str]:
    return ["train", str(data), "--out", str(out), "--cache-dir", str(cache), *args]


@pytest.fixture(scope="module")
def reference(data, cache, tmp_path_factory):
    """Uninterrupted runs (without mid-epoch checkpoints), trained on first use."""
    done: dict[tuple, Path] = {}

    def get(*args: str) -> Path:
        if args not in done:
            out = tmp_path_factory.mktemp("reference") / "run"
            assert main(["-q", *train_args(data, out, cache, *args)]) == 0
            done[args] = out
        return done[args]

    return get


def metrics_rows(run: Path) -> list[dict]:
    """metrics.csv without the seconds column (wall-clock time)."""
    with (run / "metrics.csv").open(newline="") as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


def assert_same_run(run: Path, reference: Path) -> None:
    """Same metrics rows, final metrics and weights, to the last bit."""
    assert metrics_rows(run) == metrics_rows(reference)
    assert json.loads((run / "metrics.json").read_text()) == json.loads((reference / "metrics.json").read_text())
    ours, theirs = load_file(run / "model.safetensors"), load_file(reference / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def stop_at(monkeypatch, step: int | None = None, epoch: int | None = None, signum=signal.SIGTERM) -> None:
    """Act as if ``signum`` arrived during optimizer step ``step`` (counted over the whole run) or during
    the validation of ``epoch``: what the signal handler does, without a real signal."""
    after_step, after_epoch = checkpoint.Checkpointer.after_step, checkpoint.Checkpointer.after_epoch

    def step_hook(self, steps, snapshot):
        if steps == step:
            self.stop.signum = signum
        after_step(self, steps, snapshot)

    def epoch_hook(self, snapshot):
        if snapshot()["epoch"] == epoch:
            self.stop.signum = signum
        after_epoch(self, snapshot)

    monkeypatch.setattr(checkpoint.Checkpointer, "after_step", step_hook)
    monkeypatch.setattr(checkpoint.Checkpointer, "after_epoch", epoch_hook)


def newest(run: Path) -> dict:
    return checkpoint.newest_usable(run / "checkpoints").payload


# --- the sampler ---------------------------------------------------------------------------------

def test_sampler_order_depends_only_on_seed_and_epoch():
    a, b = EpochSampler(50, seed=7), EpochSampler(50, seed=7)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b)
    assert sorted(a) == list(range(50))
    orders = []
    for epoch in range(4):
        a.set_epoch(epoch)
        orders.append(list(a))
    assert len({tuple(o) for o in orders}) == 4
    other = EpochSampler(50, seed=8)
    other.set_epoch(3)
    assert list(other) != orders[3]


def test_sampler_start_resumes_the_tail():
    sampler = EpochSampler(23, seed=1)
    sampler.set_epoch(5)
    whole = list(sampler)
    sampler.set_epoch(5, start=8)
    assert list(sampler) == whole[8:]
    assert len(sampler) == 23  # a whole epoch's length, whatever the start (schedules count full epochs)
    resumed = EpochSampler(23, seed=1)
    resumed.load_state_dict({"epoch": 5, "start": 8})
    assert list(resumed) == whole[8:]
    sampler.set_epoch(6)
    assert sampler.state_dict() == {"epoch": 6, "start": 0}


def test_weighted_sampler_balances_classes_and_resumes():
    targets = torch.tensor([0] * 90 + [1] * 10)
    sampler = balanced_sampler(targets, 2, seed=0)
    assert isinstance(sampler, EpochSampler)
    drawn = []
    for epoch in range(20):
        sampler.set_epoch(epoch)
        drawn += list(sampler)
    share = (targets[torch.tensor(drawn)] == 1).float().mean().item()
    assert 0.45 < share < 0.55  # 10% of the items, half of the draws
    sampler.set_epoch(2)
    whole = list(sampler)
    sampler.set_epoch(2, start=30)
    assert list(sampler) == whole[30:]
    sampler.set_epoch(3)
    assert list(sampler) != whole


def test_loader_batches_follow_the_sampler():
    """The image and feature loaders shuffle with an EpochSampler, not the DataLoader's own generator."""
    from imgtune.features import FeatureSet

    features = FeatureSet(torch.arange(20.0).unsqueeze(1), torch.zeros(20, dtype=torch.long), torch.arange(20))
    loader = features.loader(4, shuffle=True, seed=5)
    assert isinstance(loader.sampler, EpochSampler)
    engine._position(loader, 2, 0)
    whole = torch.cat([batch[2] for batch in loader]).tolist()
    engine._position(loader, 2, 3)  # three batches done
    assert torch.cat([batch[2] for batch in loader]).tolist() == whole[12:]


# --- checkpoint files ----------------------------------------------------------------------------

def payload(epoch: int, step: int, done: bool) -> dict:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return {"format": checkpoint.FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": {"last_epoch": 4, "base_lrs": [0.1]}, "schedule_steps": 10, "scaler": None, "phase": 0,
            "epoch": epoch, "step": step, "epoch_done": done, "steps": 4, "tally": None,
            "rng": checkpoint.capture_rng(),
            "sampler": {"epoch": epoch, "start": 2 * step}, "rows": [{"epoch": 1, "phase": "all", "lr": 0.1}],
            "stopped_early": False, "stopper": {"best_value": 0.5, "best_epoch": 1, "stale": 0,
                                                "best_state": model.state_dict()}}


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    saved = payload(2, 7, False)
    path = checkpoint.save(tmp_path, saved)
    assert path.name == "epoch0002-step000007.pt"
    loaded = torch.load(path, weights_only=True)  # plain containers only: nothing to unpickle
    assert loaded["rows"] == saved["rows"] and loaded["sampler"] == saved["sampler"]
    for key, tensor in saved["model"].items():
        assert torch.equal(loaded["model"][key], tensor)
    assert loaded["optimizer"]["state"][0]["exp_avg"].shape == (2, 3)
    assert not list(tmp_path.glob(".*.tmp"))


def test_rng_states_round_trip(tmp_path):
    import random

    import numpy as np

    path = checkpoint.save(tmp_path, payload(1, 1, False))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    checkpoint.restore_rng(torch.load(path, weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_newest_two_are_kept_in_training_order(tmp_path):
    for epoch, step, done in [(1, 4, False), (1, 0, True), (2, 3, False), (2, 12, False), (2, 0, True)]:
        checkpoint.save(tmp_path, payload(epoch, step, done))
    assert [p.name for p in checkpoint.listed(tmp_path)] == ["epoch0002-step000012.pt", "epoch0002-end.pt"]


def test_unusable_checkpoints_are_named_and_skipped(tmp_path, caplog):
    checkpoint.save(tmp_path, payload(1, 4, False))
    newest_path = checkpoint.save(tmp_path, payload(1, 8, False))
    newest_path.write_bytes(newest_path.read_bytes()[:1000])
    found = checkpoint.newest_usable(tmp_path)
    assert found.path.name == "epoch0001-step000004.pt"
    assert found.rejected[0][0] == newest_path
    assert f"checkpoint {newest_path} is unusable" in caplog.text

    incomplete = payload(1, 9, False)
    del incomplete["rng"]
    checkpoint.save(tmp_path, incomplete)  # loads, but lacks a key: refused too
    with pytest.raises(checkpoint.UnusableCheckpoint, match="lacks rng"):
        checkpoint.load(tmp_path / "epoch0001-step000009.pt")

    for path in checkpoint.listed(tmp_path):
        path.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="no usable checkpoint in .*epoch0001-step000009.pt"):
        checkpoint.newest_usable(tmp_path)
    with pytest.raises(DataError, match="no checkpoint in"):
        checkpoint.newest_usable(tmp_path / "absent")


def test_stop_request_records_signal_and_restores_handlers():
    previous, previous_int = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        assert signal.getsignal(signal.SIGTERM) == stop._handle
        os.kill(os.getpid(), signal.SIGTERM)  # recorded, not fatal
        time.sleep(0.01)  # Python runs handlers between bytecodes of the main thread
        assert stop.signum == signal.SIGTERM and stop.name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):  # a second signal stops at once
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
    assert signal.getsignal(signal.SIGTERM) == previous
    assert signal.getsignal(signal.SIGINT) == previous_int

    def in_thread():
        with StopRequest():
            seen.append(signal.getsignal(signal.SIGTERM))

    seen: list = []
    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert seen == [previous]  # only the main thread may install handlers


# --- resuming runs (in-process) ------------------------------------------------------------------

def test_truncated_newest_checkpoint_falls_back_and_ends_identical(data, cache, reference, tmp_path, capsys):
    """Mid-epoch checkpoints (every 7 steps) change nothing; with the newest one cut short, resume
    warns naming it, uses the one before (3 batches before the end of epoch 3) and ends identical."""
    run = tmp_path / "run"
    assert main(["-q", *train_args(data, run, cache, *SCRATCH, "--checkpoint-every", "7")]) == 0
    assert_same_run(run, reference(*SCRATCH))
    kept = checkpoint.listed(run / "checkpoints")
    assert [p.name for p in kept] == ["epoch0003-step000012.pt", "epoch0003-end.pt"]
    kept[1].write_bytes(kept[1].read_bytes()[: kept[1].stat().st_size // 2])
    (run / "metrics.csv").write_text("damaged\n")  # rewritten from the checkpoint

    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    assert f"checkpoint {kept[1]} is unusable: it cannot be loaded" in capsys.readouterr().err
    assert_same_run(run, reference(*SCRATCH))
    assert (run / "checkpoints" / "epoch0003-end.pt.unusable").exists()  # set aside, for a look
    assert newest(run)["epoch_done"]


def test_interrupted_gradual_run_resumes_across_phases(data, cache, reference, tmp_path, monkeypatch):
    """Stopped after the frozen epoch (on cached features), then in the middle of the unfrozen phase:
    each resume continues in the right phase, with the right optimizer, and ends identical."""
    run = tmp_path / "run"
    stop_at(monkeypatch, epoch=1, step=STEPS_PER_EPOCH + 6)
    assert main(["-q", *train_args(data, run, cache, *GRADUAL)]) == 143
    assert newest(run)["epoch"] == 1 and newest(run)["epoch_done"] and newest(run)["phase"] == 0
    assert not (run / "model.safetensors").exists()

    assert main(["-q", "train", "--resume", str(run)]) == 143  # stops again, at step 6 of epoch 2
    saved = newest(run)
    assert (saved["epoch"], saved["step"], saved["phase"], saved["epoch_done"]) == (2, 6, 1, False)
    assert [r["phase"] for r in metrics_rows(run)] == ["frozen"]

    monkeypatch.undo()
    assert main(["-q", "train", "--resume", str(run)]) == 0
    assert_same_run(run, reference(*GRADUAL))
    assert [r["phase"] for r in metrics_rows(run)] == ["frozen", "unfrozen", "unfrozen"]


def test_a_run_saved_before_unfreeze_existed_resumes_fine_tuning_every_block(data, cache, reference, tmp_path,
                                                                             monkeypatch):
    """A config.yaml without ``unfreeze`` (written before the option, when the whole body always
    trained) resumes as ``--unfreeze all``, not as today's default (``auto``: top:3 on a CPU)."""
    run = tmp_path / "run"
    stop_at(monkeypatch, epoch=1)
    assert main(["-q", *train_args(data, run, cache, *GRADUAL, "--unfreeze", "all")]) == 143
    saved = (run / "config.yaml").read_text()
    assert "unfreeze: all" in saved
    (run / "config.yaml").write_text("".join(line for line in saved.splitlines(keepends=True)
                                             if not line.strip().startswith("unfreeze:")))
    monkeypatch.undo()
    assert main(["-q", "train", "--resume", str(run)]) == 0
    assert_same_run(run, reference(*GRADUAL, "--unfreeze", "all"))


def test_balanced_sampler_and_best_weights_resume_exactly(data, cache, reference, tmp_path, monkeypatch):
    """Stopped in epoch 3 after the best epoch (val accuracy reaches 1 early and cannot beat itself):
    the resumed run must remember the best weights and keep them, not epoch 3's."""
    args = (*SCRATCH, "--balance", "sampler", "--keep", "best", "--monitor", "accuracy", "--early-stop", "5")
    assert json.loads((reference(*args) / "metrics.json").read_text())["best_epoch"] < 3
    run = tmp_path / "run"
    stop_at(monkeypatch, step=2 * STEPS_PER_EPOCH + 4, signum=signal.SIGINT)
    assert main(["-q", *train_args(data, run, cache, *args)]) == 130
    saved = newest(run)
    assert (saved["epoch"], saved["step"]) == (3, 4)
    assert saved["stopper"]["best_state"] is not None and saved["stopper"]["best_epoch"] in (1, 2)
    monkeypatch.undo()
    assert main(["-q", "train", "--resume", str(run)]) == 0
    assert_same_run(run, reference(*args))


def test_metrics_rows_after_the_checkpoint_are_dropped(data, cache, tmp_path, monkeypatch):
    """Killed after metrics.csv got epoch 1's row but before epoch 1's checkpoint: the row goes, even
    if the resumed run is stopped again before it retrains epoch 1."""
    run = tmp_path / "run"
    stop_at(monkeypatch, step=1)
    args = (*BASE, "--strategy", "scratch", "--epochs", "1", "--batch-size", "10")
    assert main(["-q", *train_args(data, run, cache, *args)]) == 143
    (run / "metrics.csv").write_text("epoch,phase\n1,all\n")
    stop_at(monkeypatch, step=2)
    assert main(["-q", "train", "--resume", str(run)]) == 143
    assert not (run / "metrics.csv").exists()


def test_raising_epochs_trains_a_finished_run_further(data, cache, tmp_path, capsys):
    """The extra epochs follow the cosine schedule of the new length, from the step reached."""
    run = tmp_path / "run"
    args = (*BASE, "--strategy", "scratch", "--epochs", "2")
    assert main(["-q", *train_args(data, run, cache, *args)]) == 0
    before = load_file(run / "model.safetensors")
    first_rows = metrics_rows(run)
    assert main(["train", "--resume", str(run), "--epochs", "4"]) == 0
    rows = metrics_rows(run)
    assert rows[:2] == first_rows and [r["epoch"] for r in rows] == ["1", "2", "3", "4"]
    factor = optim.warmup_cosine(4 * STEPS_PER_EPOCH, 0)(2 * STEPS_PER_EPOCH)  # 0.505: the schedule's middle
    assert float(rows[2]["lr"]) == pytest.approx(1e-3 * factor)
    assert "epochs: 4" in (run / "config.yaml").read_text()
    assert not torch.equal(load_file(run / "model.safetensors")["head.0.weight"], before["head.0.weight"])

    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0  # nothing left: results written again
    assert "has trained all its 4 epochs" in capsys.readouterr().err


def test_early_stopped_run_is_finished(data, cache, tmp_path, capsys):
    """A learning rate too small to move the head (on frozen features): val accuracy cannot improve."""
    run = tmp_path / "run"
    args = (*BASE, "--strategy", "linear-probe", "--head-fit", "sgd", "--no-pretrained", "--epochs", "4",
            "--lr", "1e-12", "--early-stop", "1", "--batch-size", "10")
    assert main(["-q", *train_args(data, run, cache, *args)]) == 0
    assert len(metrics_rows(run)) == 2 and newest(run)["stopped_early"]
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--epochs", "6"]) == 2
    assert "stopped early after epoch 2" in capsys.readouterr().err
    assert main(["train", "--resume", str(run)]) == 0
    assert "stopped early after epoch 2" in capsys.readouterr().err
    assert len(metrics_rows(run)) == 2 and (run / "model.safetensors").exists()


def test_resume_refuses_other_flags_and_fewer_epochs(data, cache, reference, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference(*SCRATCH), run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    cases = [(["--lr", "0.1"], "--lr"), (["--no-pretrained"], "--no-pretrained"), (["--workers", "2"], "--workers"),
             (["--out", "elsewhere"], "--out"), (["--checkpoint-every", "3"], "--checkpoint-every")]
    for flags, named in cases:
        assert main(["train", "--resume", str(run), *flags]) == 2
        err = capsys.readouterr().err
        assert f"not {named}" in err and "only --epochs may be given" in err
    assert main(["train", str(data), "--resume", str(run)]) == 2
    assert f"DATA ({data})" in capsys.readouterr().err

    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "--epochs 2" in err and "3 epochs" in err and "may only raise" in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # nothing touched

    assert main(["train", "--resume", str(tmp_path / "absent")]) == 3
    assert "not an imgtune run folder" in capsys.readouterr().err
    shutil.rmtree(run / "checkpoints")
    assert main(["train", "--resume", str(run)]) == 3
    assert "no checkpoint in" in capsys.readouterr().err


def test_overwrite_removes_the_old_runs_checkpoints(data, cache, tmp_path):
    run = tmp_path / "run"
    args = (*BASE, "--strategy", "scratch", "--epochs", "1", "--batch-size", "10")
    assert main(["-q", *train_args(data, run, cache, *args, "--checkpoint-every", "1")]) == 0
    assert [p.name for p in checkpoint.listed(run / "checkpoints")] == ["epoch0001-step000003.pt", "epoch0001-end.pt"]
    assert main(["-q", *train_args(data, run, cache, *args, "--overwrite")]) == 0
    assert [p.name for p in checkpoint.listed(run / "checkpoints")] == ["epoch0001-end.pt"]


# --- real processes, real signals ----------------------------------------------------------------

def start_training(data: Path, run: Path, cache: Path, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / "stderr.txt"
    env = {**os.environ, "IMGTUNE_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # PYTHONPATH passes through
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "imgtune", *train_args(data, run, cache, *SCRATCH,
                                                                             "--checkpoint-every", "2")],
                                env=env, stdout=subprocess.DEVNULL, stderr=err)
    return proc, log


def wait_for_first_mid_epoch_checkpoint(proc: subprocess.Popen, run: Path, log: Path) -> None:
    """Until the checkpoint after step 2 of epoch 1 exists: 13 of the epoch's 15 steps are left."""
    deadline = time.monotonic() + 240
    while not list((run / "checkpoints").glob("epoch0001-step*.pt")):
        assert proc.poll() is None, f"imgtune exited with {proc.returncode}:\n{log.read_text()}"
        assert time.monotonic() < deadline, "no checkpoint after 240 s"
        time.sleep(0.005)
    assert proc.poll() is None  # still training


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bit_identical(data, cache, reference, tmp_path):
    run = tmp_path / "run"
    proc, log = start_training(data, run, cache, tmp_path)
    wait_for_first_mid_epoch_checkpoint(proc, run, log)
    proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL
    saved = newest(run)
    assert saved["epoch"] == 1 and 0 < saved["step"] < STEPS_PER_EPOCH and not saved["epoch_done"]
    assert not (run / "metrics.csv").exists() and not (run / "model.safetensors").exists()

    assert main(["-q", "train", "--resume", str(run)]) == 0
    assert_same_run(run, reference(*SCRATCH))
    assert not list((run / "checkpoints").glob(".*.tmp"))


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_writes_checkpoint_and_exits_then_resume_is_identical(data, cache, reference, tmp_path, signum):
    run = tmp_path / "run"
    proc, log = start_training(data, run, cache, tmp_path)
    wait_for_first_mid_epoch_checkpoint(proc, run, log)
    proc.send_signal(signum)
    assert proc.wait(timeout=120) == 128 + signum  # 143 for SIGTERM, 130 for SIGINT
    err = log.read_text()
    assert f"{signal.Signals(signum).name} received" in err
    assert f"continue with: imgtune train --resume {run}" in err
    saved = newest(run)
    assert saved["epoch"] == 1 and 0 < saved["step"] < STEPS_PER_EPOCH

    assert main(["-q", "train", "--resume", str(run)]) == 0
    assert_same_run(run, reference(*SCRATCH))


def test_resume_refuses_changed_data(cache, tmp_path, capsys):
    data = make_split_dataset(tmp_path / "data", train=4, val=2)
    run = tmp_path / "run"
    assert main(["-q", *train_args(data, run, cache, *BASE, "--strategy", "scratch", "--epochs", "1")]) == 0
    shutil.copy(next((data / "train" / "red_circle").iterdir()), data / "train" / "red_circle" / "extra.png")
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 3
    assert f"the data in {data} changed since the run started" in capsys.readouterr().err


def test_train_without_data_or_resume_says_both(capsys):
    assert main(["train"]) == 2
    err = capsys.readouterr().err
    assert "imgtune train DATA" in err and "--resume RUN" in err
