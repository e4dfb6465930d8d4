"""The training extras (issue 13 part 5) against today's ``gradual``, in one invocation, each run a fresh
process: ``--ema``, ``--mixup``, ``--lr auto``, and flip TTA at evaluation (``evaluate --tta`` on the
plain run), on hymenoptera and on scikit-learn's digits (upscaled to 64 px, as bench/rank.py).

Every variant is ``imgtune train DATA --model mobilenet_v2 --no-never-worse`` (``gradual``; without the
never-worse rule, which would often keep the probe and hide what the extra did to the fine-tuned
model) plus its flag, all at one input size per dataset (``--size``, ``--digits-size``; the input-size rule is another
part of issue 13): on a loaded machine, a smaller size keeps the unfrozen epochs affordable. A
linear-probe run first fills each dataset's feature cache, so every variant starts from the same warm
cache and the times compare.

    python bench/extras.py [--data DIR] [--seeds 0 1] [--size 224] [--digits-per-class 140] [--digits-size 96]
                           [--skip hymenoptera digits]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from common import HYMENOPTERA, child_env, run_measured, warm_imports

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # lookalike.digits for digits_folder

VARIANTS = {
    "gradual (today)": [],
    "--ema 0.999": ["--ema", "0.999"],
    "--mixup 0.4": ["--mixup", "0.4"],
    "--cutmix 1.0": ["--cutmix", "1.0"],
    "--lr auto": ["--lr", "auto"],
}


def imgtune(args: list[str], cache: Path) -> tuple[float, str]:
    seconds, _, result = run_measured([sys.executable, "-m", "imgtune", "-q", *args],
                                      child_env(IMGTUNE_CACHE=str(cache)))
    return seconds, result.stdout


def train(data: Path, out: Path, cache: Path, extra: list[str]) -> dict:
    seconds, _ = imgtune(["train", str(data), "--model", "mobilenet_v2", "--out", str(out), "--offline",
                          "--overwrite", *extra], cache)
    metrics = json.loads((out / "metrics.json").read_text())
    config = (out / "config.yaml").read_text()
    lr = next(line.split(":", 1)[1].strip() for line in config.splitlines() if line.strip().startswith("lr:"))
    return {"accuracy": metrics["accuracy"], "seconds": seconds, "lr": lr}


def evaluate(run: Path, cache: Path, tta: bool) -> dict:
    seconds, stdout = imgtune(["evaluate", str(run), "--engine", "torch", "--format", "json",
                               *(["--tta"] if tta else [])], cache)
    return {"accuracy": json.loads(stdout)["accuracy"], "seconds": seconds}


def bench_dataset(name: str, data: Path, tmp: Path, seed: int, extra: list[str]) -> list[tuple]:
    cache = tmp / f"cache-{name}"
    common = ["--seed", str(seed), "--no-never-worse", *extra]
    imgtune(["train", str(data), "--model", "mobilenet_v2", "--strategy", "linear-probe", "--offline",
             "--out", str(tmp / f"warm-{name}"), *common], cache)
    rows = []
    for variant, flags in VARIANTS.items():
        out = tmp / f"{name}-{len(rows)}"
        result = train(data, out, cache, [*common, *flags])
        rows.append((name, variant, result["accuracy"], result["seconds"], result["lr"]))
        print(f"{name}, {variant}: val accuracy {result['accuracy']:.4f}, {result['seconds']:.1f} s, "
              f"lr {result['lr']}", flush=True)
        if not flags:
            for tta in (False, True):
                found = evaluate(out, cache, tta)
                label = "evaluate --tta" if tta else "evaluate"
                rows.append((name, f"{variant}, {label}", found["accuracy"], found["seconds"], "-"))
                print(f"{name}, {variant}, {label}: val accuracy {found['accuracy']:.4f}, "
                      f"{found['seconds']:.1f} s", flush=True)
    return rows


def main() -> None:
    from rank import digits_folder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HYMENOPTERA)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--skip", nargs="*", default=[], choices=("hymenoptera", "digits"))
    parser.add_argument("--size", type=int, help="hymenoptera's --img-size (default: the model's, 224)")
    parser.add_argument("--digits-per-class", type=int, default=140, help="training scans per digit (val: 38)")
    parser.add_argument("--digits-size", type=int, default=96)
    args = parser.parse_args()
    warm_imports()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        digits = digits_folder(tmp / "digits", train=args.digits_per_class, val=38) \
            if "digits" not in args.skip else None
        for seed in args.seeds:
            if "hymenoptera" not in args.skip:
                size = ["--img-size", str(args.size)] if args.size else []
                rows += bench_dataset(f"hymenoptera at {args.size or 224} px, seed {seed}", args.data.resolve(), tmp,
                                      seed, size)
            if digits is not None:
                rows += bench_dataset(f"digits ({10 * args.digits_per_class} train) at {args.digits_size} px, seed "
                                      f"{seed}", digits, tmp, seed, ["--img-size", str(args.digits_size)])
    print("\n| data | variant | val accuracy | wall s | lr |")
    print("| --- | --- | --- | --- | --- |")
    for name, variant, accuracy, seconds, lr in rows:
        print(f"| {name} | {variant} | {accuracy:.4f} | {seconds:.1f} | {lr} |")


if __name__ == "__main__":
    main()
