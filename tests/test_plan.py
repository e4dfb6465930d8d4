"""The time plan (imgtune.timeplan: --plan, --time-budget) and the never-worse rule (imgtune.never_worse)."""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import replace

import pytest
import yaml
from safetensors.torch import load_file
import torch
from torch import nn

from datagen import PRETRAINED_ARGS, make_split_dataset
from imgtune import finite, never_worse, timeplan
from imgtune.cli import main
from imgtune.config import RunConfig, TrainConfig, resolve
from imgtune.data.sources import open_source
from imgtune.errors import UsageError
from imgtune.strategies import plan

FAST = (*PRETRAINED_ARGS, "--workers", "0", "--epochs", "2", "--freeze-epochs", "1")
BROKEN = ("--backbone-lr-factor", "500")  # the body at lr 1: fine-tuning wrecks it (finite, far from useful)


def test_the_holdout_is_stratified_from_the_training_split_only(tmp_path):
    data = make_split_dataset(tmp_path / "data", train=9, val=3, test=2)
    source = open_source(str(data), 0.2, 0.0, seed=0, progress=False)
    train = resolve(RunConfig(train=TrainConfig())).train
    phases = plan(train)
    head = nn.Linear(8, 3)
    hold = never_worse.carve(source, train, phases, head)
    samples = hold.source.splits.samples
    inner = [s for s in samples if s.split == never_worse.INNER]
    assert Counter(s.label for s in inner) == Counter({c: 3 for c in source.classes})  # max(15%, 3), <= 9 // 3
    before = {s.path: s.split for s in source.splits.samples}
    assert all(before[s.path] == "train" for s in inner)
    assert all(s.split == before[s.path] for s in samples if s.split != never_worse.INNER)  # val, test untouched
    again = never_worse.carve(source, train, phases, head)
    assert [s.split for s in again.source.splits.samples] == [s.split for s in samples]
    assert never_worse.carve(source, replace(train, never_worse=False), phases, head) is None
    assert [never_worse.holdout_size(n) for n in (2, 5, 10, 120, 1000)] == [0, 1, 3, 18, 150]
    # a run that drops fine-tuning puts the hold-out back; pseudo-labelled images (appended) keep their weights
    carved = hold.source
    pseudo = [replace(s, split="train", path=s.path.with_name("pseudo" + s.path.name)) for s in samples[:2]]
    carved = type(carved)(replace(carved.splits, samples=samples + pseudo), carved.source)
    labelled = sum(s.split == "train" for s in samples)
    carved.train_weights = torch.tensor([1.0] * labelled + [0.3, 0.3], dtype=torch.float64)
    whole = never_worse.uncarved(carved)
    assert [s.split for s in whole.splits.samples] == [before[s.path] for s in source.splits.samples] + ["train"] * 2
    assert whole.train_weights.tolist() == [1.0] * (labelled + len(inner)) + [0.3, 0.3]
    assert len(whole.splits.split("train")) == len(whole.train_weights)


def _run(tmp_path, name: str, data, *extra: str, quiet: bool = True) -> tuple:
    out = tmp_path / name
    assert main([*["-q"] * quiet, "train", str(data), "--cache-dir", str(tmp_path / "cache"), *FAST, *extra, "--out",
                 str(out)]) == 0
    return out, json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_failed_fine_tuning_keeps_the_probe_refitted_on_the_whole_training_split(tmp_path):
    data = make_split_dataset(tmp_path / "data", train=12, val=4)
    guarded, metrics = _run(tmp_path, "guarded", data, *BROKEN)
    selection = metrics["selection"]
    assert selection["kept"] == "probe" and selection["refitted_on_whole_training_split"]
    assert selection["holdout_images"] == 9 and selection["fine_tuned"]["accuracy"] < selection["probe"]["accuracy"]
    probe, probe_metrics = _run(tmp_path, "probe", data, "--strategy", "linear-probe")
    assert metrics["accuracy"] == probe_metrics["accuracy"]  # the same probe: same images, features and fit
    assert metrics["loss"] == pytest.approx(probe_metrics["loss"], rel=1e-4, abs=1e-6)
    kept, fitted = load_file(guarded / "model.safetensors"), load_file(probe / "model.safetensors")
    assert all(kept[k].equal(fitted[k]) for k in kept if k.startswith("body."))  # the pretrained body
    unguarded, plain = _run(tmp_path, "unguarded", data, *BROKEN, "--no-never-worse")
    assert "selection" not in plain and plain["accuracy"] < metrics["accuracy"]
    unplanned, _ = _run(tmp_path, "unplanned", data, *BROKEN, "--no-never-worse", "--no-plan")
    assert not (unplanned / timeplan.PLAN_FILE).exists()
    a, b = load_file(unguarded / "model.safetensors"), load_file(unplanned / "model.safetensors")
    assert all(a[k].equal(b[k]) for k in a)  # timing batches changes nothing in what trains


