"""Start-up of ``imgtune predict RUN one.jpg``: the whole process with ``--engine onnxruntime`` (no torch,
torchvision or timm imported) against ``--engine torch``, wall time, median of --repeats runs of each,
alternated so that load on a shared machine hits both alike; the ratio printed.

The run: MobileNetV2 (offline pretrained weights, 224 px) with a linear probe trained for one epoch on
hymenoptera and exported (unless --run RUN, which must have an export); the image: one hymenoptera
val photo.

    python bench/predict_startup.py [--run RUN] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import HYMENOPTERA, child_env, warm_imports


def imgtune(*args: str) -> list[str]:
    return [sys.executable, "-m", "imgtune", *args]


def prepare_run(folder: Path) -> Path:
    run = folder / "run"
    subprocess.run(imgtune("-q", "train", str(HYMENOPTERA), "--model", "mobilenet_v2", "--offline",
                           "--strategy", "linear-probe", "--epochs", "1", "--out", str(run)),
                   env=child_env(), check=True)
    subprocess.run(imgtune("-q", "export", str(run)), env=child_env(), check=True)
    return run


def wall_time(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, env=child_env(), check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a run folder with an export (default: trained here)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    warm_imports()
    image = str(sorted((HYMENOPTERA / "val").glob("*/*.jp*g"))[0])
    with tempfile.TemporaryDirectory() as scratch:
        run = args.run or prepare_run(Path(scratch))
        times: dict[str, list[float]] = {"onnxruntime": [], "torch": []}
        for _ in range(args.repeats):
            for engine in times:
                times[engine].append(wall_time(imgtune("predict", str(run), image, "--engine", engine)))
    median = {engine: statistics.median(values) for engine, values in times.items()}
    for engine, values in times.items():
        print(f"--engine {engine:11s}: median {median[engine]:.2f} s wall (runs: "
              f"{', '.join(f'{v:.2f}' for v in values)})")
    print(f"onnxruntime / torch: {median['onnxruntime'] / median['torch']:.2f} "
          f"({median['torch'] / median['onnxruntime']:.1f}x faster start-up)")


if __name__ == "__main__":
    main()
