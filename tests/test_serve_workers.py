"""``imgtune serve --workers 2``: two worker processes share the port, both answer with the key, and a
SIGTERM to the parent stops them all."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import pytest

from serving import serve_process, tiny_run  # noqa: F401

pytestmark = pytest.mark.slow  # two children each import torch and load the model

KEY = "k" * 32


def children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(c) for c in (task / "children").read_text().split()}
    return found


def test_two_workers_answer_and_stop_with_the_parent(tiny_run):  # noqa: F811
    image = sorted((tiny_run[1] / "val").glob("*/*.png"))[0].read_bytes()
    with serve_process(tiny_run[0], "--workers", "2", "--api-key-env", "IMGTUNE_TEST_KEY",
                       env={"IMGTUNE_TEST_KEY": KEY}) as (base, process):
        workers = children(process.pid)
        assert len(workers) >= 2, f"worker processes: {workers}"
        with httpx.Client(headers={"X-API-Key": KEY}, timeout=60) as client:
            answers = [client.post(f"{base}/predict", files={"file": ("x.png", image, "image/png")})
                       for _ in range(8)]
            assert [a.status_code for a in answers] == [200] * 8
            assert len({a.json()["results"][0]["label"] for a in answers}) == 1
            assert client.post(f"{base}/predict", headers={"X-API-Key": "wrong"}, files={"file": ("x.png", image)}
                               ).status_code == 401
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)
        deadline = time.monotonic() + 15  # the workers drain and exit on their own once the parent is gone
        while running(workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert running(workers) == [], f"workers left running after the parent stopped: {running(workers)}"


def running(pids: set[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if "zombie" not in Path(f"/proc/{pid}/status").read_text().lower():
                alive.append(pid)
        except FileNotFoundError:
            pass
    return alive
