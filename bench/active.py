"""Active learning: does ``imgtune suggest`` pick images worth labelling, and which strategy?

Per dataset and seed: start from ``--start`` labelled training images per class (a seeded draw; the rest
of the training split is the unlabelled pool, the whole val split measures); then ``--rounds`` rounds,
each adding ``--per-round`` images with their true labels, chosen by each ``imgtune suggest`` strategy
(``imgtune.suggest.choose``, the ranking ``imgtune suggest`` runs, on the previous round's run) or at
random from the pool. Every round trains ``imgtune train CSV --strategy linear-probe --extra-labels
ACQUIRED.csv`` (defaults otherwise: mobilenet_v2, offline weights, the head fitted to convergence) through
the Python API in this process with one shared feature cache. The pool's features are extracted once per
dataset with the run's model: a linear probe leaves the body frozen, so every round's run has the same
body and only its head (read from the round's run folder, with its temperature) changes.

Datasets: ``hymenoptera`` (/work/shared/datasets, 2 classes, 245 training photos, 153 val); ``digits``:
scikit-learn's scans of handwritten digits upscaled to 64 px (bench/rank.py ``digits_folder``), 10
classes, ``--digits-train`` train and ``--digits-val`` val images per class.

Prints val accuracy per round: per seed, then the mean of the seeds per strategy, and the rounds at
which each strategy's mean beats random's.

    python bench/active.py [--datasets hymenoptera,digits] [--seeds 0 1 2] [--rounds 5] [--start 5]
                           [--per-round hymenoptera=10,digits=20] [--strategies diverse,typical,badge,hybrid]
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

import numpy as np
import torch

from common import HYMENOPTERA, ROOT
from rank import digits_folder

sys.path.insert(0, str(ROOT / "src"))

import imgtune  # noqa: E402
from imgtune import artifact, features, suggest  # noqa: E402
from imgtune.data.unlabelled import unlabelled_images  # noqa: E402
from imgtune.inference import select_device  # noqa: E402


def write_csv(path: Path, rows: list[tuple[Path, str, str]]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split"])
        writer.writerows([str(p), label, split] for p, label, split in rows)
    return path


def train(tmp: Path, name: str, start: Path, acquired: list[int], pool) -> tuple[Path, float]:
    rows = [(pool.samples[i].path, pool.labels[i], "train") for i in acquired]
    extra = str(write_csv(tmp / f"{name}-extra.csv", rows)) if rows else None
    result = imgtune.train(start, model="mobilenet_v2", strategy="linear-probe", offline=True, overwrite=True,
                           out=str(tmp / name), extra_labels=extra, allow_outside_paths=True,
                           cache_dir=str(tmp / "cache"), progress=False)
    return result.run_dir, result.metrics["accuracy"]


class Pool:
    """The training split's images, their true labels, and their features under the runs' frozen body."""

    def __init__(self, data: Path):
        self.samples = sorted(unlabelled_images(data / "train"), key=lambda s: str(s.path))
        self.labels = [s.path.parent.name for s in self.samples]
        self.vectors: np.ndarray | None = None

    def extract(self, run: Path) -> None:
        info = artifact.read_run(run)
        built, _ = suggest._model(info)
        found = features.extract(built, self.samples, info.classes, None, select_device("auto"), 32, 0)
        assert len(found.positions) == len(self.samples), "every training image should load"
        self.vectors = found.features.numpy()


def pick(method: str, run: Path, pool: Pool, taken: list[int], n: int, rng: random.Random) -> list[int]:
    free = [i for i in range(len(pool.samples)) if i not in set(taken)]
    if method == "random":
        return rng.sample(free, n)
    info = artifact.read_run(run)
    method = suggest.concrete(method, len(taken), len(info.classes))
    built, temperature = suggest._model(info)
    probs = suggest._probabilities(built.model.head, torch.from_numpy(pool.vectors[free]), temperature)
    chosen = suggest.choose([pool.samples[i] for i in free], probs, pool.vectors[free], pool.vectors[taken],
                            info.classes, n, method)
    where = {pool.samples[i].path: i for i in free}
    return [where[c.path] for c in chosen]


def one_seed(data: Path, pool: Pool, tmp: Path, seed: int, methods: list[str], args, per_round: int) -> dict:
    rng = random.Random(seed)
    by_class: dict[str, list[int]] = {}
    for i, label in enumerate(pool.labels):
        by_class.setdefault(label, []).append(i)
    start = [i for items in by_class.values() for i in rng.sample(items, args.start)]
    val = [(s.path, s.path.parent.name, "val") for s in sorted(unlabelled_images(data / "val"), key=lambda s: str(s.path))]
    start_csv = write_csv(tmp / f"start-{seed}.csv", [(pool.samples[i].path, pool.labels[i], "train") for i in start] + val)
    first_run, first = train(tmp, f"start-{seed}", start_csv, [], pool)
    if pool.vectors is None:
        pool.extract(first_run)
    curves = {}
    for method in methods:
        picker, acquired, run, curve = random.Random(seed + 10_000), [], first_run, [first]
        for round_ in range(1, args.rounds + 1):
            acquired += pick(method, run, pool, start + acquired, per_round, picker)
            run, accuracy = train(tmp, f"{method}-{seed}-{round_}", start_csv, acquired, pool)
            curve.append(accuracy)
        curves[method] = curve
        print(f"{data.name} seed {seed}, {method}: " + ", ".join(f"{a:.4f}" for a in curve), flush=True)
    return curves


def table(name: str, results: list[dict], methods: list[str], start: int, per_round: int, classes: int) -> None:
    means = {m: [statistics.mean(r[m][k] for r in results) for k in range(len(results[0][m]))] for m in methods}
    print(f"\n{name}: val accuracy, mean of {len(results)} seeds")
    print("| round | labelled | " + " | ".join(methods) + " |")
    print("|" + " --- |" * (len(methods) + 2))
    for k in range(len(means[methods[0]])):
        print(f"| {k} | {classes * start + k * per_round} | " + " | ".join(f"{means[m][k]:.4f}" for m in methods) + " |")
    for m in methods[1:]:
        wins = [k for k in range(1, len(means[m])) if means[m][k] > means["random"][k]]
        print(f"{name} {m}: beats random at rounds {wins or 'none'}; at rounds 2-5: "
              f"{all(k in wins for k in range(2, len(means[m])))}")


def dataset(name: str, work: Path, args) -> Path:
    if name == "hymenoptera":
        return HYMENOPTERA.resolve()
    return digits_folder(work / "digits", args.digits_train, args.digits_val).resolve()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="hymenoptera,digits")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", default="hymenoptera=10,digits=20")
    parser.add_argument("--start", type=int, default=5, help="labelled training images per class to start from")
    parser.add_argument("--strategies", default="diverse,typical,badge,hybrid")
    parser.add_argument("--digits-train", type=int, default=100)
    parser.add_argument("--digits-val", type=int, default=50)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    per_round = {k: int(v) for k, v in (item.split("=") for item in args.per_round.split(","))}
    methods = ["random", *args.strategies.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets.split(","):
            work = Path(tmp) / name
            work.mkdir()
            data = dataset(name, work, args)
            pool = Pool(data)
            results = [one_seed(data, pool, work, seed, methods, args, per_round[name]) for seed in args.seeds]
            table(name, results, methods, args.start, per_round[name], len(set(pool.labels)))


if __name__ == "__main__":
    main()
