"""Few labels: ``linear-probe`` on hymenoptera with K labelled training images per class (three draws),
the head fitted to convergence (``--head-fit lbfgs``, the default) against today's SGD epochs
(``--head-fit sgd``), both with default settings otherwise, in one invocation, each a fresh process.

Each draw is a CSV (``path,label,split``) of K random training photos per class and the whole val split;
the feature cache is shared, so after the first run every run reads cached features (the comparison is
of the head fit; cold extraction is measured by ``bench/hymenoptera.py``). Also the whole training split.

    python bench/few_shot.py [--data DIR] [--per-class 10] [--draws 3]
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

from common import HYMENOPTERA, child_env, run_measured, warm_imports

SUFFIXES = (".jpg", ".jpeg", ".png", ".gif")


def images(folder: Path) -> dict[str, list[Path]]:
    return {c.name: sorted(p for p in c.iterdir() if p.suffix.lower() in SUFFIXES)
            for c in sorted(folder.iterdir()) if c.is_dir()}


def write_draw(data: Path, path: Path, per_class: int | None, seed: int) -> Path:
    rng = random.Random(seed)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split"])
        for label, files in images(data / "train").items():
            for file in (rng.sample(files, per_class) if per_class else files):
                writer.writerow([file, label, "train"])
        for label, files in images(data / "val").items():
            for file in files:
                writer.writerow([file, label, "val"])
    return path


def train(csv_path: Path, out: Path, cache: Path, head_fit: str) -> dict:
    command = [sys.executable, "-m", "imgtune", "-q", "train", str(csv_path), "--model", "mobilenet_v2",
               "--strategy", "linear-probe", "--head-fit", head_fit, "--out", str(out), "--offline", "--overwrite",
               "--allow-outside-paths"]
    seconds, _, result = run_measured(command, child_env(IMGTUNE_CACHE=str(cache)))
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return {"accuracy": json.loads((out / "metrics.json").read_text())["accuracy"], "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HYMENOPTERA)
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--draws", type=int, default=3)
    args = parser.parse_args()
    warm_imports()
    rows: dict[str, dict[str, list]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = tmp / "cache"
        sets = [(f"{args.per_class}/class, draw {d}", args.per_class, d) for d in range(args.draws)]
        for name, per_class, seed in [*sets, ("whole training split", None, 0)]:
            csv_path = write_draw(args.data.resolve(), tmp / f"draw{seed}-{per_class}.csv", per_class, seed)
            for head_fit in ("lbfgs", "sgd"):
                result = train(csv_path, tmp / f"{head_fit}-{seed}-{per_class}", cache, head_fit)
                rows.setdefault(name, {})[head_fit] = result
                print(f"{name}, --head-fit {head_fit}: val accuracy {result['accuracy']:.4f}, "
                      f"{result['seconds']:.1f} s", flush=True)
    print("\n| training images | lbfgs val accuracy | sgd val accuracy | lbfgs s | sgd s |")
    print("| --- | --- | --- | --- | --- |")
    for name, row in rows.items():
        print(f"| {name} | {row['lbfgs']['accuracy']:.4f} | {row['sgd']['accuracy']:.4f} | "
              f"{row['lbfgs']['seconds']:.1f} | {row['sgd']['seconds']:.1f} |")
    few = [row for name, row in rows.items() if name.startswith(f"{args.per_class}/class")]
    for fit in ("lbfgs", "sgd"):
        accuracies = [row[fit]["accuracy"] for row in few]
        print(f"{fit}: mean over the {len(few)} draws {statistics.mean(accuracies):.4f}, lowest {min(accuracies):.4f}")


if __name__ == "__main__":
    main()
