"""Peak memory of ``imgtune train --strategy linear-probe`` on many generated images.

Writes N (default 20,000) 256x256 JPEGs of the built-in sample's shapes (three classes) once into
--images, then trains a linear probe on them with an empty cache, sampling the resident memory of the
process and all its children every 0.2 s. Prints the peak and the wall time.

    python bench/memory.py [--images /tmp/imgtune-20k] [--count 20000]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import child_env, run_measured
from imgtune.sample import SHAPES, draw_shape


def make_images(root: Path, count: int) -> None:
    def write(i: int) -> None:
        shape = SHAPES[i % len(SHAPES)]
        target = root / shape / f"{i:05d}.jpg"
        if not target.exists():
            draw_shape(shape, random.Random(i), size=256).save(target, quality=90)

    for shape in SHAPES:
        (root / shape).mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(write, range(count)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=Path(tempfile.gettempdir()) / "imgtune-20k")
    parser.add_argument("--count", type=int, default=20000)
    args = parser.parse_args()
    make_images(args.images, args.count)
    with tempfile.TemporaryDirectory() as tmp:
        seconds, peak, _ = run_measured(
            [sys.executable, "-m", "imgtune", "-q", "train", str(args.images), "--strategy", "linear-probe",
             "--out", f"{tmp}/run", "--offline"], child_env(IMGTUNE_CACHE=f"{tmp}/cache"))
    print(f"linear-probe on {args.count} images of 256x256: peak resident memory {peak / 2**30:.2f} GiB "
          f"(process and workers), {seconds:.0f} s")


if __name__ == "__main__":
    main()
