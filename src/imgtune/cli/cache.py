"""imgtune cache info|clear: what the feature, pixel and file-check caches hold, and emptying them."""

from __future__ import annotations

from pathlib import Path

from .output import console


def register(commands) -> None:
    p = commands.add_parser("cache", help="show or clear the feature and decoded-image caches",
                            description=__doc__)
    p.add_argument("action", choices=("info", "clear"))
    p.add_argument("--cache-dir", help="cache folder (default $IMGTUNE_CACHE, else ~/.cache/imgtune)")
    p.set_defaults(handler=run)


def run(args) -> int:
    from ..cache import KINDS, cache_size, clear, default_cache_dir

    root = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    if args.action == "clear":
        removed = clear(root)
        console.print(f"removed {removed.entries} cached file(s) and {removed.others} other file(s) of the cache "
                      f"(key.json, exported bodies, unfinished writes), {removed.size / 2**20:.1f} MiB, from {root}")
    else:
        for kind in KINDS:
            files, size = cache_size(root / kind)
            console.print(f"{kind}: {files} file(s), {size / 2**20:.1f} MiB in {root / kind}")
    return 0
