"""One writer at a time per run folder.

A run (``imgtune train``), a resume, and ``imgtune evaluate``/``report``/``explain`` writing into a
run folder hold ``RUN/.imgtune.lock`` with an OS lock (``flock``) while they use it; a second writer is
refused at once with a UsageError naming the holder's process id and what it is doing. The lock is the
kernel's, not the file's: it dies with its holder (even under kill -9), so resuming after a crash is
never blocked by a stale file. The file itself stays (it holds the last holder's pid, for the message).
Readers (``predict``) take no lock. Holding is re-entrant within a process (the CLI and the library
function it calls may both hold the same folder). Under torchrun only rank 0 writes, so only rank 0
holds the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import DataError, UsageError

LOCK_FILE = ".imgtune.lock"
_held: dict[Path, int] = {}  # folders this process holds, and how many times


@contextlib.contextmanager
def hold(run_dir: str | Path, doing: str) -> Iterator[None]:
    """Hold ``run_dir`` (an existing folder) for ``doing`` (train, resume, evaluate, report, explain)."""
    key = Path(run_dir).resolve()
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    fd = _acquire(key, doing)
    _held[key] = 1
    try:
        yield
    finally:
        del _held[key]
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _acquire(run_dir: Path, doing: str) -> int:
    if not run_dir.is_dir():
        raise DataError(f"run folder {run_dir} does not exist; pass the folder `imgtune train` wrote (--out)")
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise UsageError(f"cannot {doing} into {run_dir}: {exc.strerror} ({run_dir / LOCK_FILE}); make the "
                         "folder writable, or copy the run folder somewhere writable") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise UsageError(f"{run_dir} is in use by process {holder.get('pid', '(unknown)')} "
                         f"({holder.get('doing', 'another imgtune command')}, since {holder.get('since', '?')}); "
                         "wait until it finishes, or stop that process, or use another folder "
                         "(two writers in one run folder would mix their files)") from None
    except OSError:
        os.close(fd)
        raise
    record = json.dumps({"pid": os.getpid(), "doing": doing,
                         "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode() + b"\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, record, 0)
    return fd


def _read_holder(fd: int) -> dict:
    """What the holder wrote (it may not have written yet: then nothing is known but that it holds)."""
    try:
        values = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return values if isinstance(values, dict) else {}
    except (OSError, ValueError):
        return {}


def inside(path: str | Path, run_dir: str | Path) -> bool:
    """Whether ``path`` is in ``run_dir`` (then writing it needs the run folder held)."""
    return Path(path).resolve().is_relative_to(Path(run_dir).resolve())
