"""Class imbalance: ``imgtune train --balance none|weights|sampler`` on one generated 20:1 dataset.

Data (generated once per invocation, the same for every run): 10 classes that differ only in the mean
hue of a shape drawn on a noisy background; the hue of each image is jittered so that neighbouring
classes on the colour wheel overlap, and the shape, its size, position and brightness are nuisances
shared by all classes. Training images fall geometrically from 200 (largest class) to 10 (smallest),
20:1, and the class sizes alternate around the wheel (a large class beside a small one), so every
confusable pair is itself imbalanced; val and test hold 30 images of every class (balanced), so
accuracy, balanced accuracy and macro F1 on them weigh every class alike.

Runs: ``imgtune train DATA --model mobilenet_v2 --img-size 128 --strategy linear-probe --offline
--balance B --seed S`` (other settings default: 8 epochs, lr 3e-3, batch 32) for B in none, weights,
sampler and each seed, each a fresh process, all the same apart from ``--balance``; the
first run of the invocation fills the feature cache the others read. Prints test (and val) macro F1,
balanced accuracy and accuracy per run, the mean over seeds of each setting and its gain over
``none``, and the test recall of every class.

    python bench/imbalance.py [--seeds 0 1 2] [--strategy linear-probe] [--keep DIR]
"""

from __future__ import annotations

import argparse
import colorsys
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from common import child_env, run_measured, warm_imports

CLASSES = 10
LARGEST, RATIO = 200, 20  # training images of the largest class; largest / smallest
EVAL_PER_CLASS = 30  # val and test, each
HUE_JITTER = 0.04  # standard deviation of an image's hue around its class's (a full turn is 1)
SIZE = 64
IMG_SIZE = 128  # model input: the images are 64 px, and 128 px features cost a third of 224 px ones
BALANCES = ("none", "weights", "sampler")
METRICS = ("macro_f1", "balanced_accuracy", "accuracy")


def train_counts() -> list[int]:
    """Class k's training images, in hue order: geometric sizes, large and small alternating."""
    sizes = [round(LARGEST * RATIO ** (-i / (CLASSES - 1))) for i in range(CLASSES)]
    return [sizes[i // 2] if i % 2 == 0 else sizes[CLASSES - 1 - i // 2] for i in range(CLASSES)]


def draw(k: int, rng: np.random.Generator) -> Image.Image:
    """A shape whose hue is class ``k``'s, jittered, on a noisy grey background."""
    hue = (k / CLASSES + rng.normal(0, HUE_JITTER)) % 1.0
    saturation, value = rng.uniform(0.45, 0.9), rng.uniform(0.55, 0.95)
    colour = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, saturation, value))
    background = rng.uniform(70, 190) + rng.normal(0, 25, (SIZE, SIZE, 1)) + rng.normal(0, 10, (SIZE, SIZE, 3))
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    canvas = ImageDraw.Draw(image)
    radius = SIZE * rng.uniform(0.15, 0.35)
    cx, cy = rng.uniform(radius, SIZE - radius, 2)
    shape = rng.integers(3)
    if shape == 0:
        canvas.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
    elif shape == 1:
        canvas.rectangle([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
    else:
        canvas.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour)
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 12, (SIZE, SIZE, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def make_dataset(root: Path, seed: int) -> dict[str, list[int]]:
    rng = np.random.default_rng(seed)
    counts = {"train": train_counts(), "val": [EVAL_PER_CLASS] * CLASSES, "test": [EVAL_PER_CLASS] * CLASSES}
    for split, per_class in counts.items():
        for k, count in enumerate(per_class):
            folder = root / split / f"hue{k:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                draw(k, rng).save(folder / f"{split}_{k:02d}_{i:03d}.png")
    return counts


def run_imgtune(data: Path, out: Path, cache: Path, strategy: str, balance: str, seed: int) -> dict:
    command = [sys.executable, "-m", "imgtune", "-q", "train", str(data), "--model", "mobilenet_v2",
               "--img-size", str(IMG_SIZE), "--strategy", strategy, "--balance", balance, "--seed", str(seed),
               "--offline", "--out", str(out)]
    seconds, _, _ = run_measured(command, child_env(IMGTUNE_CACHE=str(cache)))
    metrics = json.loads((out / "metrics.json").read_text())
    return {"seconds": seconds, "val": {m: metrics[m] for m in METRICS},
            "test": {m: metrics["test"][m] for m in METRICS},
            "recall": {name: row["recall"] for name, row in metrics["test"]["per_class"].items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--strategy", default="linear-probe", choices=["linear-probe", "gradual", "finetune"])
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the generated images")
    parser.add_argument("--keep", type=Path, help="write data and run folders here instead of a temporary folder")
    args = parser.parse_args()
    warm_imports()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        counts = make_dataset(work / "data", args.data_seed)
        print(f"train images per class (hue order): {counts['train']} (total {sum(counts['train'])}); "
              f"val and test: {EVAL_PER_CLASS} per class", flush=True)
        results: dict[str, list[dict]] = {b: [] for b in BALANCES}
        for seed in args.seeds:
            for balance in BALANCES:
                row = run_imgtune(work / "data", work / "runs" / f"{balance}-{seed}", work / "cache",
                                  args.strategy, balance, seed)
                results[balance].append(row)
                print(f"{balance:8s} seed {seed}: " + ", ".join(
                    f"{split} {m} {row[split][m]:.3f}" for split in ("test", "val") for m in METRICS)
                    + f" ({row['seconds']:.0f} s)", flush=True)
    print_tables(results, args.seeds)
    print_recall(results, counts["train"])


def print_tables(results: dict[str, list[dict]], seeds: list[int]) -> None:
    for split in ("test", "val"):
        print(f"\n{split} ({EVAL_PER_CLASS} per class), per seed ({', '.join(map(str, seeds))}) and mean; "
              "gain: mean minus none's mean")
        print("| --balance | " + " | ".join(m.replace("_", " ") for m in METRICS) + " | " +
              " | ".join(f"gain {m.replace('_', ' ')}" for m in METRICS) + " |")
        print("| --- " * (1 + 2 * len(METRICS)) + "|")
        base = {m: statistics.mean(r[split][m] for r in results["none"]) for m in METRICS}
        for balance, rows in results.items():
            cells, gains = [], []
            for m in METRICS:
                values = [r[split][m] for r in rows]
                mean = statistics.mean(values)
                cells.append(" / ".join(f"{v:.3f}" for v in values) + f" (**{mean:.3f}**)")
                gains.append(f"{mean - base[m]:+.3f}")
            print(f"| {balance} | " + " | ".join(cells) + " | " + " | ".join(gains) + " |")


def print_recall(results: dict[str, list[dict]], train_counts: list[int]) -> None:
    """Where the gain comes from: test recall of each class, smallest classes first."""
    print("\ntest recall per class (mean over seeds), classes from the smallest")
    print("| class | training images | " + " | ".join(BALANCES) + " |")
    print("| --- " * (2 + len(BALANCES)) + "|")
    for k in sorted(range(CLASSES), key=lambda k: train_counts[k]):
        name = f"hue{k:02d}"
        recalls = [statistics.mean(r["recall"][name] for r in results[b]) for b in BALANCES]
        print(f"| {name} | {train_counts[k]} | " + " | ".join(f"{v:.2f}" for v in recalls) + " |")


if __name__ == "__main__":
    main()
