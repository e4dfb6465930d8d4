"""imgtune sample DIR: write the built-in sample dataset (no download) to try imgtune on."""

from __future__ import annotations

from pathlib import Path

from ..atomic import check_writable_folder
from ..errors import UsageError
from .args import positive_int
from .output import console


def register(commands) -> None:
    p = commands.add_parser("sample", help="write a small generated dataset to try imgtune on", description=__doc__)
    p.add_argument("dir", help="folder to create (must be new or empty)")
    p.add_argument("--train-per-class", type=positive_int, default=30)
    p.add_argument("--val-per-class", type=positive_int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=run)


def run(args) -> int:
    from ..sample import make_sample

    root = Path(args.dir)
    check_writable_folder(root, "DIR")
    if root.exists() and any(root.iterdir()):
        raise UsageError(f"{root} exists and is not empty; choose a new folder")
    make_sample(root, args.train_per_class, args.val_per_class, args.seed)
    console.print(f"sample dataset written to {root} (train/ and val/, 3 classes, one broken file on purpose)")
    return 0
