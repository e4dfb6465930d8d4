"""What the images of a run were, so that a resume can tell when they changed.

A run records, when it starts, one digest per split in meta.json (``content``: SHA-256 over the sorted
(path, label, file digest) of every image in the split; the file digests are ``Sample.digest``, which
the file checks compute anyway) and the per-file list in ``RUN/data_files.json.gz`` (about 30 bytes an
image compressed: 30 MB for a million images), which names the files that changed. A resume compares
the digests; an image whose content changed (same names, same counts) stops it. Shards carry their
split digests in their manifest (``imgtune shard`` writes them), without a per-file list: a change is
then named by split only. Runs and manifests from before this record are not compared.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
from pathlib import Path

from ..errors import DataError
from .scan import Sample

log = logging.getLogger(__name__)
FORMAT = "imgtune-data-files"
Files = dict[str, list[list[str]]]  # split -> sorted [path, label, digest]
SHOWN = 5  # changed files named in the message


def folder_files(samples: list[Sample], source: str) -> Files:
    """Every sample's (path relative to the data's folder, label, digest), per split, sorted."""
    root = Path(source)
    root = root.parent if root.is_file() else root
    files: Files = {}
    for sample in samples:
        files.setdefault(sample.split or "", []).append([_relative(sample.path, root), sample.label,
                                                         sample.digest or ""])
    return {split: sorted(rows) for split, rows in sorted(files.items())}


def _relative(path: Path, root: Path) -> str:
    try:
        return os.path.relpath(path, root) if path.is_absolute() == root.is_absolute() else str(path)
    except ValueError:  # another drive
        return str(path)


def split_digests(files: Files) -> dict[str, str]:
    return {split: hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()
            for split, rows in files.items()}


def encode_files(files: Files) -> bytes:
    return gzip.compress(json.dumps({"format": FORMAT, "files": files}, separators=(",", ":")).encode(), mtime=0)


def read_files(path: Path) -> Files | None:
    try:
        values = json.loads(gzip.decompress(path.read_bytes()))
    except (OSError, ValueError, EOFError):
        return None
    return values.get("files") if isinstance(values, dict) and values.get("format") == FORMAT else None


def check_same(then: dict[str, str] | None, now: dict[str, str] | None, location: str, files_then: Path,
               files_now: Files | None) -> None:
    """Refuse to continue a run whose images changed content since it started (DataError naming the
    changed files where both file lists exist)."""
    if then is None or now is None:
        log.debug("no content digests to compare %s with (a run or shards from before imgtune recorded them)",
                  location)
        return
    changed = sorted(split for split in then.keys() | now.keys() if then.get(split) != now.get(split))
    if not changed:
        return
    before = read_files(files_then) if files_now is not None else None
    named = _differences(before, files_now, changed) if before is not None else []
    what = (f"{len(named)} file(s) differ, e.g. " + "; ".join(named[:SHOWN])) if named else \
        f"the content of the {', '.join(changed)} split(s) differs"
    raise DataError(f"the images in {location} changed since the run started ({what}); a run can only be "
                    "resumed on the data it started on: restore those files, or start a new run")


def _differences(before: Files, after: Files, splits: list[str]) -> list[str]:
    named = []
    for split in splits:
        old = {path: (label, digest) for path, label, digest in before.get(split, [])}
        new = {path: (label, digest) for path, label, digest in after.get(split, [])}
        for path in sorted(old.keys() | new.keys()):
            if path not in new:
                named.append(f"{path} ({split}) is gone")
            elif path not in old:
                named.append(f"{path} ({split}) is new")
            elif old[path][0] != new[path][0]:
                named.append(f"{path} ({split}) moved from class {old[path][0]} to {new[path][0]}")
            elif old[path] != new[path]:
                named.append(f"{path} ({split}) changed content")
    return named
