"""Active learning on hymenoptera: does ``imgtune suggest`` pick images worth labelling?

For each seed: start from 5 labelled training photos per class (the rest of the training split is the
unlabelled pool, the whole val split measures); then five rounds, each adding 10 photos with their true
labels, chosen either by ``imgtune suggest`` (default strategy, ``diverse``) on the previous round's run
or at random from the pool. Every round trains ``imgtune train CSV --strategy linear-probe
--extra-labels ACQUIRED.csv`` (defaults otherwise: mobilenet_v2, the head fitted to convergence),
through the Python API in this process with one shared feature cache. Prints val accuracy per round
for both, per seed and their mean.

    python bench/active.py [--data DIR] [--seeds 0 1 2] [--rounds 5] [--per-round 10] [--start 5]
"""

from __future__ import annotations

import argparse
import csv
import logging
import random
import statistics
import sys
import tempfile
from pathlib import Path

from common import HYMENOPTERA, ROOT

sys.path.insert(0, str(ROOT / "src"))

import imgtune  # noqa: E402
from imgtune.suggest import suggest  # noqa: E402

SUFFIXES = (".jpg", ".jpeg", ".png", ".gif")


def photos(folder: Path) -> list[tuple[Path, str]]:
    return [(p.resolve(), c.name) for c in sorted(folder.iterdir()) if c.is_dir()
            for p in sorted(c.iterdir()) if p.suffix.lower() in SUFFIXES]


def write_csv(path: Path, rows: list[tuple[Path, str, str | None]]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split"])
        writer.writerows([str(p), label, split] for p, label, split in rows)
    return path


def train(tmp: Path, name: str, start: Path, acquired: list[tuple[Path, str]]) -> tuple[Path, float]:
    extra = write_csv(tmp / f"{name}-extra.csv", [(p, label, "train") for p, label in acquired]) \
        if acquired else None
    result = imgtune.train(start, model="mobilenet_v2", strategy="linear-probe", offline=True, overwrite=True,
                           out=str(tmp / name), extra_labels=str(extra) if extra else None,
                           allow_outside_paths=True, cache_dir=str(tmp / "cache"), progress=False)
    return result.run_dir, result.metrics["accuracy"]


def one_seed(data: Path, tmp: Path, seed: int, rounds: int, per_round: int, start_per_class: int) -> dict:
    rng = random.Random(seed)
    train_photos, val_photos = photos(data / "train"), photos(data / "val")
    by_class: dict[str, list] = {}
    for item in train_photos:
        by_class.setdefault(item[1], []).append(item)
    start = [item for items in by_class.values() for item in rng.sample(items, start_per_class)]
    start_csv = write_csv(tmp / f"start-{seed}.csv", [(p, c, "train") for p, c in start] +
                          [(p, c, "val") for p, c in val_photos])
    truth = dict(train_photos)
    curves = {}
    for method in ("suggest", "random"):
        acquired: list[tuple[Path, str]] = []
        run, accuracy = train(tmp, f"{method}-{seed}-0", start_csv, acquired)
        curve = [accuracy]
        for round_ in range(1, rounds + 1):
            taken = {p for p, _ in start} | {p for p, _ in acquired}
            if method == "suggest":
                picks = [s.path.resolve() for s in suggest(run, data / "train", per_round)]
            else:
                picks = rng.sample(sorted(p for p in truth if p not in taken), per_round)
            acquired += [(p, truth[p]) for p in picks]
            run, accuracy = train(tmp, f"{method}-{seed}-{round_}", start_csv, acquired)
            curve.append(accuracy)
        curves[method] = curve
        print(f"seed {seed}, {method}: " + ", ".join(f"{a:.4f}" for a in curve), flush=True)
    return curves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HYMENOPTERA)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--start", type=int, default=5, help="labelled training photos per class to start from")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # suggest names every pool photo already labelled: quiet here
    with tempfile.TemporaryDirectory() as tmp:
        results = [one_seed(args.data.resolve(), Path(tmp), seed, args.rounds, args.per_round, args.start)
                   for seed in args.seeds]
    print(f"\n| round | labelled training photos | suggest (mean of {len(results)} seeds) | random |")
    print("| --- | --- | --- | --- |")
    classes = len([c for c in (args.data / "train").iterdir() if c.is_dir()])
    for round_ in range(args.rounds + 1):
        means = [statistics.mean(r[m][round_] for r in results) for m in ("suggest", "random")]
        print(f"| {round_} | {classes * args.start + round_ * args.per_round} | {means[0]:.4f} | {means[1]:.4f} |")


if __name__ == "__main__":
    main()
