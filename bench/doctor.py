"""``imgtune doctor --no-labels`` on 20,000 photo-like images, against a plain imagehash loop.

Data (generated once into --images and reused while its ``plan.json`` matches): 256x256 JPEGs
(quality 90) of the four classes of ``tests/plantgen.py`` (a shape on a busy random background), in
split folders, 80% train / 20% val, plus planted copies of train images in val (across splits, same
class): 20 exact copies and 20 of each near-duplicate kind of ``plantgen.near_variants`` (half size,
JPEG q70, 10% crop, brightness +10%); 100 planted pairs, ``--count`` files in all.

Runs, in one invocation so the times compare:
1. ``imgtune doctor DATA --no-labels`` on all of it (the real CLI in a fresh process, started as
   ``python -m imgtune`` is but with a clock around its imports): wall time, the stages from
   doctor.json's ``seconds``, images/s, which progress bars were drawn, planted pairs found per kind
   and other pairs reported (a few printed with their distances, to be looked at).
2. On a --subset of the files (all planted pairs plus random others, hard-linked into a copy of the
   layout): the same command, and the plain approach a user would write, in this process: for each
   file ``Image.open(p).load()`` and ``imagehash.phash``, then all pairs by Hamming distance in numpy
   (near when at most --ref-bits of 64 differ). Prints the time ratio, each side's recall, and the
   plain approach extrapolated to --count files (read+hash linear, pairs quadratic; labelled so).
3. Single-thread cost per image of decoding alone, decoding + imgtune's fingerprint, and the plain
   path, on 300 files: where the file-reading stage's time goes.
4. With --labels: the full doctor (label errors included) on the subset, cold feature cache, --offline.

    python bench/doctor.py [--images /tmp/imgtune-doctor-20k] [--count 20000] [--subset 2000] [--labels]
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import random
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from common import ROOT, child_env, run_measured

sys.path.insert(0, str(ROOT / "tests"))
from plantgen import CLASSES, make_image, near_variants  # noqa: E402

SIZE, QUALITY, SEED = 256, 90, 0
KINDS = ("exact", "half-size", "jpeg-q70", "crop-10%", "brightness+10%")
PER_KIND = 20
VAL_FRACTION = 0.2
# `python -m imgtune` (imgtune/__main__.py) with a clock around the imports that `imgtune doctor` needs
CLI = """import sys, time
start = time.perf_counter()
from imgtune.cli import main
import imgtune.doctor, imgtune.doctor.render
print(f"IMPORTS {time.perf_counter() - start:.3f}", file=sys.stderr)
raise SystemExit(main(sys.argv[1:]))"""


# ---------------------------------------------------------------- data

def _write_clean(job: tuple[str, str, int, int]) -> None:
    root, split, label_index, i = job
    label = list(CLASSES)[label_index]
    target = Path(root) / split / label / f"{label}_{split}_{i:05d}.jpg"
    if not target.exists():
        rng = np.random.default_rng([SEED, ("train", "val").index(split), label_index, i])
        make_image(label, rng, SIZE).save(target, quality=QUALITY)


def _clean_jobs(root: Path, count: int) -> list[tuple[str, str, int, int]]:
    clean = count - len(KINDS) * PER_KIND
    per_class = clean // len(CLASSES)
    n_train = round(per_class * (1 - VAL_FRACTION))
    return [(str(root), split, c, i) for c in range(len(CLASSES))
            for split, n in (("train", n_train), ("val", per_class - n_train)) for i in range(n)]


def _plant(root: Path) -> list[dict]:
    """Copies and variants of train images (a different one each) saved into val, as plantgen does."""
    labels, pairs = list(CLASSES), []
    for k, kind in enumerate(KINDS):
        for n in range(PER_KIND):
            label = labels[n % len(labels)]
            source = root / "train" / label / f"{label}_train_{k * PER_KIND + n:05d}.jpg"
            target = root / "val" / label / f"planted_{kind.replace('%', 'pc').replace('+', '')}_{source.stem}.jpg"
            if kind == "exact":
                shutil.copyfile(source, target)
            else:
                variant = near_variants(Image.open(source).convert("RGB"))[kind]
                variant.save(target, quality=70 if kind == "jpeg-q70" else 95)
            pairs.append({"kind": kind, "train": str(source.relative_to(root)), "val": str(target.relative_to(root))})
    return pairs


def make_dataset(root: Path, count: int) -> list[dict]:
    """Writes the dataset unless ``root/plan.json`` says it is there; returns the planted pairs."""
    plan_file = root / "plan.json"
    settings = {"count": count, "size": SIZE, "quality": QUALITY, "seed": SEED, "per_kind": PER_KIND}
    if plan_file.exists():
        plan = json.loads(plan_file.read_text())
        if plan["settings"] == settings:
            print(f"reusing {root} ({count} images)")
            return plan["pairs"]
    shutil.rmtree(root, ignore_errors=True)
    for split in ("train", "val"):
        for label in CLASSES:
            (root / split / label).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(_write_clean, _clean_jobs(root, count), chunksize=64))
    pairs = _plant(root)
    plan_file.write_text(json.dumps({"settings": settings, "pairs": pairs}, indent=1))
    print(f"wrote {count} images to {root} in {time.perf_counter() - start:.0f} s")
    return pairs


def image_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.jpg"))


def make_subset(root: Path, target: Path, pairs: list[dict], size: int) -> list[dict]:
    """Hard links to every planted pair's files plus random others, in the same layout."""
    planted = {f for p in pairs for f in (p["train"], p["val"])}
    others = [str(p.relative_to(root)) for p in image_files(root) if str(p.relative_to(root)) not in planted]
    chosen = sorted(planted) + random.Random(SEED).sample(others, max(0, size - len(planted)))
    shutil.rmtree(target, ignore_errors=True)
    for rel in chosen:
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(root / rel, target / rel)
        except OSError:
            shutil.copyfile(root / rel, target / rel)
    return pairs


