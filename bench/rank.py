"""How well ``imgtune rank`` ranks, and how long it takes (issue 16).

On each dataset: rank every offline candidate (imgtune's own ``rank()``, a fresh feature cache), then
train each candidate with ``imgtune train`` (strategy ``gradual``) and measure it on the val split; report
the Spearman correlation of the probe's accuracies with the trained accuracies, and whether the top
pick is within 1 point of the best trained candidate. Then the wall time of ranking the four offline
models on 1,000 images with a cold and a warm feature cache.

Datasets: ``hymenoptera`` (real photos, /work/shared/datasets); ``digits``: scikit-learn's bundled scans of
handwritten digits (real, 8x8, 10 classes) upscaled to 64 px, ``--per-class`` train and half as many val
images per class; ``shapes``: generated (circles, squares, triangles, stars in random colours and sizes on
cluttered backgrounds, so only the shape tells the class; tests/plantgen.py's drawing). The 1,000-image
timing uses 100 digits per class (800 train, 200 val).

    python bench/rank.py [--epochs N] [--datasets hymenoptera,digits,shapes] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import HYMENOPTERA, ROOT

sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

OFFLINE = ("torchvision:mobilenet_v2", "timm:tf_efficientnet_lite0", "timm:tf_efficientnet_lite1",
           "timm:tf_efficientnet_lite2")


def digits_folder(root: Path, train: int, val: int) -> Path:
    """``train`` + ``val`` scans per class from scikit-learn's digits, upscaled to 64 px, as class folders."""
    from lookalike import digits

    images, labels = digits(64)
    seen: dict[str, int] = {}
    for image, label in zip(images, labels):
        n = seen.get(label, 0)
        if n >= train + val:
            continue
        split = "train" if n < train else "val"
        folder = root / split / f"digit_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        image.convert("RGB").save(folder / f"{label}_{n:04d}.png")
        seen[label] = n + 1
    return root


def shapes_folder(root: Path, train: int, val: int, seed: int = 0, sizes: tuple[int, int] = (128, 128)) -> Path:
    """Four shapes in random colours and sizes on cluttered backgrounds: only the shape tells the class.
    Each image is ``sizes[0]``-``sizes[1]`` px a side (bench/default.py: small images of 28-48 px)."""
    from plantgen import CLASSES, background, draw_object

    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        for label, (shape, _) in CLASSES.items():
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = background(rng, sizes[0] if sizes[0] == sizes[1] else int(rng.integers(sizes[0], sizes[1] + 1)))
                draw_object(image, shape, tuple(int(c) for c in rng.integers(0, 256, 3)), rng)
                image.save(folder / f"{label}_{i:03d}.png")
    return root


def ranked(data: Path, cache: Path, models=OFFLINE):
    from imgtune import config as cfg
    from imgtune.rank import RankSettings, rank

    config = cfg.resolve(cfg.build(str(data), cache_dir=str(cache), offline=True))
    started = time.perf_counter()
    result = rank(config, RankSettings(tuple(models)), progress=False)
    return result, time.perf_counter() - started


def trained_accuracy(data: Path, model: str, epochs: int | None, out: Path, cache: Path
                     ) -> tuple[float, float, str | None]:
    """Val accuracy of ``imgtune train DATA --model MODEL`` (strategy gradual; ``epochs`` None: imgtune's
    default), its wall time, and which model the never-worse rule kept (None where it did not judge)."""
    from imgtune import config as cfg
    from imgtune.training import train

    settings = {"epochs": epochs} if epochs is not None else {}
    config = cfg.build(str(data), model=model, out=str(out), offline=True, cache_dir=str(cache), **settings)
    started = time.perf_counter()
    result = train(config, progress=False)
    selection = result.metrics.get("selection") or {}
    return result.metrics["accuracy"], time.perf_counter() - started, selection.get("kept")


