"""Helpers of the ``imgtune serve`` tests: a tiny trained run, the app served on 127.0.0.1 in a thread of
this process (uvicorn, a real socket) or as ``imgtune serve`` in a child process, and what a client sends.

Every server here listens on loopback only, on a free port, and is stopped by the test that started it."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from datagen import SCRATCH_ARGS, make_split_dataset

SRC = Path(__file__).resolve().parents[1] / "src"
HOST = "127.0.0.1"


def train_tiny(root: Path, per_class: int = 8) -> tuple[Path, Path]:
    """(run folder, data folder) in ``root``: the tiny scratch CNN, one epoch, through the Python API."""
    import imgtune

    data = make_split_dataset(root / "data", train=per_class, val=3)
    result = imgtune.train(str(data), model=SCRATCH_ARGS[1], img_size=32, strategy="scratch", epochs=1,
                           num_workers=0, out=str(root / "run"), progress=False)
    return Path(result.run_dir), data


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    return train_tiny(tmp_path_factory.mktemp("serve"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def png_bytes(image: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save)
    return buffer.getvalue()


def jpeg_bytes(size=(64, 48), seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def wait_ready(base: str, timeout: float = 60, headers: dict | None = None,
               process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{process.stderr.read()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/readyz", headers=headers, timeout=2).status_code == 200:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{base} not ready in {timeout} s")


@contextlib.contextmanager
def served(service) -> Iterator[str]:
    """``service``'s app under uvicorn in a thread, on a free loopback port; yields the base URL."""
    import uvicorn

    from imgtune.serve.app import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service), host=HOST, port=port, log_config=None,
                                           log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://{HOST}:{port}"
    try:
        wait_ready(base, headers={"X-API-Key": service.options.api_key} if service.options.api_key else None)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextlib.contextmanager
def serve_process(run: Path, *args: str, env: dict | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """``imgtune serve RUN ARGS`` in a child process on a free loopback port; yields (base URL, process)."""
    port = free_port()
    environment = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **(env or {})}
    process = subprocess.Popen([sys.executable, "-m", "imgtune", "-q", "serve", str(run), "--host", HOST,
                                "--port", str(port), *args], env=environment, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    base = f"http://{HOST}:{port}"
    try:
        key = (env or {}).get("IMGTUNE_TEST_KEY")
        wait_ready(base, headers={"X-API-Key": key} if key else None, process=process)
        yield base, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) * 1024


def open_slow_request(base: str, path: str = "/predict", headers: dict | None = None,
                      length: int = 1000) -> socket.socket:
    """A request whose headers are sent and whose body is not: it stays in flight until
    :func:`finish_slow_request`."""
    host, port = base.removeprefix("http://").split(":")
    conn = socket.create_connection((host, int(port)), timeout=30)
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    conn.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {length}\r\n{extra}\r\n".encode())
    return conn


def finish_slow_request(conn: socket.socket, body: bytes, length: int = 1000) -> int:
    """Send the rest of the body (padded with spaces to ``length``); the response's status."""
    conn.sendall(body + b" " * (length - len(body)))
    response = b""
    while b"\r\n" not in response:
        chunk = conn.recv(4096)
        if not chunk:
            break
        response += chunk
    conn.close()
    return int(response.split(b" ", 2)[1])
