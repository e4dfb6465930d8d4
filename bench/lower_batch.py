"""The frozen lower blocks of ``--unfreeze top:3`` (mobilenet_v2, 224 px) on ONNX Runtime: milliseconds per
image at batches of 1 to 64, the same export and session imgtune's activations use (imgtune.activations.Lower).
Why imgtune runs one view per call: a view's numbers then never depend on its company, if that costs nothing.

    python bench/lower_batch.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from imgtune import activations, models
from imgtune.config import ModelConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    built = models.create(ModelConfig(name="mobilenet_v2"), 2, offline=True)
    with tempfile.TemporaryDirectory() as cache:
        options = SimpleNamespace(unfreeze_top=3, batch_size=32, cache_dir=Path(cache), feature_engine="onnxruntime")
        run = activations.Lower(built, "penultimate", options).run()
        images = torch.randn(64, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        print("batch | ms per image")
        for batch in (1, 8, 32, 64):
            chunks = [images[k:k + batch] for k in range(0, 64, batch)]
            run(chunks[0])  # warm
            start = time.perf_counter()
            for _ in range(args.repeats):
                for chunk in chunks:
                    run(chunk)
            print(f"{batch:5d} | {(time.perf_counter() - start) / (args.repeats * 64) * 1000:.2f}")


if __name__ == "__main__":
    main()
