"""Atomic file writes: the one way imgtune writes a file that something else may read.

The data goes to a temporary file in the target's folder (named ``.NAME.XXXX.tmp``, so a killed
process leaves only hidden ``*.tmp`` files), which gets the mode the umask gives any new file (not
``mkstemp``'s private 0600), is flushed to disk, and is then renamed over the target: a reader sees
the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[Path], None], fsync: bool = True) -> None:
    """Call ``write(tmp)`` to fill a temporary file, then rename it to ``path``. ``fsync=False`` for
    files that can be made again (cache entries): the rename is still atomic, but a crash of the whole
    machine may leave an empty file, which the reader must treat as absent."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # after writing: a writer may replace the file (safetensors does)
        if fsync:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
