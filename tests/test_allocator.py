"""``imgtune.allocator``: the command raises glibc's malloc thresholds, unless told not to or the user set them."""

from __future__ import annotations

import ctypes
import gc
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


def test_the_console_script_sets_the_collector_for_a_process_that_ends(monkeypatch):
    """``imgtune`` (``cli.run``): fewer young collections, and what is alive frozen once the command returned, so
    the interpreter's shutdown does not walk it; ``main``, which tests and programs call in their own
    processes, leaves the collector alone."""
    from importlib.metadata import entry_points

    from imgtune import cli

    assert [e.value for e in entry_points(group="console_scripts", name="imgtune")] == ["imgtune.cli:run"]
    before = gc.get_threshold()
    seen = []
    monkeypatch.setattr(cli, "main", lambda argv=None: seen.append((gc.get_threshold()[0], gc.get_freeze_count())) or 3)
    gc.unfreeze()
    try:
        with pytest.raises(SystemExit) as stopped:
            cli.run()
        assert stopped.value.code == 3  # main's exit code
        assert seen == [(allocator.GEN0_THRESHOLD, 0)]  # set before the command runs, nothing frozen yet
        assert gc.get_freeze_count() > 1000  # frozen after it
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_the_command_exits_through_run_with_its_exit_code():
    import subprocess

    done = subprocess.run([sys.executable, "-m", "imgtune", "train", "/no/such/folder"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 3 and "/no/such/folder" in done.stderr, done.stderr