# ---------------------------------------------------------------- imgtune doctor

def run_doctor(data: Path, out: Path, extra: list[str], env: dict) -> dict:
    """Wall time, peak memory, doctor.json and which progress bars were drawn."""
    command = [sys.executable, "-c", CLI, "doctor", str(data), "--out", str(out), *extra]
    wall, peak, result = run_measured(command, env)
    imports = float(next(line.split()[1] for line in result.stderr.splitlines() if line.startswith("IMPORTS")))
    diagnosis = json.loads((out / "doctor.json").read_text())
    bars = sorted({line.split(":")[0].strip() for line in result.stderr.replace("\r", "\n").splitlines()
                   if "img/s" in line or "it/s" in line or "%|" in line})
    return {"wall": wall, "peak": peak, "diagnosis": diagnosis, "bars": bars, "imports": imports}


def reported_groups(diagnosis: dict, root: Path) -> dict[frozenset, int]:
    """Every duplicate group (members relative to ``root``) -> its fingerprint bits (0 for exact)."""
    groups = {}
    for finding in diagnosis["findings"]:
        if finding["check"] in ("leakage", "label-conflict", "duplicate"):
            members = frozenset(str(Path(m["path"]).resolve().relative_to(root.resolve()))
                                for m in finding["details"]["members"])
            groups[members] = finding["details"]["bits"]
    return groups


def score(groups: dict[frozenset, int], pairs: list[dict]) -> tuple[dict[str, int], list[tuple]]:
    """Planted pairs found per kind; other pairs reported: (a, b, bits of their group)."""
    reported = {frozenset(pair): bits for group, bits in groups.items()
                for pair in itertools.combinations(sorted(group), 2)}
    planted = {frozenset((p["train"], p["val"])): p["kind"] for p in pairs}
    found = {kind: 0 for kind in KINDS}
    for pair, kind in planted.items():
        found[kind] += pair in reported
    extra = [(*sorted(pair), bits) for pair, bits in reported.items() if pair not in planted]
    return found, sorted(extra, key=lambda e: e[2])


