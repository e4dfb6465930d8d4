"""What the imgtune command's garbage-collector settings (imgtune.allocator: young collections every 10,000
allocations, the heap frozen once the command returned) do to its wall time.

Each run is a fresh process, alternating: the ``imgtune`` console script (``imgtune.cli.run``, with the
settings) and the same command through ``imgtune.cli.main`` in a plain ``python -c`` (the reference path:
CPython's defaults; malloc is tuned in both, by ``main``). Commands: the default ``imgtune train`` on
hymenoptera with a cold cache, and ``imgtune predict RUN ONE.jpg`` on the run it made (start-up and exit
dominate). Prints each wall time, the medians and their ratio.

    python bench/collector.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import HYMENOPTERA, child_env, warm_imports

PLAIN = "import sys; from imgtune.cli import main; sys.exit(main(sys.argv[1:]))"


def timed(args: list[str], plain: bool) -> float:
    command = [sys.executable, "-c", PLAIN, *args] if plain else [str(Path(sys.executable).parent / "imgtune"), *args]
    start = time.perf_counter()
    subprocess.run(command, env=child_env(), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    warm_imports()
    work = Path(tempfile.mkdtemp(prefix="imgtune-bench-collector-"))
    image = next((HYMENOPTERA / "val" / "ants").glob("*.jpg"))
    times: dict[tuple[str, bool], list[float]] = {}
    try:
        for i in range(args.repeats):
            for plain in (False, True):
                out, cache = work / f"run-{i}-{plain}", work / f"cache-{i}-{plain}"
                train = ["-q", "train", str(HYMENOPTERA), "--out", str(out), "--cache-dir", str(cache), "--offline"]
                predict = ["-q", "predict", str(out), str(image)]
                for name, command in (("train", train), ("predict", predict)):
                    seconds = timed(command, plain)
                    times.setdefault((name, plain), []).append(seconds)
                    print(f"{name} {'main() (defaults)' if plain else 'imgtune (settings)'}: {seconds:.2f} s",
                          flush=True)
                shutil.rmtree(cache, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n| command | imgtune, settings (median s) | main(), CPython defaults (median s) | ratio |")
    print("| --- | --- | --- | --- |")
    for name in ("train", "predict"):
        tuned, plain = statistics.median(times[name, False]), statistics.median(times[name, True])
        print(f"| {name} | {tuned:.2f} | {plain:.2f} | {tuned / plain:.3f} |")


if __name__ == "__main__":
    main()
