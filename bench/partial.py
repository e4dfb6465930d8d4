"""Partial fine-tuning on cached activations (``--unfreeze top:K``) against the full path (``--unfreeze all``),
in one invocation: ``gradual`` with default settings otherwise (``mobilenet_v2``), each a fresh process with
a fresh cache (so the activations are computed in the measured run, as a first run would).

Each run is ``--no-never-worse``: the fine-tuned model is measured, not the probe the rule may keep.
Datasets: hymenoptera (224 px photos) and scikit-learn's digits upscaled to 32 px (trained at the
default input size). Also a second run of each ``top:K`` on the warm cache (activations reused).

    python bench/partial.py [--top 3] [--per-class 25] [--epochs N] [--skip-hymenoptera] [--skip-digits]
                            [--steps-only]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from common import HYMENOPTERA, child_env, run_measured, warm_imports
from img_size import digits_tree, print_table


def train(data: Path, out: Path, cache: Path, unfreeze: str, epochs: int | None) -> dict:
    command = [sys.executable, "-m", "imgtune", "-q", "train", str(data), "--model", "mobilenet_v2", "--strategy",
               "gradual", "--unfreeze", unfreeze, "--out", str(out), "--offline", "--overwrite",
               "--no-never-worse"]  # the fine-tuned model itself, not the probe the rule may keep instead
    if epochs:
        command += ["--epochs", str(epochs)]
    seconds, _, _ = run_measured(command, child_env(IMGTUNE_CACHE=str(cache)))
    rows = (out / "metrics.csv").read_text().splitlines()
    return {"accuracy": json.loads((out / "metrics.json").read_text())["accuracy"], "seconds": seconds,
            "epochs": len(rows) - 1}


def compare(name: str, data: Path, tmp: Path, tops: list[int], epochs: int | None) -> list[dict]:
    runs = [("all", "cold")] + [(f"top:{k}", "cold") for k in tops] + [(f"top:{k}", "warm") for k in tops]
    rows = []
    for unfreeze, cache_state in runs:
        cache = tmp / f"cache-{name}-{unfreeze}"
        result = train(data, tmp / f"{name}-{unfreeze}", cache, unfreeze, epochs)
        rows.append({"dataset": name, "unfreeze": unfreeze, "cache": cache_state, **result})
        print(f"{name}, --unfreeze {unfreeze} ({cache_state} cache): val accuracy {result['accuracy']:.4f}, "
              f"{result['seconds']:.1f} s", flush=True)
    return rows


def step_seconds(top: int, size: int, batch: int = 32, steps: int = 3) -> dict:
    """Seconds per training step (forward, backward, AdamW) of the full path and of ``top:K`` on stored
    activations, and per image of computing the activations once; in this process, after one warm-up step."""
    import time

    import torch

    from imgtune import models, partial
    from imgtune.config import ModelConfig

    model = models.create(ModelConfig(name="mobilenet_v2", img_size=size), 2, offline=True).model
    images, targets = torch.randn(batch, 3, size, size), torch.arange(batch) % 2

    def timed(net, inputs) -> float:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        for i in range(steps + 1):
            if i == 1:
                start = time.perf_counter()
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(inputs), targets).backward()
            optimizer.step()
        return (time.perf_counter() - start) / steps

    model.freeze_body(False)
    model.train()
    full = timed(model, images)
    found = partial.split(model.body, top, size)
    net = partial.PartialNet(model, found)
    net.train()
    with torch.no_grad():
        start = time.perf_counter()
        stored = found.lower(images)
        lower = (time.perf_counter() - start) / batch
    return {"full": full, "partial": timed(net, stored), "lower_per_image": lower}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, nargs="+", default=[3], help="K of --unfreeze top:K (one or more)")
    parser.add_argument("--per-class", type=int, default=25, help="digits per class")
    parser.add_argument("--epochs", type=int, help="gradual's default when not given")
    parser.add_argument("--skip-hymenoptera", action="store_true")
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument("--steps-only", action="store_true", help="only the per-step times (seconds, in-process)")
    args = parser.parse_args()
    for size in (224, 96):
        for k in args.top:
            t = step_seconds(k, size)
            print(f"{size} px, batch 32, top:{k}: full step {t['full']:.3f} s, top:{k} step {t['partial']:.3f} s "
                  f"({t['partial'] / t['full']:.2f} of full); activations once {t['lower_per_image'] * 1000:.1f} ms "
                  "per image and view", flush=True)
    if args.steps_only:
        return
    warm_imports()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.skip_digits:
            rows += compare("digits 32 px", digits_tree(tmp / "digits", args.per_class), tmp, args.top,
                            args.epochs)
        if not args.skip_hymenoptera:
            rows += compare("hymenoptera", HYMENOPTERA, tmp, args.top, args.epochs)
    print_table(rows, [("--unfreeze", "unfreeze"), ("cache", "cache")], "all")


if __name__ == "__main__":
    main()
