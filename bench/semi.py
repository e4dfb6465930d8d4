"""Semi-supervised training: do the unlabelled images help (``imgtune train DATA --unlabeled DIR``)?

For each dataset and seed: ``--labelled`` training images per class are labelled (a seeded draw), the rest of
the training split is a folder of unlabelled images, and the whole val split measures. Four runs, each
``imgtune train CSV --strategy linear-probe`` (mobilenet_v2, offline weights, the head fitted to
convergence; defaults otherwise) through the Python API in this process, one feature cache shared:

- supervised-only: the labelled images alone;
- label-spreading: ``--unlabeled DIR --semi label-spreading``;
- self-training: ``--unlabeled DIR --semi self-training``;
- fully supervised: every training image labelled (once per dataset; it does not depend on the seed).

Prints val accuracy per seed and the mean, the share of the gap between supervised-only and fully
supervised that each semi-supervised method closes, and its worst drop below supervised-only.

Datasets: ``hymenoptera`` (/work/shared/datasets; 245 train, 153 val photos, two classes) and ``digits``
(scikit-learn's scans of handwritten digits upscaled to 64 px, 10 classes, ``--digits-train`` train and
``--digits-val`` val scans per class; bench/rank.py's ``digits_folder``).

    python bench/semi.py [--datasets hymenoptera digits] [--seeds 0 1 2] [--labelled 10]
"""

from __future__ import annotations

import argparse
import logging
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import HYMENOPTERA, ROOT

sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

import imgtune  # noqa: E402
from active import photos, write_csv  # noqa: E402  (the same CSVs of photos as the active-learning bench)
from rank import digits_folder  # noqa: E402

METHODS = ("supervised-only", "label-spreading", "self-training")


def draw(data: Path, tmp: Path, seed: int, per_class: int) -> tuple[Path, Path]:
    """The CSV of ``per_class`` labelled training images a class + val, and a folder of the other
    training images (copies without their class folders: nothing tells their label)."""
    rng = random.Random(seed)
    train = photos(data / "train")
    by_class: dict[str, list] = {}
    for item in train:
        by_class.setdefault(item[1], []).append(item)
    labelled = [item for items in by_class.values() for item in rng.sample(items, per_class)]
    chosen = {p for p, _ in labelled}
    pool = tmp / f"unlabelled-{seed}"
    pool.mkdir()
    for i, (path, _) in enumerate(p for p in train if p[0] not in chosen):
        shutil.copy(path, pool / f"{i:05d}{path.suffix.lower()}")
    rows = [(p, c, "train") for p, c in labelled] + [(p, c, "val") for p, c in photos(data / "val")]
    return write_csv(tmp / f"labelled-{seed}.csv", rows), pool


def train(source: Path, out: Path, cache: Path, **options) -> dict:
    started = time.perf_counter()
    result = imgtune.train(source, model="mobilenet_v2", strategy="linear-probe", offline=True, overwrite=True,
                           out=str(out), allow_outside_paths=True, cache_dir=str(cache), progress=False, **options)
    semi = result.metrics.get("semi") or {}
    return {"accuracy": result.metrics["accuracy"], "seconds": time.perf_counter() - started,
            "used": semi.get("used"), "pseudo": semi.get("pseudo_labels_total"),
            "precision": (semi.get("estimated_precision") or {}).get("overall")}


def one_dataset(name: str, data: Path, tmp: Path, seeds: list[int], per_class: int) -> dict:
    cache = tmp / "cache"
    full = train(write_csv(tmp / "full.csv", [(p, c, "train") for p, c in photos(data / "train")] +
                           [(p, c, "val") for p, c in photos(data / "val")]), tmp / "full", cache)
    print(f"{name}, fully supervised: {full['accuracy']:.4f} ({full['seconds']:.0f} s)", flush=True)
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    for seed in seeds:
        labelled, pool = draw(data, tmp, seed, per_class)
        for method in METHODS:
            extra = {} if method == "supervised-only" else {"unlabeled": str(pool), "semi": method}
            result = train(labelled, tmp / f"{method}-{seed}", cache, seed=seed, **extra)
            runs[method].append(result)
            used = f", used {result['used']}: {result['pseudo']} pseudo-labels, estimated precision " \
                   f"{result['precision']}" if result["used"] else ""
            print(f"{name}, seed {seed}, {method}: {result['accuracy']:.4f} ({result['seconds']:.0f} s{used})",
                  flush=True)
    return {"full": full["accuracy"], "runs": runs}


def table(name: str, found: dict, seeds: list[int]) -> None:
    runs, full = found["runs"], found["full"]
    base = [r["accuracy"] for r in runs["supervised-only"]]
    print(f"\n{name}: val accuracy (fully supervised {full:.4f})")
    print("| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | gap closed | worst vs supervised-only |")
    print("| --- |" + " --- |" * (len(seeds) + 3))
    for method in METHODS:
        values = [r["accuracy"] for r in runs[method]]
        mean, gap = statistics.mean(values), full - statistics.mean(base)
        closed = f"{(mean - statistics.mean(base)) / gap:.0%}" if gap > 0 else "no gap"
        worst = min(v - b for v, b in zip(values, base)) * 100
        print(f"| {method} | " + " | ".join(f"{v:.4f}" for v in values) + f" | {mean:.4f} | "
              f"{closed if method != 'supervised-only' else ''} | "
              f"{f'{worst:+.2f} points' if method != 'supervised-only' else ''} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["hymenoptera", "digits"], choices=["hymenoptera", "digits"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--labelled", type=int, default=10, help="labelled training images per class")
    parser.add_argument("--digits-train", type=int, default=60)
    parser.add_argument("--digits-val", type=int, default=40)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.datasets:
            work = tmp / name
            work.mkdir()
            data = HYMENOPTERA if name == "hymenoptera" else \
                digits_folder(work / "data", args.digits_train, args.digits_val)
            results[name] = one_dataset(name, data.resolve(), work, args.seeds, args.labelled)
    for name, found in results.items():
        table(name, found, args.seeds)


if __name__ == "__main__":
    main()