# ---------------------------------------------------------------- the plain approach

def plain_phash(paths: list[Path], max_bits: int) -> dict:
    """What a user would write: open, load, imagehash.phash each file; all pairs by Hamming distance."""
    import imagehash

    start = time.perf_counter()
    hashes = []
    for path in paths:
        with Image.open(path) as img:
            img.load()
            bits = imagehash.phash(img).hash.flatten()
        hashes.append(int.from_bytes(np.packbits(bits).tobytes(), "big"))
    read = time.perf_counter() - start
    values = np.array(hashes, dtype=np.uint64)
    pairs = []
    for i in range(len(values) - 1):
        distance = np.bitwise_count(values[i] ^ values[i + 1:])
        pairs += [(i, i + 1 + int(j)) for j in np.flatnonzero(distance <= max_bits)]
    return {"read": read, "pairs_seconds": time.perf_counter() - start - read, "pairs": pairs}


def plain_groups(paths: list[Path], root: Path, pairs: list[tuple[int, int]]) -> dict[frozenset, int]:
    return {frozenset((str(paths[i].relative_to(root)), str(paths[j].relative_to(root)))): 0 for i, j in pairs}


def per_image_costs(paths: list[Path]) -> dict[str, float]:
    """Milliseconds per image, one thread: decode only, decode + imgtune fingerprint, the plain path."""
    import imagehash

    from imgtune.data.decode import probe

    blobs = [p.read_bytes() for p in paths]
    out = {}
    for name, work in (("decode (imgtune probe, no fingerprint)", lambda b: probe(io.BytesIO(b))),
                       ("decode + fingerprint (imgtune probe)", lambda b: probe(io.BytesIO(b), fingerprint=True)),
                       ("Image.open().load() + imagehash.phash", lambda b: imagehash.phash(_loaded(b)))):
        start = time.perf_counter()
        for blob in blobs:
            work(blob)
        out[name] = (time.perf_counter() - start) / len(blobs) * 1000
    return out


def _loaded(blob: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(blob))
    img.load()
    return img


# ---------------------------------------------------------------- report

def print_full(run: dict, found: dict[str, int], extra: list[tuple], count: int) -> None:
    seconds = run["diagnosis"]["seconds"]
    print(f"\n## imgtune doctor --no-labels on {count} images: {run['wall']:.1f} s wall, "
          f"{count / run['wall']:.1f} images/s, peak memory {run['peak'] / 2**30:.2f} GiB")
    print("| stage | seconds | share of wall | images/s |\n| --- | --- | --- | --- |")
    stages = {k: v for k, v in seconds.items() if k != "total"}
    stages["start-up: imports"] = run["imports"]
    stages["writing doctor.json/html, interpreter, the rest"] = run["wall"] - seconds["total"] - run["imports"]
    for name, value in stages.items():
        rate = f"{count / value:.0f}" if value > 0 else "—"
        print(f"| {name} | {value:.1f} | {value / run['wall']:.0%} | {rate} |")
    print(f"| **total** | {run['wall']:.1f} | 100% | {count / run['wall']:.1f} |")
    print(f"progress bars drawn: {', '.join(run['bars']) or 'none'}")
    print(f"findings: {run['diagnosis']['summary']}")
    print_recall("imgtune doctor", found, extra)


def print_recall(name: str, found: dict[str, int], extra: list[tuple], show: int = 8) -> None:
    parts = ", ".join(f"{kind} {n}/{PER_KIND}" for kind, n in found.items())
    print(f"{name}: planted pairs found {sum(found.values())}/{len(KINDS) * PER_KIND} ({parts}); "
          f"other pairs reported: {len(extra)}")
    for a, b, bits in extra[:show]:
        print(f"    other pair: {a} <-> {b} ({bits} bits)")


