"""Fault cases of the feature and pixel caches (see faultlib): ``cache clear`` on folders that are not
(only) imgtune's, and damaged entries met during training."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from pathlib import Path

import numpy as np

from datagen import PRETRAINED_ARGS, make_split_dataset
from faultlib import Fault, Outcome, cli


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _entries(cache: Path, kind: str) -> list[Path]:
    """The cached arrays of one kind (``CACHE/KIND/<store>/<ab>/<digest>.*``), whatever their format."""
    return sorted(p for p in (cache / kind).glob("*/??/*") if p.is_file() and (p.parents[1] / "key.json").exists())


def _clear(cache: Path) -> tuple[Outcome, str]:
    """``imgtune cache clear``; also what it printed (stdout)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        outcome = cli("cache", "clear", "--cache-dir", str(cache))
    return outcome, " ".join(printed.getvalue().split())  # rich wraps long lines


def _project(tmp: Path) -> tuple[Path, dict[str, bytes]]:
    """A project folder whose own features/ and pixels/ hold work; and its files."""
    project = tmp / "project"
    for name, text in {"features/embeddings.csv": "a,b\n1,2\n", "features/run1/ab/notes.txt": "mine",
                       "pixels/raw/scan.png": "png", "train.py": "print(1)"}.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(text)
    return project, _files(project)


def _gone(project: Path, before: dict[str, bytes]) -> str | None:
    after = _files(project)
    gone = sorted(name for name in before if after.get(name) != before[name])
    return f"deleted or changed {', '.join(gone)}" if gone else None


def _project_folder(tmp: Path) -> Outcome:
    """The issue's case: ``--cache-dir .`` in a project whose own features/ and pixels/ hold work."""
    project, before = _project(tmp)
    outcome, _ = _clear(project)
    outcome.lost = _gone(project, before)
    return outcome


def _project_folder_from_the_environment(tmp: Path) -> Outcome:
    """The same with ``IMGTUNE_CACHE`` pointing at the project, and no --cache-dir."""
    project, before = _project(tmp)
    saved = os.environ.get("IMGTUNE_CACHE")
    os.environ["IMGTUNE_CACHE"] = str(project)
    try:
        outcome = cli("cache", "clear")
    finally:
        os.environ.pop("IMGTUNE_CACHE") if saved is None else os.environ.update(IMGTUNE_CACHE=saved)
    outcome.lost = _gone(project, before)
    return outcome


def _train(data: Path, out: Path, cache: Path, strategy: str) -> Outcome:
    with contextlib.redirect_stdout(io.StringIO()):  # the metrics tables
        return cli("train", str(data), "--workers", "0", "--out", str(out), "--cache-dir", str(cache),
                   *PRETRAINED_ARGS, "--epochs", "1", "--strategy", strategy)


def _fill_cache(tmp: Path, strategy: str) -> tuple[Path, Path]:
    data = make_split_dataset(tmp / "data", train=4, val=2)
    cache = tmp / "cache"
    code = _train(data, tmp / "clean", cache, strategy).exit_code
    assert code == 0, f"the clean run failed ({code})"
    return data, cache


def _cache_in_a_project_folder(tmp: Path) -> Outcome:
    """A run with ``--cache-dir PROJECT`` writes the cache among the project's own files; ``cache clear``
    then removes the entries it wrote, counted right, and nothing of the project's."""
    project, before = _project(tmp)
    data = make_split_dataset(tmp / "data", train=4, val=2)
    code = _train(data, tmp / "run", project, "linear-probe").exit_code
    assert code == 0, f"the run failed ({code})"
    entries = len(_entries(project, "features")) + len(_entries(project, "checks"))
    outcome, printed = _clear(project)
    lost = [_gone(project, before)] if _gone(project, before) else []
    left = _entries(project, "features") + _entries(project, "checks")
    lost += [f"{len(left)} entries left"] if left else []
    lost += [f"said {printed!r} for {entries} entries"] if f"removed {entries} cached file(s)" not in printed else []
    lost += ["CACHEDIR.TAG written into the project (backup tools skip it)"] if (project / "CACHEDIR.TAG").exists() \
        else []
    outcome.lost = "; ".join(lost) or None
    outcome.message = outcome.message or printed
    return outcome


