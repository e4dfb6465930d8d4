"""Fault cases of ``imgtune explain`` with the new methods and ``--evaluate`` (issue 18; see faultlib): an
unknown method, an unreadable image among good ones, evaluation data that does not exist, and a failed
evaluation over an earlier one. ``lost`` is computed from the files, never assumed."""

from __future__ import annotations

from pathlib import Path

from datagen import SCRATCH_ARGS, make_split_dataset, write_unreadable
from faultlib import Fault, Outcome, cli


def _run(tmp: Path) -> tuple[Path, Path]:
    """A tiny trained run and its data."""
    data = make_split_dataset(tmp / "data", train=6, val=2)
    run = tmp / "run"
    outcome = cli("-q", "train", str(data), *SCRATCH_ARGS, "--epochs", "1", "--workers", "0", "--out", str(run))
    if outcome.exit_code != 0:
        raise RuntimeError(f"training the fault case's run failed: {outcome.message}")
    return run, data


def _unknown_method(tmp: Path) -> Outcome:
    run, data = _run(tmp)
    image = next((data / "val" / "red_circle").glob("*.png"))
    outcome = cli("explain", str(run), str(image), "--method", "shapley")
    if (run / "explanations").exists():
        outcome.lost = "an overlay folder was written for a refused command"
    return outcome


def _unreadable_among_good(tmp: Path) -> Outcome:
    run, data = _run(tmp)
    good = next((data / "val" / "red_circle").glob("*.png"))
    bad = write_unreadable(tmp / "broken.png")
    outcome = cli("explain", str(run), str(bad), str(good), "--method", "kernel-shap", "--samples", "20",
                  "--out", str(tmp / "out"))
    if not (tmp / "out" / f"{good.stem}.kernel-shap.png").is_file():
        outcome.lost = "the readable image's overlay was not written"
    return outcome


def _missing_evaluation_data(tmp: Path) -> Outcome:
    run, _ = _run(tmp)
    outcome = cli("explain", str(run), "--evaluate", str(tmp / "nowhere"), "--methods", "gradcam")
    if (run / "explain_eval.json").exists():
        outcome.lost = "explain_eval.json written for data that does not exist"
    return outcome


def _failed_evaluation_keeps_the_earlier_one(tmp: Path) -> Outcome:
    run, _ = _run(tmp)
    earlier = cli("explain", str(run), "--evaluate", "--images", "2", "--sanity-images", "1", "--methods", "gradcam")
    before = (run / "explain_eval.json").read_bytes() if earlier.exit_code == 0 else b""
    outcome = cli("explain", str(run), "--evaluate", str(tmp / "nowhere"), "--methods", "gradcam")
    after = (run / "explain_eval.json").read_bytes() if (run / "explain_eval.json").is_file() else b""
    if not before or after != before:
        outcome.lost = "the earlier explain_eval.json was changed or removed by a failed evaluation"
    return outcome


FAULTS = [
    Fault("explain with an unknown --method", "explanations", 2, _unknown_method),
    Fault("explain (kernel-shap) an unreadable image beside a good one", "explanations", 3, _unreadable_among_good),
    Fault("explain --evaluate on data that does not exist", "explanations", 3, _missing_evaluation_data),
    Fault("a failed explain --evaluate over an earlier one", "explanations", 3,
          _failed_evaluation_keeps_the_earlier_one),
]