@pytest.mark.slow
def test_diverged_fine_tuning_keeps_the_probe_and_without_the_rule_exits_5(tmp_path):
    data = make_split_dataset(tmp_path / "data", train=12, val=4)
    guarded, metrics = _run(tmp_path, "guarded", data, "--lr", "1e30")  # the frozen phase is fitted by L-BFGS
    selection = metrics["selection"]
    assert selection["kept"] == "probe" and selection["refitted_on_whole_training_split"]
    assert selection["reason"].startswith("training diverged in epoch 2 (unfrozen), batch 1 of")
    assert finite.nonfinite_tensors(load_file(guarded / "model.safetensors")) == []
    _, probe_metrics = _run(tmp_path, "probe", data, "--strategy", "linear-probe")
    assert metrics["accuracy"] == probe_metrics["accuracy"]
    unguarded = tmp_path / "unguarded"
    assert main(["-q", "train", str(data), "--cache-dir", str(tmp_path / "cache"), *FAST, "--lr", "1e30",
                 "--no-never-worse", "--out", str(unguarded)]) == 5
    assert not (unguarded / "model.safetensors").exists()


def test_the_referee_gives_up_after_patience_epochs_in_a_row_that_lose_to_the_probe():
    probe = {"accuracy": 0.9, "loss": 0.3}
    frozen = {"epoch": 1}  # a row the referee did not score
    lost, tied_worse, won = ({"inner_accuracy": a, "inner_loss": b} for a, b in ((0.8, 0.2), (0.9, 0.3), (0.9, 0.29)))
    assert never_worse.lost_in_a_row([frozen, lost], probe, 1)
    assert never_worse.lost_in_a_row([frozen, lost, tied_worse], probe, 2)  # a tie on both does not beat it
    assert not never_worse.lost_in_a_row([frozen, lost, won], probe, 1)
    assert not never_worse.lost_in_a_row([frozen, won, lost], probe, 2)  # not two in a row
    assert not never_worse.lost_in_a_row([frozen, lost], probe, 2)  # the frozen row does not count
    assert not never_worse.lost_in_a_row([lost, lost], probe, 0)  # 0: off
    assert never_worse.beats({"accuracy": 0.95, "loss": 0.9}, probe)  # accuracy first
    assert never_worse.beats({"accuracy": 0.9, "loss": 0.29}, probe)  # then log loss
    assert not never_worse.beats(probe, probe)