def evaluate_dataset(name: str, data: Path, epochs: int, work: Path) -> dict:
    from scipy.stats import spearmanr

    cache = work / f"cache-{name}"
    ranking, seconds = ranked(data, cache)
    rows = []
    for r in ranking.ranked:
        accuracy, train_s, kept = trained_accuracy(data, r.model, epochs, work / f"run-{name}-{r.model.replace(':', '-')}",
                                             cache)
        rows.append({"model": r.model, "probe_accuracy": r.accuracy, "logme": r.score, "trained_accuracy": accuracy,
                     "latency_ms_b1": r.latency_ms_b1, "train_s": train_s, "kept": kept, "img_size": r.img_size,
                     "probe_val_accuracy": r.val_accuracy})
        print(f"  {name} {r.model}: probe {r.accuracy:.4f}, trained {accuracy:.4f} ({train_s:.0f} s, kept {kept})",
              flush=True)
    probe = [row["probe_accuracy"] for row in rows]
    trained = [row["trained_accuracy"] for row in rows]
    best = max(trained)
    return {"dataset": name, "rank_s": seconds, "candidates": rows, "skipped": [s.reason for s in ranking.skipped],
            "spearman_probe": _spearman(spearmanr, probe, trained),
            "spearman_logme": _spearman(spearmanr, [row["logme"] for row in rows], trained),
            "top_pick": rows[0]["model"], "top_pick_trained": trained[0], "best_trained": best,
            "top_within_1_point": best - trained[0] <= 0.01 + 1e-12}


def _spearman(spearmanr, x, y) -> float | None:
    if len(set(x)) < 2 or len(set(y)) < 2:
        return None  # a constant list has no rank correlation
    return float(spearmanr(x, y).statistic)


def timing(work: Path) -> dict:
    """Ranking the four offline models on 1,000 images (800 train, 200 val): cold, then warm cache."""
    data = digits_folder(work / "digits-1000", 80, 20)
    cache = work / "cache-timing"
    cold, cold_s = ranked(data, cache)
    warm, warm_s = ranked(data, cache)
    same = [r.model for r in cold.ranked] == [r.model for r in warm.ranked]
    return {"images": 1000, "cold_s": cold_s, "warm_s": warm_s, "same_order": same,
            "per_model_warm_s": {r.model: r.seconds for r in warm.ranked}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="epochs of each gradual training (default: "
                        "imgtune's own)")
    parser.add_argument("--datasets", default="hymenoptera,digits,shapes")
    parser.add_argument("--per-class", type=int, default=30, help="digits and shapes: train images per class")
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="imgtune-bench-rank-"))
    folders = {"hymenoptera": lambda: HYMENOPTERA,
               "digits": lambda: digits_folder(work / "digits", args.per_class, args.per_class // 2),
               "shapes": lambda: shapes_folder(work / "shapes", args.per_class, args.per_class // 2)}
    report = {"epochs": args.epochs, "datasets": [], "timing": None}
    for name in args.datasets.split(","):  # the JSON is rewritten after each part: a stopped run keeps its results
        report["datasets"].append(evaluate_dataset(name, folders[name](), args.epochs, work))
        (work / "bench_rank.json").write_text(json.dumps(report, indent=2))
    if not args.no_timing:
        report["timing"] = timing(work)
        (work / "bench_rank.json").write_text(json.dumps(report, indent=2))
    print_report(report, work)


def print_report(report: dict, work: Path) -> None:
    print("\n| dataset | top pick | its trained acc | best trained acc | within 1 point | Spearman (probe) | "
          "Spearman (LogME) | rank time |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for d in report["datasets"]:
        show = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
        print(f"| {d['dataset']} | {d['top_pick']} | {d['top_pick_trained']:.4f} | {d['best_trained']:.4f} | "
              f"{'yes' if d['top_within_1_point'] else 'no'} | {show(d['spearman_probe'])} | "
              f"{show(d['spearman_logme'])} | {d['rank_s']:.0f} s |")
    t = report["timing"]
    if t:
        print(f"\nranking 4 models on {t['images']} images: cold cache {t['cold_s']:.0f} s, warm {t['warm_s']:.0f} s "
              f"(same order: {t['same_order']})")
    print(f"details: {work / 'bench_rank.json'}")


if __name__ == "__main__":
    main()