def _format_1_cache(tmp: Path) -> Outcome:
    """A cache written by imgtune before the marker existed (bare .npy entries) is still cleared."""
    cache = tmp / "old-cache"
    store = cache / "features" / ("0123456789abcdef" * 2)[:24]
    (store / "ab").mkdir(parents=True)
    (store / "key.json").write_text(json.dumps({"kind": "features", "version": 1}))
    for i in range(3):
        np.save(store / "ab" / f"ab{i:030x}.npy", np.zeros(8, np.float32))
    outcome, printed = _clear(cache)
    left = _files(cache)
    outcome.lost = f"left {sorted(left)}" if left else None
    outcome.lost = outcome.lost or (None if "removed 3 cached file(s)" in printed else f"said {printed!r}")
    outcome.message = outcome.message or printed
    return outcome


def _damage(entries: list[Path]) -> list[Path]:
    """Damage the first four entries four ways: empty, another shape, NaN and 1e6 garbage of valid
    ``.npy`` format, and one flipped byte near the end (inside the array's bytes)."""
    empty, shape, garbage, flipped = entries[:4]
    empty.write_bytes(b"")
    with shape.open("wb") as handle:
        np.save(handle, np.zeros((5, 7), np.float32))
    with garbage.open("wb") as handle:
        values = np.full(np.load(flipped, allow_pickle=False).shape if flipped.suffix == ".npy" else 1280, 1e6,
                         np.float32)
        values[::2] = np.nan
        np.save(handle, values)
    data = bytearray(flipped.read_bytes())
    data[-3] ^= 0x10
    flipped.write_bytes(bytes(data))
    return [empty, shape, garbage, flipped]


def _damaged_entries(kind: str, strategy: str):
    def run(tmp: Path) -> Outcome:
        data, cache = _fill_cache(tmp, strategy)
        clean = json.loads((tmp / "clean" / "metrics.json").read_text())
        damaged = _damage(_entries(cache, kind))
        warnings = _Collect()
        logging.getLogger("imgtune").addHandler(warnings)
        try:
            outcome = _train(data, tmp / "again", cache, strategy)
        finally:
            logging.getLogger("imgtune").removeHandler(warnings)
        named = [p.name for p in damaged if any(p.name in w for w in warnings.lines)]
        lost = [f"no warning named {p.name}" for p in damaged if p.name not in named]
        if outcome.exit_code == 0:
            again = json.loads((tmp / "again" / "metrics.json").read_text())
            lost += [f"metrics differ from a clean-cache run: {_diff(clean, again)}"] if again != clean else []
        outcome.lost = "; ".join(lost) or None
        outcome.message = next((w for w in warnings.lines if damaged[-1].name in w), outcome.message)
        return outcome
    return run


def _diff(a: dict, b: dict) -> str:
    return ", ".join(f"{k} {a.get(k)} vs {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


FAULTS = [
    Fault("cache clear --cache-dir . in a project folder with its own features/ and pixels/", "caches", 2,
          _project_folder),
    Fault("cache clear with IMGTUNE_CACHE pointing at such a project folder", "caches", 2,
          _project_folder_from_the_environment),
    Fault("train --cache-dir PROJECT, then cache clear --cache-dir PROJECT", "caches", 0, _cache_in_a_project_folder),
    Fault("cache clear on a cache of an older imgtune (no marker, .npy entries)", "caches", 0, _format_1_cache),
    Fault("linear-probe on empty, wrong-shape, NaN-garbage and bit-flipped feature entries", "caches", 0,
          _damaged_entries("features", "linear-probe")),
    Fault("finetune on empty, wrong-shape, NaN-garbage and bit-flipped pixel entries", "caches", 0,
          _damaged_entries("pixels", "finetune")),
]
