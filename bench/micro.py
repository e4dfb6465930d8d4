"""Micro-benchmarks behind imgtune's speed settings, on torchvision mobilenet_v2, batch 32, 224 px, CPU:
channels_last against the default layout, and torch.compile against eager (including compile time,
which is what a short run pays). Each measurement is the best of a few repeats, in one process.

    python bench/micro.py [--repeats 3] [--compile]
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def step_fns(model: torch.nn.Module, x: torch.Tensor):
    def train_step():
        model.train()
        model(x).sum().backward()

    def eval_step():
        model.eval()
        with torch.inference_mode():
            model(x)

    return train_step, eval_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (slow to compile)")
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(32, 3, 224, 224)
    results = {}
    plain = torchvision.models.mobilenet_v2()
    results["default layout"] = [best_of(f, args.repeats) for f in step_fns(plain, x)]
    last = torchvision.models.mobilenet_v2().to(memory_format=torch.channels_last)
    results["channels_last"] = [best_of(f, args.repeats) for f in step_fns(last, x.contiguous(
        memory_format=torch.channels_last))]
    if args.compile:
        compiled = torch.compile(torchvision.models.mobilenet_v2().to(memory_format=torch.channels_last))
        xc = x.contiguous(memory_format=torch.channels_last)
        start = time.perf_counter()
        for f in step_fns(compiled, xc):
            f()
        results["compile time (both modes)"] = [time.perf_counter() - start, 0.0]
        results["channels_last + compile"] = [best_of(f, args.repeats) for f in step_fns(compiled, xc)]
    base = results["default layout"]
    print("| setting | train step (s) | eval step (s) | train / default | eval / default |")
    print("| --- | --- | --- | --- | --- |")
    for name, (train_s, eval_s) in results.items():
        print(f"| {name} | {train_s:.2f} | {eval_s:.2f} | {train_s / base[0]:.2f} | "
              f"{(eval_s / base[1]) if eval_s else float('nan'):.2f} |")


if __name__ == "__main__":
    main()
