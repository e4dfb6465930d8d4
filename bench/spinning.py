"""ONNX Runtime's spin-waiting and the probe's folds in threads, on MNIST's default run (28 px digits:
the lower blocks make an epoch's new views on ONNX Runtime between torch's training steps).

Each run is a fresh process, alternating: the ``imgtune`` command as it is (the lower blocks' session
without spin-waiting, ``imgtune.body_runtime.ALLOW_SPINNING`` "0"; the cross-validation folds of the
probe's fit in threads) and the same command with ONNX Runtime's default (spinning on) and the folds one
after another (``imgtune.head_fit.FOLD_THREADS`` 1), set in the child before ``imgtune.cli.run`` runs (both through it).
Each run is the default ``imgtune train`` with a cold cache. Prints per run: wall time, the four
fine-tuning epochs' seconds (metrics.csv), the probe's fit (plan.json's ``lbfgs``) and val accuracy; then
the medians and their ratios.

    python bench/spinning.py [--repeats 3]   # needs mlxtend (pip install mlxtend), as bench/default.py
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import child_env, warm_imports
from default import mnist_folder

AS_IS = "from imgtune.cli import run; run()"  # the console script's own entry (sys.argv: -c and the arguments)
BEFORE = "from imgtune import body_runtime, head_fit; body_runtime.ALLOW_SPINNING = '1'; head_fit.FOLD_THREADS = 1; " + AS_IS


def one_run(data: Path, out: Path, cache: Path, before: bool) -> dict:
    command = [sys.executable, "-c", BEFORE if before else AS_IS, "-q", "train", str(data), "--model", "mobilenet_v2",
               "--offline", "--out", str(out), "--cache-dir", str(cache), "--allow-outside-paths"]
    start = time.perf_counter()
    subprocess.run(command, env=child_env(), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    with open(out / "metrics.csv") as f:
        tuning = sum(float(r["seconds"]) for r in csv.DictReader(f) if r["phase"] == "unfrozen")
    plan = json.loads((out / "plan.json").read_text())
    accuracy = json.loads((out / "metrics.json").read_text())["accuracy"]
    return {"wall": seconds, "fine-tuning": tuning, "probe fit": plan["costs"]["lbfgs"], "accuracy": accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    warm_imports()
    work = Path(tempfile.mkdtemp(prefix="imgtune-bench-spinning-"))
    rows: dict[bool, list[dict]] = {False: [], True: []}
    try:
        data = mnist_folder(work / "mnist", 200, 100)
        for i in range(args.repeats):
            for before in (True, False):
                out, cache = work / f"run-{i}-{before}", work / f"cache-{i}-{before}"
                row = one_run(data, out, cache, before)
                rows[before].append(row)
                print(f"{'spinning, folds in turn' if before else 'as is'}: " +
                      ", ".join(f"{k} {v:.4f}" if k == "accuracy" else f"{k} {v:.2f} s" for k, v in row.items()),
                      flush=True)
                shutil.rmtree(cache, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n| measure | as is (median) | spinning, folds in turn (median) | ratio |")
    print("| --- | --- | --- | --- |")
    for key in ("wall", "fine-tuning", "probe fit"):
        now, then = (statistics.median(r[key] for r in rows[b]) for b in (False, True))
        print(f"| {key} (s) | {now:.2f} | {then:.2f} | {now / then:.3f} |")


if __name__ == "__main__":
    main()
