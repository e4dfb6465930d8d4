"""``imgtune.allocator``: the command raises glibc's malloc thresholds, unless told not to or the user set them."""

from __future__ import annotations

import ctypes
import sys

import pytest

from imgtune import allocator
from imgtune.cli import main


def glibc() -> bool:
    try:
        ctypes.CDLL("libc.so.6").gnu_get_libc_version  # noqa: B018
    except (OSError, AttributeError):
        return False
    return sys.platform.startswith("linux")


@pytest.mark.skipif(not glibc(), reason="glibc only")
def test_the_thresholds_are_raised_on_glibc(monkeypatch):
    for name in (*allocator.USER_SETTINGS, "IMGTUNE_MALLOC"):
        monkeypatch.delenv(name, raising=False)
    assert allocator.tune() is True


@pytest.mark.parametrize("name, value", [("IMGTUNE_MALLOC", "default"), ("MALLOC_TRIM_THRESHOLD_", "131072"),
                                         ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=131072")])
def test_the_user_can_keep_the_allocator_as_it_is(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    assert allocator.tune() is False


def test_the_command_tunes_the_allocator(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(allocator, "tune", lambda: calls.append(1) or True)
    assert main(["cache", "--cache-dir", str(tmp_path), "info"]) == 0
    assert calls == [1]
