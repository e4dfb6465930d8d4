"""What the reliability checks cost (docs/reliability.md), each against the path without the check,
in one run:

- reading 2,000 cached MobileNetV2 feature vectors: checked entries (format 2: header, CRC-32,
  finite values) against bare ``np.load`` of ``.npy`` files (format 1);
- the SHA-256 of a mobilenet_v2 ``model.safetensors``, checked on every load, against the load itself;
- the per-file content list of a run (resume's data check) for 100,000 samples: time and bytes per image.

    python bench/reliability_costs.py
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from imgtune.cache import Expect, file_sha256, read_entry, write_entry  # noqa: E402


def median_seconds(function, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def feature_reads(folder: Path, count: int = 2000) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    expect = Expect("float32", (1280,))
    for i in range(count):
        vector = rng.standard_normal(1280).astype(np.float32)
        write_entry(folder / f"{i}.arr", vector)
        np.save(folder / f"{i}.npy", vector, allow_pickle=False)
    checked = median_seconds(lambda: [read_entry(folder / f"{i}.arr", expect) for i in range(count)])
    bare = median_seconds(lambda: [np.load(folder / f"{i}.npy", allow_pickle=False) for i in range(count)])
    return checked, bare


def weights_hash(folder: Path) -> tuple[float, float, int]:
    from safetensors.torch import load_model, save_model

    from imgtune import models
    from imgtune.config import ModelConfig

    model = models.create(ModelConfig(name="mobilenet_v2"), 2, offline=True).model
    path = folder / "model.safetensors"
    save_model(model, str(path))
    hashing = median_seconds(lambda: file_sha256(path, {}))  # a fresh memo: hashed every time
    loading = median_seconds(lambda: load_model(model, str(path)))
    return hashing, loading, path.stat().st_size


def content_list(count: int = 100_000) -> tuple[float, float]:
    from imgtune.data.content import encode_files, folder_files, split_digests
    from imgtune.data.scan import Sample

    root, rng = Path("/data"), np.random.default_rng(0)
    digests = [bytes(rng.integers(0, 256, 16, dtype=np.uint8)).hex() for _ in range(count)]  # as random as real ones
    samples = [Sample(root / f"class{i % 10}" / f"img_{i:06d}.jpg", f"class{i % 10}",
                      "train" if i % 5 else "val", digests[i]) for i in range(count)]
    started = time.perf_counter()
    files = folder_files(samples, str(root))
    split_digests(files)
    size = len(encode_files(files))
    return time.perf_counter() - started, size / count


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        checked, bare = feature_reads(Path(tmp))
        hashing, loading, size = weights_hash(Path(tmp))
    seconds, per_image = content_list()
    print("| check | with it | without | ratio |")
    print("| --- | --- | --- | --- |")
    print(f"| read 2,000 feature vectors (checked .arr vs np.load .npy) | {checked * 1e3:.0f} ms | "
          f"{bare * 1e3:.0f} ms | {checked / bare:.2f} |")
    print(f"| SHA-256 of model.safetensors ({size / 2**20:.1f} MiB) vs loading it | {hashing * 1e3:.0f} ms | "
          f"{loading * 1e3:.0f} ms (load) | {hashing / loading:.2f} |")
    print(f"| content list of 100,000 samples (resume's data check) | {seconds:.2f} s | - | "
          f"{per_image:.1f} bytes/image gzipped |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
