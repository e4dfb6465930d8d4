"""On-disk caches that make repeated work free.

- **Features** of a frozen backbone: one float32 vector per image, keyed by the model (library, name,
  the weights file's hash, body cut, preprocessing) and by the image file's content hash. A changed or
  added file is computed again; nothing else is. A second run with other head settings reuses them.
- **Pixels**: each image decoded once and resized to the model's ``resize_size`` (shorter side), stored
  as uint8 ``.npy``; training crops and augments these instead of decoding the original every epoch.
  Files are read one at a time (memory stays bounded whatever the dataset's size).

Location: ``--cache-dir``, else ``$IMGTUNE_CACHE``, else ``$XDG_CACHE_HOME/imgtune`` (``~/.cache/imgtune``).
Every file is written atomically, so concurrent processes and crashes leave no half files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from . import finite
from .atomic import atomic_write, atomic_write_bytes

FORMAT_VERSION = 1


def default_cache_dir() -> Path:
    if os.environ.get("IMGTUNE_CACHE"):
        return Path(os.environ["IMGTUNE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "imgtune"


def file_sha256(path: Path, _memo: dict = {}) -> str:  # noqa: B006 (a deliberate per-process memo)
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _memo:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _memo[key] = digest.hexdigest()
    return _memo[key]


def key_of(values: dict) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:24]


class ArrayStore:
    """Arrays by content digest under ``root``: ``root/ab/abcdef....npy``."""

    def __init__(self, root: Path, description: dict):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        info = self.root / "key.json"  # what the folder's key stands for, for people looking at the cache
        if not info.exists():
            atomic_write_bytes(info, finite.dumps(description, indent=2, default=str).encode(), fsync=False)

    def path(self, digest: str) -> Path:
        return self.root / digest[:2] / f"{digest}.npy"

    def get(self, digest: str) -> np.ndarray | None:
        try:
            return np.load(self.path(digest), allow_pickle=False)
        except (FileNotFoundError, ValueError, OSError):
            return None  # absent, or damaged: computed again

    def put(self, digest: str, array: np.ndarray) -> None:
        target = self.path(digest)
        target.parent.mkdir(exist_ok=True)
        atomic_write(target, lambda tmp: _save_npy(tmp, array), fsync=False)  # get() treats damage as absent


def _save_npy(path: Path, array: np.ndarray) -> None:
    with path.open("wb") as handle:  # a handle: np.save would append ".npy" to the temporary name
        np.save(handle, array, allow_pickle=False)


def feature_store(root: Path, model_description: dict) -> ArrayStore:
    description = {"kind": "features", "version": FORMAT_VERSION, **model_description}
    return ArrayStore(root / "features" / key_of(description), description)


def pixel_store(root: Path, resize_size: int, interpolation: str) -> ArrayStore:
    description = {"kind": "pixels", "version": FORMAT_VERSION, "resize_size": resize_size,
                   "interpolation": interpolation}
    return ArrayStore(root / "pixels" / f"{resize_size}-{interpolation}", description)


def cache_size(root: Path) -> tuple[int, int]:
    """(files, bytes) under ``root``."""
    files = total = 0
    for path in root.rglob("*.npy") if root.exists() else []:
        files += 1
        total += path.stat().st_size
    return files, total


def clear(root: Path) -> tuple[int, int]:
    """Remove imgtune's caches under ``root``; returns what was removed as (files, bytes)."""
    removed = cache_size(root)
    for name in ("features", "pixels"):
        shutil.rmtree(root / name, ignore_errors=True)
    return removed
