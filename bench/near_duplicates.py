"""Near-duplicate check: false alarms on distinct images of one kind, and recall on planted copies.

Before = the perceptual hash alone (``fingerprint._hash_pairs``, what ``near_pairs`` was until issue
12); after = hash candidates confirmed by the pixel check (``pixelcheck.py``). One run prints both.

False alarms (every reported pair is false: the images are distinct), each set written as a class
folder tree and split as ``imgtune train`` splits it (``load_splits``: 20% val, seed 0):
- digits: scikit-learn's 1,797 bundled 8x8 digit scans, upscaled to 32x32 PNG, one class per digit;
- xray: --count generated chest-X-ray-like 64x64 grey images in one pose (tests/lookalike.py);
- sign: --count generated 48x48 "no entry" signs on varied backgrounds (tests/lookalike.py).
Printed: pairs across splits (the warnings ``train`` gives) and all pairs (what ``doctor`` groups),
and the seconds the pair search took.

Recall: tests/plantgen.py's planted dataset (``make_planted``: 4 near-duplicates across splits), and
--photos photo-like images at 64, 160 and 256 px, each with its four ``near_variants`` (half size,
JPEG q70, 10% crop, brightness +10%), the two crops of tests/test_duplicates.py and one random crop
keeping 90-100% of each side at a random offset: found / planted, per kind.

    python bench/near_duplicates.py [--count 2000] [--photos 30]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import ROOT

sys.path.insert(0, str(ROOT / "tests"))
import lookalike  # noqa: E402
import plantgen  # noqa: E402
from imgtune.data import fingerprint as fp  # noqa: E402
from imgtune.data.duplicates import leaks_into, near_groups  # noqa: E402
from imgtune.data.scan import load_splits  # noqa: E402


def hash_only(prints: fp.Prints, queries: fp.Prints | None = None) -> list:
    same = queries is None
    return fp._hash_pairs(prints.hashes, (prints if same else queries).hashes, same, 64)


def false_alarms(name: str, images, labels) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        lookalike.write_tree(Path(tmp), images, labels)
        splits = load_splits(tmp, val_fraction=0.2, seed=0, progress=False)
    train = [s for s in splits.samples if s.split == "train"]
    held = [s for s in splits.samples if s.split != "train"]
    prints, queries = fp.stack([s.fingerprint for s in train]), fp.stack([s.fingerprint for s in held])
    every = fp.stack([s.fingerprint for s in splits.samples])
    start = time.perf_counter()
    before_across, before_all = len(hash_only(prints, queries)), len(hash_only(every))
    hash_seconds = time.perf_counter() - start
    start = time.perf_counter()
    after_across = len(leaks_into(train, held))
    after_all = sum(len(g.members) - 1 for g in near_groups(splits.samples))
    seconds = time.perf_counter() - start
    print(f"{name:<7} {len(splits.samples):>6} {before_across:>14} {after_across:>13} {before_all:>11} "
          f"{after_all:>10} {hash_seconds:>9.1f} {seconds:>9.1f}")


def random_crop(image, rng):
    w, h = image.size
    fw, fh = rng.uniform(0.9, 1.0, 2)
    x, y = rng.uniform(0, 1 - fw) * w, rng.uniform(0, 1 - fh) * h
    return image.crop((round(x), round(y), round(x + fw * w), round(y + fh * h)))


def variants(image, rng) -> dict:
    w, h = image.size
    return {**plantgen.near_variants(image),
            "offset-crop-10%": image.crop((int(w * 0.1), int(h * 0.1), w, h)),
            "centre-crop-5%": image.crop((round(w * 0.05), round(h * 0.05), round(w * 0.95), round(h * 0.95))),
            "random-crop-90-100%": random_crop(image, rng)}


def recall(photos: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        plan = plantgen.make_planted(Path(tmp) / "data", seed=0)
        splits = load_splits(plan.root, val_fraction=0.2, seed=0, progress=False)
        pairs = {(str(a.path.relative_to(plan.root)), str(b.path.relative_to(plan.root)))
                 for b, a, _ in leaks_into(splits.split("train"), splits.split("val"))}
    found = sum(pair in pairs for pair in plan.near_leaks.values())
    print(f"plantgen make_planted: {found}/{len(plan.near_leaks)} planted near-duplicates across splits found "
          f"({len(pairs) - found} other pairs reported)")
    print(f"\n{'size':>4} {'kind':<20} {'before':>7} {'after':>7}")
    for size in (64, 160, 256):
        rng = np.random.default_rng(size)
        counts: dict[str, list[int]] = {}
        for i in range(photos):
            original = plantgen.make_image(list(plantgen.CLASSES)[i % 4], rng, size)
            for kind, variant in variants(original, rng).items():
                two = fp.stack([fp.fingerprint(original), fp.fingerprint(variant)])
                hit = counts.setdefault(kind, [0, 0])
                hit[0] += len(hash_only(two)) == 1
                hit[1] += len(fp.near_pairs(two)) == 1
        for kind, (before, after) in counts.items():
            print(f"{size:>4} {kind:<20} {before:>4}/{photos} {after:>4}/{photos}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000, help="images in each generated look-alike set")
    parser.add_argument("--photos", type=int, default=30, help="originals per size for the recall check")
    args = parser.parse_args()
    print("False alarms (every pair reported is a false alarm)")
    print(f"{'set':<7} {'images':>6} {'across before':>14} {'across after':>13} {'all before':>11} "
          f"{'all after':>10} {'hash s':>9} {'check s':>9}")
    false_alarms("digits", *lookalike.digits())
    for kind in ("xray", "sign"):
        false_alarms(kind, *lookalike.generated(kind, args.count))
    print("\nRecall (planted near-duplicates found)")
    recall(args.photos)


if __name__ == "__main__":
    main()
