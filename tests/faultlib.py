"""Fault injection: bad inputs, faults and concurrency tried as a user would, one case at a time.

Each ``tests/faults_<part>.py`` module lists its cases as ``FAULTS = [Fault(...), ...]``;
``tests/test_faults.py`` runs every case as a test, and ``bench/faults.py`` runs them all in one go and
prints the table that ``docs/reliability.md`` shows (case, exit code, message, whether anything was
lost). A case is a function that does the fault in a fresh folder and returns what happened.

What every case must show: an exit code other than 1 ("a bug in imgtune") where a user made a
mistake or the machine failed, the documented code (``expected``), no hang (a time limit), no memory
blow-up (an address-space limit in subprocesses), and nothing lost.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"
MEMORY_LIMIT = 6 << 30  # bytes of address space a subprocess case may take


@dataclass
class Outcome:
    exit_code: int
    message: str  # the last line of what the user was told (an error or warning), or "" when silent
    lost: str | None = None  # what was lost or left wrong; None: nothing


@dataclass
class Fault:
    name: str  # what was tried, as a user would say it
    part: str  # the part of imgtune it concerns (caches, run folder, data, training, ...)
    expected: int  # the documented exit code
    run: Callable[[Path], Outcome]  # does the fault in the given fresh folder


def cli(*args: str) -> Outcome:
    """``imgtune ARGS`` in this process; the message is the last line written to stderr (the log)."""
    from imgtune.cli import main

    buffer = io.StringIO()
    with contextlib.redirect_stderr(buffer):  # main() points logging at sys.stderr when it starts
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse refuses a flag
            code = exc.code if isinstance(exc.code, int) else 2
    return Outcome(code, _last_line(buffer.getvalue()))


def cli_subprocess(*args: str, timeout: float = 120, cwd: Path | None = None, env: dict | None = None
                   ) -> Outcome:
    """``python -m imgtune ARGS`` in a child process with a time limit (a hang is exit 124) and an
    address-space limit (a memory blow-up fails instead of taking the machine)."""
    environment = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **(env or {})}

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    try:
        done = subprocess.run([sys.executable, "-m", "imgtune", *args], capture_output=True, text=True,
                              timeout=timeout, cwd=cwd, env=environment, preexec_fn=limit)
    except subprocess.TimeoutExpired:
        return Outcome(124, f"hung: no answer in {timeout:g} s", lost="hang")
    return Outcome(done.returncode, _last_line(done.stderr))


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith(" ")]
    return lines[-1] if lines else ""


def all_faults() -> list[Fault]:
    """Every case of every ``tests/faults_*.py`` module, in file order."""
    found: list[Fault] = []
    for path in sorted(TESTS.glob("faults_*.py")):
        found += importlib.import_module(path.stem).FAULTS
    return found
