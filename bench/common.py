"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HYMENOPTERA = ROOT.parent / "shared" / "datasets" / "hymenoptera"


def child_env(**extra: str) -> dict:
    """The environment of a normal install: bytecode may be written (this sandbox disables it)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(extra)
    return env


def warm_imports() -> None:
    """Import what ``imgtune train`` imports once, in a child process, so its bytecode is written and no
    measured run pays for compiling its imports."""
    subprocess.run([sys.executable, "-c", "import imgtune.training, imgtune.cli, timm, sklearn.metrics"],
                   env=child_env(), check=True)


def _tree_rss(pid: int) -> int:
    """Resident memory (bytes) of ``pid`` and all its descendants."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) * 1024
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except (OSError, StopIteration):
            continue
        todo += [int(c) for c in children]
    return total


def run_measured(command: list[str], env: dict, interval: float = 0.2) -> tuple[float, int, subprocess.CompletedProcess]:
    """Run ``command``; return (wall seconds, peak summed RSS of the process tree in bytes, result)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _tree_rss(process.pid))
            stop.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = process.communicate()
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:5])} failed:\n{stderr[-3000:]}")
    return seconds, peak, result
