"""Atomic file writes: the one way imgtune writes a file that something else may read.

The data goes to a temporary file in the target's folder (named ``.NAME.XXXX.tmp``, so a killed
process leaves only hidden ``*.tmp`` files), which gets the mode the umask gives any new file (not
``mkstemp``'s private 0600), is flushed to disk, and is then renamed over the target: a reader sees
the old file or the new one, never half of one. A full disk or a folder that cannot be written is an
:class:`~imgtune.errors.ImgtuneError` naming the file (:func:`check_writable_folder` finds the second
before any work starts).
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import DataError, ImgtuneError, UsageError

_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_NOT_ALLOWED = {errno.EACCES, errno.EPERM, errno.EROFS}


def atomic_write(path: str | Path, write: Callable[[Path], None], fsync: bool = True) -> None:
    """Call ``write(tmp)`` to fill a temporary file, then rename it to ``path``. ``fsync=False`` for
    files that can be made again (cache entries): the rename is still atomic, but a crash of the whole
    machine may leave an empty file, which the reader must treat as absent."""
    path = Path(path)
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        found = write_error(path, exc)
        if found is None:
            raise
        raise found from exc
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # after writing: a writer may replace the file (safetensors does)
        if fsync:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        found = write_error(path, exc) if isinstance(exc, OSError) else None
        if found is not None:
            raise found from exc
        raise


def write_error(path: Path, exc: OSError) -> ImgtuneError | None:
    """What to tell the user when writing ``path`` failed for a reason of the machine, not of imgtune:
    a full disk (exit 3) or no permission (exit 2); None for other errors."""
    if exc.errno in _DISK_FULL:
        return DataError(f"the disk is full: could not write {path} (nothing half-written was left); free some "
                         "space, or write elsewhere (--out, --cache-dir), and run again")
    if exc.errno in _NOT_ALLOWED:
        return UsageError(f"cannot write {path}: {exc.strerror}; choose a folder you can write to")
    return None


def check_writable_folder(path: str | Path, what: str) -> None:
    """Before any work: ``path`` is a folder imgtune can write in, or one it can create; a
    :class:`UsageError` naming ``what`` (e.g. ``--out``) says why not. Writing is tried (a hidden
    folder made and removed), since permission bits do not tell for root, /proc or a read-only mount."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{what} {path} is a file, not a folder; choose a folder")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{what} {path}: {existing} is a file, so no folder can be made there; choose another")
    try:
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".imgtune-write-test-"))
    except OSError as exc:
        raise UsageError(f"{what} {path}: cannot write in {existing} ({exc.strerror}); choose a folder you can "
                         "write to") from exc


def atomic_write_bytes(path: str | Path, data: bytes, fsync: bool = True) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data), fsync)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _read_umask() -> int:
    """Read once: setting and restoring the umask to read it is not safe while threads create files."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()
