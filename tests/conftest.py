"""Shared fixtures."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture(autouse=True)
def _keep_root_logging():
    """``imgtune.cli.main`` reconfigures the root logger (``basicConfig(force=True)``) onto the stderr
    of the test that called it; give the root logger its previous handlers back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Tests never read or fill the user's feature and pixel caches."""
    mp = pytest.MonkeyPatch()
    mp.setenv("IMGTUNE_CACHE", str(tmp_path_factory.mktemp("imgtune-cache")))
    yield
    mp.undo()
