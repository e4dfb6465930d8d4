"""imgtune shard DATA OUT: write a dataset as WebDataset tar shards (checked and split as train would
split it), to train from a stream: imgtune train OUT (or a URL of OUT/dataset.json)."""

from __future__ import annotations

from pathlib import Path

from .args import positive_int
from .output import console


def register(commands) -> None:
    p = commands.add_parser("shard", help="write a dataset as WebDataset tar shards", description=__doc__)
    p.add_argument("data", help="any dataset imgtune train accepts")
    p.add_argument("out", help="folder for the shards and dataset.json (new or empty)")
    p.add_argument("--max-count", type=positive_int, default=10_000, help="images per shard at most (default 10000)")
    p.add_argument("--max-size", type=float, default=1e9, help="bytes per shard at most (default 1e9)")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--test-fraction", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0, help="for the split and the order of training images")
    p.add_argument("--allow-leakage", action="store_true", help="as for train: write even with copies across "
                                                                  "splits or classes")
    p.add_argument("--overwrite", action="store_true", help="replace the shards in a non-empty OUT")
    p.set_defaults(handler=run)


def run(args) -> int:
    from ..data import load_splits
    from ..data.shards import write_shards
    from ..errors import UsageError
    from ..data.checks import check_duplicates

    if args.max_count < 1 or args.max_size <= 0:
        raise UsageError("--max-count and --max-size must be positive")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not args.overwrite)):
        raise UsageError(f"{out} exists and is not an empty folder; choose another or pass --overwrite")
    splits = load_splits(args.data, args.val_fraction, args.test_fraction, args.seed)
    check_duplicates(splits, args.data, args.allow_leakage)
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("*-[0-9][0-9][0-9][0-9][0-9][0-9].tar"), out / "dataset.json"]:
        old.unlink(missing_ok=True)
    manifest = write_shards(splits, out, str(Path(args.data).resolve()), args.seed, args.max_count, args.max_size)
    for name, shards in manifest["shards"].items():
        console.print(f"{name}: {sum(manifest['counts'][name].values())} images in {len(shards)} shard(s)")
    for item in manifest["skipped"]:
        console.print(f"  skipped {item['path']}: {item['reason']}")
    console.print(f"written: {out / 'dataset.json'} (train with: imgtune train {out})")
    return 0