@pytest.mark.slow
def test_failing_fine_tuning_is_given_up_early_and_the_probe_uses_the_pretrained_features(tmp_path, capsys):
    """--never-worse-patience 1: fine-tuning that loses to the probe on the hold-out after its first epoch
    ends there. With the torch feature engine, whose features of the hold-out are computed from the body
    it is handed, the probe is still the pretrained body's: the same as linear-probe's, from its own cache."""
    data = make_split_dataset(tmp_path / "data", train=12, val=4)
    out = tmp_path / "gave-up"
    args = [*PRETRAINED_ARGS, "--workers", "0", "--epochs", "4", "--freeze-epochs", "1", *BROKEN, "--feature-engine",
            "torch", "--never-worse-patience", "1"]
    assert main(["-q", "train", str(data), "--cache-dir", str(tmp_path / "cache-a"), *args, "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    selection = metrics["selection"]
    assert selection["gave_up_after_epoch"] == 2 and selection["patience"] == 1 and selection["kept"] == "probe"
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["phase"] for r in rows] == ["frozen", "unfrozen"]  # epochs 3 and 4 did not run
    assert rows[0]["inner_accuracy"] == "" and float(rows[1]["inner_accuracy"]) == selection["fine_tuned"]["accuracy"]
    recorded = json.loads((out / timeplan.PLAN_FILE).read_text())
    assert recorded["epochs_done"] == 2 and recorded["estimated_as_run_seconds"] < recorded["estimated_total_seconds"]
    probe = tmp_path / "probe"
    assert main(["-q", "train", str(data), "--cache-dir", str(tmp_path / "cache-b"), *PRETRAINED_ARGS, "--workers",
                 "0", "--strategy", "linear-probe", "--feature-engine", "torch", "--out", str(probe)]) == 0
    probe_metrics = json.loads((probe / "metrics.json").read_text())
    assert metrics["accuracy"] == probe_metrics["accuracy"]
    assert metrics["loss"] == pytest.approx(probe_metrics["loss"], rel=1e-4, abs=1e-6)
    # the kept probe's final metrics came from the cached features: the whole saved model on the images agrees
    capsys.readouterr()
    assert main(["evaluate", str(out), "--split", "val", "--device", "cpu", "--format", "json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["accuracy"] == metrics["accuracy"]
    assert evaluated["loss"] == pytest.approx(metrics["loss"], rel=1e-4, abs=1e-6)
    assert main(["-q", "train", "--resume", str(out)]) == 0  # finished: its results written again, the same
    assert json.loads((out / "metrics.json").read_text())["selection"]["kept"] == "probe"
    assert main(["-q", "train", "--resume", str(out), "--epochs", "5"]) == 2  # given up: it does not go on


def _referee(images: int, patience: int, accuracy: float) -> never_worse.Referee:
    """A referee whose probe is already scored: what nothing_to_win decides on."""
    judge = never_worse.Referee.__new__(never_worse.Referee)
    judge.hold = never_worse.HoldOut(source=None, images=images, per_class={})
    judge.patience, judge.probe = patience, {"accuracy": accuracy, "loss": 0.01, "C": 1.0}
    return judge


def test_fine_tuning_is_skipped_only_when_a_large_enough_hold_out_leaves_it_nothing_to_win():
    enough = never_worse.SKIP_MIN_IMAGES
    why = _referee(enough, 2, 1.0).nothing_to_win()
    assert why.startswith(f"the linear probe classifies all {enough} held-out training images correctly")
    assert _referee(enough, 2, 0.99).nothing_to_win() is None  # one mistake: fine-tuning may win
    assert _referee(enough - 1, 2, 1.0).nothing_to_win() is None  # too few to trust a perfect score
    assert _referee(10 * enough, 0, 1.0).nothing_to_win() is None  # --never-worse-patience 0: fine-tunes anyway


@pytest.mark.slow
def test_a_perfect_probe_on_the_hold_out_skips_fine_tuning_and_resumes_the_same(tmp_path, capsys):
    """67 training images a class hold out 10 each: 30, enough for the skip. The run becomes linear-probe
    (config.yaml, metrics.csv, the plan) and keeps the probe refitted on the whole training split, the same
    model linear-probe fits; --never-worse-patience 0 fine-tunes the same data."""
    data = make_split_dataset(tmp_path / "data", train=67, val=3, size=24)
    out, metrics = _run(tmp_path, "skipped", data, quiet=False)
    told = capsys.readouterr().err
    assert "never-worse rule: the linear probe classifies all 30 held-out training images correctly" in told
    selection = metrics["selection"]
    assert selection["kept"] == "probe" and selection["fine_tuning_skipped"]
    assert selection["refitted_on_whole_training_split"] and selection["probe"]["accuracy"] == 1.0
    assert selection["reason"].startswith("fine-tuning skipped: the linear probe classifies all 30")
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["strategy"] == "linear-probe"
    with open(out / "metrics.csv") as handle:
        assert {row["phase"] for row in csv.DictReader(handle)} == {"frozen"}
    assert json.loads((out / timeplan.PLAN_FILE).read_text())["chosen"] == "as configured"
    probe, probe_metrics = _run(tmp_path, "probe", data, "--strategy", "linear-probe")
    kept, fitted = load_file(out / "model.safetensors"), load_file(probe / "model.safetensors")
    assert all(torch.allclose(kept[k], fitted[k], atol=1e-5) for k in kept)
    assert metrics["accuracy"] == probe_metrics["accuracy"]
    assert main(["-q", "train", "--resume", str(out)]) == 0  # finished: its results written again, the same
    again = load_file(out / "model.safetensors")
    assert all(torch.allclose(kept[k], again[k], atol=1e-5) for k in kept)
    tuned, tuned_metrics = _run(tmp_path, "tuned", data, "--never-worse-patience", "0")
    with open(tuned / "metrics.csv") as handle:
        assert [row["phase"] for row in csv.DictReader(handle)] == ["frozen", "unfrozen"]
    assert "fine_tuning_skipped" not in tuned_metrics["selection"]


def _costs() -> timeplan.Costs:
    return timeplan.Costs(body_epoch=30.0, body_val=5.0, head_epoch=0.1, val_images=5.0, val_features=0.05,
                          val_first_read=6.0, per_image=0.01, lbfgs=1.0)


def test_the_plan_fits_the_budget_fewer_epochs_first_then_linear_probe():
    config = resolve(RunConfig(train=TrainConfig(epochs=8)))  # gradual: 4 frozen, 4 unfrozen epochs
    full = timeplan.make(config, _costs(), 10.0, True, 20, False)
    assert full.config == config and full.record["chosen"] == "as configured"
    # the referee scores the hold-out after fine-tuning epochs 5-7; the check scores epoch 8's model
    assert full.record["estimated_total_seconds"] == pytest.approx(10 + 4 * 0.15 + 4 * 35 + 3 * 20 * 0.01 + 5 +
                                                                   20 * 0.01 + 2, abs=0.06)
    # given up at the earliest (after epoch 6, two scored epochs in a row): epochs 7 and 8 do not run, and the
    # kept probe's final metrics run on the val features (0.05 s), not on the images (5 s)
    assert full.record["earliest_give_up_epoch"] == 6
    assert full.record["estimated_if_given_up_seconds"] == pytest.approx(
        full.record["estimated_total_seconds"] - 2 * 35 - 20 * 0.01 - (5 - 0.05), abs=0.06)
    # the probe fitted before the plan (its fit timed the head fit): the check no longer counts that fit
    fitted_before = timeplan.make(config, _costs(), 10.0, True, 20, False, probe_fitted=True)
    assert full.record["estimated_total_seconds"] - fitted_before.record["estimated_total_seconds"] == \
        pytest.approx(1.0, abs=0.06)
    unrefereed = timeplan.make(replace(config, train=replace(config.train, never_worse_patience=0)), _costs(), 10.0,
                               True, 20, False)
    assert full.record["estimated_total_seconds"] - unrefereed.record["estimated_total_seconds"] == \
        pytest.approx(3 * 20 * 0.01, abs=0.06)
    assert "estimated_if_given_up_seconds" not in unrefereed.record
    budget = 10 + 4 * 0.15 + 2 * 35 + 5 + 2.4 + 1  # two fine-tuning epochs fit, three do not
    fitted = timeplan.make(replace(config, train=replace(config.train, time_budget=f"{budget}s")), _costs(), 10.0,
                           True, 20, False)
    assert [p.epochs for p in fitted.phases] == [4, 2] and fitted.config.train.epochs == 6
    assert fitted.record["estimated_total_seconds"] <= budget < fitted.record["tried"][-2]["estimated_seconds"]
    assert fitted.config.train.time_budget is None  # config.yaml repeats what ran
    floor = timeplan.make(replace(config, train=replace(config.train, time_budget="20s")), _costs(), 10.0, True, 20,
                          False)
    assert floor.config.train.strategy == "linear-probe" and [p.body_frozen for p in floor.phases] == [True]
    # the frozen phase (L-BFGS, val on features), val on images read the first time, the refit with the hold-out
    # (whose features were computed before the plan)
    assert floor.record["estimated_total_seconds"] == pytest.approx(10 + 1.05 + 6 + 1, abs=0.06)


def test_the_printed_total_that_matches_what_ran():
    """finish: the total the plan printed for what happened (every epoch, or given up at the first chance),
    and none for an end it printed no line for; the estimate of what ran in every early end."""
    full = timeplan.make(resolve(RunConfig(train=TrainConfig(epochs=8))), _costs(), 10.0, True, 20, False)
    whole, given_up = full.record["estimated_total_seconds"], full.record["estimated_if_given_up_seconds"]
    ran = timeplan.finish(full, 200.0, epochs_done=8)
    assert ran["printed_estimate_seconds"] == whole and ran["printed_estimate_over_measured"] == round(whole / 200, 3)
    stopped = timeplan.finish(full, 100.0, epochs_done=6, kept_probe=True)
    assert stopped["printed_estimate_seconds"] == given_up == stopped["estimated_as_run_seconds"]
    later = timeplan.finish(full, 150.0, epochs_done=7, kept_probe=True)
    assert "printed_estimate_seconds" not in later and given_up < later["estimated_as_run_seconds"] < whole


def test_durations_and_the_time_left():
    assert [timeplan.parse_duration(t) for t in ("90s", "10m", "1.5h", "2")] == [90, 600, 5400, 120]
    for bad in ("", "-1m", "0", "ten minutes", "5d"):
        with pytest.raises(UsageError, match="--time-budget"):
            timeplan.parse_duration(bad)
    estimate = timeplan.Estimate(epoch_seconds={1: 0.0, 2: 60.0, 3: 60.0}, tail=30.0)
    assert timeplan.TimeLeft(estimate)(2) == ", about 2.5 min left in the run"


def test_a_bad_budget_stops_before_anything_is_written(tmp_path, capsys):
    data = make_split_dataset(tmp_path / "data", train=3, val=2)
    assert main(["train", str(data), *FAST, "--time-budget", "soon", "--out", str(tmp_path / "run")]) == 2
    assert "--time-budget 'soon'" in capsys.readouterr().err and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_tight_budget_trains_linear_probe_and_says_so(tmp_path, capsys):
    data = make_split_dataset(tmp_path / "data", train=8, val=3)
    out, metrics = _run(tmp_path, "run", data, "--time-budget", "1s", quiet=False)
    told = capsys.readouterr().err
    assert "time budget 1s: chose linear-probe only" in told and "total (estimated)" in told
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["train"]["strategy"] == "linear-probe" and config["train"]["time_budget"] is None
    with open(out / "metrics.csv") as handle:
        assert {row["phase"] for row in csv.DictReader(handle)} == {"frozen"}
    record = json.loads((out / timeplan.PLAN_FILE).read_text())
    assert record["budget_seconds"] == 1 and record["chosen"].startswith("linear-probe")
    assert record["measured_total_seconds"] > 0 and record["estimate_over_measured"] > 0
    assert metrics["selection"]["kept"] == "probe" and metrics["selection"]["refitted_on_whole_training_split"]
    assert main(["-q", "train", "--resume", str(out)]) == 0  # config.yaml resumes as what ran: linear-probe


def test_views_made_when_first_drawn_are_timed_apart_in_one_pass(monkeypatch):
    """Batches of activations whose views are made when drawn: one timed pass, the time spent making views
    measured apart (first pass: the step and the making; the rest: the steady batch, which a second pass
    over the same batches used to measure)."""
    clock = [0.0]
    monkeypatch.setattr(timeplan.time, "perf_counter", lambda: clock[0])

    class Views:  # what the timing sees of an ActivationSet with views not made yet
        missing = object()

        def fill(self, target, pairs):
            clock[0] += 0.3  # making the batch's new views

    class Loader:
        dataset = Views()

        def __iter__(self):
            return iter(range(10))

        def __len__(self):
            return 10

    passes = []

    def epoch(net, loader, *args, after_step, **kwargs):  # engine.train_one_epoch as far as timing goes
        passes.append(loader)
        for _ in loader:
            loader.loader.dataset.fill(None, [])
            clock[0] += 0.2  # the training step
            after_step()
        return 0.0, 0.0

    class Model:
        def freeze_body(self, frozen):
            pass

    monkeypatch.setattr(timeplan, "train_one_epoch", epoch)
    monkeypatch.setattr(timeplan, "make_optimizer", lambda model, phase, train: torch.optim.SGD([torch.zeros(1)], 0.1))
    monkeypatch.setattr(timeplan, "PartialNet", lambda model, found: model)
    unfrozen = plan(resolve(RunConfig(train=TrainConfig())).train)[-1]
    loader = Loader()
    fill = loader.dataset.fill
    first, again = timeplan._time_training(loader, unfrozen, Model(), False, TrainConfig(),
                                           "cpu", None, found=object())
    assert len(passes) == 1 and first == pytest.approx(0.5) and again == pytest.approx(0.2)
    assert loader.dataset.fill == fill  # the timing's wrapper is gone

    Loader.dataset.missing = None  # every view made (or images): two passes, as before
    passes.clear()
    first, again = timeplan._time_training(loader, unfrozen, Model(), False, TrainConfig(),
                                           "cpu", None, found=object())
    assert len(passes) == 2
