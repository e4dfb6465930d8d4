"""Opening the files a user points imgtune at: regular files only, and never more than a size limit.

A FIFO named ``x.jpg`` would block a reader forever, ``/dev/zero`` would fill memory, a socket cannot
be read at all: every image, CSV and data file is opened here, which refuses anything but a regular
file (symbolic links are followed: DVC and git-annex keep data behind them) and anything larger than
:func:`max_file_bytes` (``IMGTUNE_MAX_FILE_MB``, default 256 MB). Both refusals are ``OSError``
subclasses, so callers that already handle unreadable files handle them too.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

DEFAULT_MAX_FILE_MB = 256
MAX_FILE_ENV = "IMGTUNE_MAX_FILE_MB"


class NotRegularFile(OSError):
    """A FIFO, device, socket or folder where a file was expected."""


class FileTooLarge(OSError):
    """A file over :func:`max_file_bytes`."""


def max_file_bytes() -> int:
    """The largest file imgtune reads: ``$IMGTUNE_MAX_FILE_MB`` megabytes, else 256 MB."""
    text = os.environ.get(MAX_FILE_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_FILE_MB << 20
    try:
        megabytes = float(text)
    except ValueError:
        megabytes = -1.0
    if not 0 < megabytes < float("inf"):
        from ..errors import UsageError

        raise UsageError(f"{MAX_FILE_ENV}={text!r} must be a positive number of megabytes (default "
                         f"{DEFAULT_MAX_FILE_MB})")
    return int(megabytes * (1 << 20))


def kind_of(mode: int) -> str | None:
    """What a non-regular file is, in words; None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def is_regular(path: str | Path) -> bool:
    """True for a regular file or a symbolic link to one; False for anything else, or nothing."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def open_regular(path: str | Path, limit: int | None = None) -> BinaryIO:
    """Open ``path`` for reading in binary; :class:`NotRegularFile` or :class:`FileTooLarge` (saying what
    to do; the caller names the path) instead of blocking on a FIFO or reading a device. ``limit``: bytes, default
    :func:`max_file_bytes`."""
    limit = max_file_bytes() if limit is None else limit
    _check(os.stat(path), limit)  # before opening: opening some devices has effects
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    try:
        _check(os.fstat(fd), limit)  # what was opened, should the path have changed meanwhile
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bounded(path: str | Path, limit: int | None = None) -> bytes:
    """The bytes of the regular file ``path``, never more than ``limit`` (a file growing while it is
    read is refused too)."""
    limit = max_file_bytes() if limit is None else limit
    with open_regular(path, limit) as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise FileTooLarge(_too_large(len(data), limit))
    return data


def _check(found: os.stat_result, limit: int) -> None:
    kind = kind_of(found.st_mode)
    if kind:
        raise NotRegularFile(f"{kind}, not a regular file: only regular files are read; remove it or point at "
                             "the file itself")
    if found.st_size > limit:
        raise FileTooLarge(_too_large(found.st_size, limit))


def _too_large(size: int, limit: int) -> str:
    return (f"over the file size limit ({size / (1 << 20):.1f} MB; the limit is {limit / (1 << 20):.1f} MB): raise "
            f"it with {MAX_FILE_ENV}=MEGABYTES if the file is meant to be read")