def compare(sub: dict, plain: dict, n: int, count: int, found_sub, extra_sub, found_plain, extra_plain,
            max_bits: int) -> None:
    reference = plain["read"] + plain["pairs_seconds"]
    work = sub["diagnosis"]["seconds"]["total"]
    print(f"\n## subset of {n} images (all planted pairs + random others)")
    print("| path | read + hash (s) | pairs (s) | total (s) | images/s |\n| --- | --- | --- | --- | --- |")
    s = sub["diagnosis"]["seconds"]
    print(f"| imgtune doctor --no-labels (wall, own process) | {s['files']:.1f} | {s['duplicates']:.1f} | "
          f"{sub['wall']:.1f} | {n / sub['wall']:.1f} |")
    print(f"| imgtune doctor --no-labels (doctor.json total) | {s['files']:.1f} | {s['duplicates']:.1f} | "
          f"{work:.1f} | {n / work:.1f} |")
    print(f"| plain: open+load+imagehash.phash, numpy all pairs <= {max_bits}/64 bits | {plain['read']:.1f} | "
          f"{plain['pairs_seconds']:.2f} | {reference:.1f} | {n / reference:.1f} |")
    print(f"time imgtune / plain: {sub['wall'] / reference:.2f} (wall), {work / reference:.2f} (doctor.json total)")
    print_recall("imgtune doctor (subset)", found_sub, extra_sub)
    print_recall(f"plain phash <= {max_bits} bits (subset)", found_plain, extra_plain)
    scale = count / n
    guess = plain["read"] * scale + plain["pairs_seconds"] * scale ** 2
    print(f"EXTRAPOLATION (not measured) of the plain path to {count} images: read+hash x{scale:.0f} "
          f"= {plain['read'] * scale:.0f} s, pairs x{scale ** 2:.0f} = {plain['pairs_seconds'] * scale ** 2:.0f} s, "
          f"about {guess:.0f} s")


# ---------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=Path(tempfile.gettempdir()) / "imgtune-doctor-20k")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "imgtune-doctor-bench",
                        help="subset copy and doctor outputs (kept for inspection)")
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--subset", type=int, default=2000)
    parser.add_argument("--ref-bits", type=int, default=10, help="plain path: near when at most this many of 64 bits differ")
    parser.add_argument("--labels", action="store_true", help="also time the label-error check on the subset")
    parser.add_argument("--skip-full", action="store_true", help="only the subset comparison")
    args = parser.parse_args()
    pairs = make_dataset(args.images, args.count)
    env = child_env()
    run_measured([sys.executable, "-m", "imgtune", "--help"], env)  # compile bytecode once, for every run alike
    if not args.skip_full:
        full = run_doctor(args.images, args.work / "full", ["--no-labels"], env)
        print_full(full, *score(reported_groups(full["diagnosis"], args.images), pairs), args.count)
    subset = args.work / "subset"
    make_subset(args.images, subset, pairs, args.subset)
    sub = run_doctor(subset, args.work / "subset-out", ["--no-labels"], env)
    paths = image_files(subset)
    plain = plain_phash(paths, args.ref_bits)
    compare(sub, plain, len(paths), args.count, *score(reported_groups(sub["diagnosis"], subset), pairs),
            *score(plain_groups(paths, subset, plain["pairs"]), pairs), args.ref_bits)
    print("\n## milliseconds per image, one thread, 300 files")
    for name, ms in per_image_costs(paths[:: max(1, len(paths) // 300)][:300]).items():
        print(f"| {name} | {ms:.2f} |")
    if args.labels:
        cache = Path(tempfile.mkdtemp(prefix="imgtune-doctor-cache-"))
        labelled = run_doctor(subset, args.work / "subset-labels", ["--offline"], child_env(IMGTUNE_CACHE=str(cache)))
        shutil.rmtree(cache, ignore_errors=True)
        s = labelled["diagnosis"]["seconds"]
        print(f"\n## with label errors on {len(paths)} images: {labelled['wall']:.1f} s wall; stages {s}; "
              f"{labelled['diagnosis']['label_errors']}")


if __name__ == "__main__":
    main()
