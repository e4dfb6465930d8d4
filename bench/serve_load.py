"""Load on ``imgtune serve``: 16 concurrent clients send 2,000 hymenoptera photos (one per request) to the
server with dynamic batching (``--max-batch 32 --max-wait-ms 5``) and to the same server with
``--max-batch 1``, one after the other in this one invocation; throughput, p50/p95/p99 latency, errors and
the mean batch size (from ``/metrics``) of each, and the ratio of throughputs.

Everything on 127.0.0.1: each server is ``imgtune serve`` in a child process; the clients are one asyncio
loop in this process (httpx), so they share the machine's cores with the server. The model: an imgtune
linear-probe run on hymenoptera (MobileNetV2, offline weights; trained here unless --run is given).

    python bench/serve_load.py [--run RUN] [--requests 2000] [--clients 16] [--engine torch]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from common import HYMENOPTERA, ROOT, child_env, run_measured

WARM_UP = 64  # requests sent before the clock starts (not counted)


def start_server(run: Path, engine: str, *flags: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = child_env(PYTHONPATH=str(ROOT / "src"))
    process = subprocess.Popen([sys.executable, "-m", "imgtune", "-q", "serve", str(run), "--port", str(port),
                                "--engine", engine, "--max-concurrency", "256", *flags], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {process.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return process, base
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise TimeoutError("the server did not become ready in 180 s")


async def load(base: str, photos: list[tuple[str, bytes]], requests: int, clients: int) -> dict:
    """``requests`` single-photo POST /predict from ``clients`` concurrent clients; latencies and errors."""
    latencies: list[float] = []
    errors: list[str] = []
    queue = iter(range(requests))

    async def client(http: httpx.AsyncClient) -> None:
        for i in queue:
            name, data = photos[i % len(photos)]
            start = time.perf_counter()
            try:
                response = await http.post("/predict", files={"file": (name, data, "image/jpeg")})
                ok = response.status_code == 200 and "label" in response.json()["results"][0]
                if not ok:
                    errors.append(f"{response.status_code} {response.text[:120]}")
            except httpx.HTTPError as exc:
                errors.append(repr(exc))
            latencies.append(time.perf_counter() - start)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "latencies": np.array(latencies), "errors": errors}


def mean_batch(base: str) -> float:
    text = httpx.get(f"{base}/metrics").text
    count = float(re.search(r"^imgtune_batch_size_count (\S+)", text, re.M).group(1))
    total = float(re.search(r"^imgtune_batch_size_sum (\S+)", text, re.M).group(1))
    return total / count if count else float("nan")


def measure(run: Path, engine: str, flags: tuple[str, ...], photos, requests: int, clients: int) -> dict:
    process, base = start_server(run, engine, *flags)
    try:
        asyncio.run(load(base, photos, WARM_UP, clients))
        result = asyncio.run(load(base, photos, requests, clients))
        result["mean_batch"] = mean_batch(base)  # warm-up included: a few dozen of thousands
    finally:
        process.terminate()
        process.wait(timeout=60)
    return result


def describe(name: str, result: dict, requests: int) -> str:
    p50, p95, p99 = np.percentile(result["latencies"] * 1000, [50, 95, 99])
    return (f"{name}: {requests / result['seconds']:.1f} requests/s ({result['seconds']:.1f} s), latency p50 "
            f"{p50:.0f} ms, p95 {p95:.0f} ms, p99 {p99:.0f} ms, mean batch {result['mean_batch']:.1f}, "
            f"errors {len(result['errors'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a run folder (default: train a linear probe on hymenoptera)")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--engine", choices=("torch", "onnxruntime"), default="torch")
    args = parser.parse_args()
    photos = [(p.name, p.read_bytes()) for p in sorted(HYMENOPTERA.glob("*/*/*.jp*g"))]
    run = args.run
    if run is None:
        run = Path(tempfile.mkdtemp()) / "run"
        run_measured([sys.executable, "-m", "imgtune", "-q", "train", str(HYMENOPTERA), "--strategy", "linear-probe",
                      "--out", str(run), "--offline"], child_env(PYTHONPATH=str(ROOT / "src")))
    print(f"{args.requests} requests of {len(photos)} hymenoptera photos, {args.clients} concurrent clients, "
          f"engine {args.engine}, {os.cpu_count()} CPU(s), run {run}")
    batched = measure(run, args.engine, ("--max-batch", "32", "--max-wait-ms", "5"), photos, args.requests,
                      args.clients)
    print(describe("dynamic batching (--max-batch 32 --max-wait-ms 5)", batched, args.requests))
    single = measure(run, args.engine, ("--max-batch", "1",), photos, args.requests, args.clients)
    print(describe("no batching      (--max-batch 1)", single, args.requests))
    print(f"throughput ratio, batching / --max-batch 1: {single['seconds'] / batched['seconds']:.2f}x")
    for result in (batched, single):
        for error in result["errors"][:5]:
            print("error:", error)


if __name__ == "__main__":
    main()
