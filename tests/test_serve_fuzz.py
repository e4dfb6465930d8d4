"""``imgtune serve`` as a child process on 127.0.0.1 against hostile clients: over 1,000 malformed or
hostile requests get no 5xx, the server still answers ``/readyz`` and its resident memory grows by less
than 200 MB; SIGTERM lets the request in flight finish while a new one gets 503."""

from __future__ import annotations

import base64
import json
import random
import signal
import struct
import time
import zlib
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image

from serving import (finish_slow_request, jpeg_bytes, open_slow_request, png_bytes, rss_bytes,  # noqa: F401
                     serve_process, tiny_run)

pytestmark = pytest.mark.slow  # the child server imports torch (about 20 s on a shared machine)

MAX_PIXELS = 4_000_000
ARGS = ("--max-upload-mb", "2", "--max-pixels", str(MAX_PIXELS), "--max-images", "8", "--decode-timeout", "5",
        "--max-wait-ms", "2")
REQUESTS = 1100


@pytest.fixture(scope="module")
def server(tiny_run):
    with serve_process(tiny_run[0], *ARGS) as (base, process):
        yield base, process


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header says ``width`` x ``height`` and whose data is a few bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1024))
            + chunk(b"IEND", b""))


def text_bomb_png() -> bytes:
    """A valid 8x8 PNG carrying a zTXt chunk that inflates to 64 MB."""
    raw = png_bytes(Image.new("RGB", (8, 8)))
    payload = b"Comment\0\0" + zlib.compress(b"\0" * (64 << 20), 9)
    chunk = struct.pack(">I", len(payload)) + b"zTXt" + payload + struct.pack(">I", zlib.crc32(b"zTXt" + payload))
    return raw[:33] + chunk + raw[33:]


def hostile_requests(rng: random.Random) -> Iterator[tuple[str, str, dict]]:
    """(method, path, httpx keyword arguments), forever, cycling through the kinds of attack."""
    jpeg, png = jpeg_bytes((96, 72)), png_bytes(Image.new("RGB", (64, 48), (200, 30, 30)))
    bombs = [png_declaring(50_000, 50_000), png_declaring(2**31 - 1, 1), png_declaring(0, 0),
             png_bytes(Image.new("L", (3000, 3000)), optimize=True), text_bomb_png(),
             png_bytes(Image.new("RGB", (1900, 1900)), optimize=True)]  # under the limit: decodes, 11 MB

    def files(*items):
        return {"files": [("file", (f"f{i}.png", data)) for i, data in enumerate(items)]}

    kinds = [
        lambda: ("POST", "/predict", files(rng.randbytes(rng.randint(1, 5000)))),
        lambda: ("POST", "/predict", files(jpeg[:rng.randint(1, len(jpeg) - 1)])),
        lambda: ("POST", "/predict", files(png[:rng.randint(1, len(png) - 1)])),
        lambda: ("POST", "/predict", files(rng.choice(bombs))),
        lambda: ("POST", "/predict", {"content": rng.randbytes(200), "headers": {"Content-Type": rng.choice(
            ["text/plain", "image/png", "application/xml", "", "multipart/mixed", "application/x-www-form-urlencoded",
             "multipart/form-data; boundary=", "application/json; charset=utf-7"])}}),
        lambda: ("GET", "/metadata", {"headers": {"X-Filler": "a" * rng.choice([20_000, 70_000, 200_000])}}),
        lambda: ("POST", "/predict", {"content": b"--b\r\nContent-Disposition: form-data; name=\"file\"; "
                                      b"filename=\"e.png\"\r\n\r\n\r\n--b--\r\n",
                                      "headers": {"Content-Type": "multipart/form-data; boundary=b"}}),
        lambda: ("POST", "/predict", {"content": rng.randbytes(300),
                                      "headers": {"Content-Type": "multipart/form-data; boundary=zz"}}),
        lambda: ("POST", "/predict", {"json": {"images": [rng.choice(["!!", "AAA", "====", "data:,%%", "\u00e9"]),
                                                          rng.randint(0, 9), None]}}),
        lambda: ("POST", "/predict", {"content": b"[" * 100_000, "headers": {"Content-Type": "application/json"}}),
        lambda: ("POST", "/predict", {"content": json.dumps({"images": [base64.b64encode(
            rng.randbytes(64)).decode()] * 3}).encode(), "headers": {"Content-Type": "application/json"}}),
        lambda: ("POST", "/predict", files(*[jpeg[:100]] * rng.randint(9, 60))),
        lambda: ("POST", "/predict", files(rng.randbytes(3 << 20))),
        lambda: ("POST", rng.choice(["/explain", "/explain?method=nope", "/explain?class=%00"]),
                 files(rng.choice([rng.randbytes(100), png_declaring(50_000, 50_000), b""]))),
        lambda: (rng.choice(["GET", "PUT", "DELETE", "PATCH"]), rng.choice(["/predict", "/explain", "/x" * 50]), {}),
        lambda: ("POST", f"/predict?top_k={rng.choice(['-1', 'abc', '1e9', '99999999999999999999'])}"
                 f"&calibrated={rng.choice(['maybe', '1', ''])}", files(png)),
        lambda: ("POST", "/predict", files(png, b"", rng.randbytes(50), jpeg)),
    ]
    while True:
        for kind in kinds:
            yield kind()


def test_a_thousand_hostile_requests_get_no_5xx_and_no_leak(server):
    base, process = server
    rng = random.Random(0)
    before = rss_bytes(process.pid)
    statuses: Counter = Counter()
    failures = []
    started = time.monotonic()
    with httpx.Client(base_url=base, timeout=30) as client:
        for _, (method, path, kwargs) in zip(range(REQUESTS), hostile_requests(rng)):
            try:
                status = client.request(method, path, **kwargs).status_code
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
                status = "closed"  # refused (413, 431) and closed while the client was still sending: not a 5xx
            statuses[status] += 1
            if isinstance(status, int) and status >= 500:
                failures.append((method, path, status))
    seconds = time.monotonic() - started
    grown = rss_bytes(process.pid) - before
    assert sum(statuses.values()) >= 1000 and not failures, (failures[:5], statuses)
    assert statuses["closed"] < 0.1 * REQUESTS and statuses[431] > 0, statuses
    assert httpx.get(f"{base}/readyz").status_code == 200
    assert grown < 200 << 20, f"resident memory grew by {grown / 2**20:.0f} MB"
    print(f"{REQUESTS} hostile requests in {seconds:.1f} s: {dict(statuses)}; RSS +{grown / 2**20:.1f} MB")


def test_sigterm_finishes_the_request_in_flight_and_refuses_new_ones(server, tiny_run):
    base, process = server
    image = base64.b64encode(sorted((tiny_run[1] / "val").glob("*/*.png"))[0].read_bytes())
    body = b'{"images": ["' + image + b'"]}'
    held = open_slow_request(base, length=len(body) + 10)
    time.sleep(0.3)  # the request is in flight: its headers are in, its body is not
    process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    refused = httpx.get(f"{base}/metadata")
    assert refused.status_code == 503 and refused.json()["error"]["kind"] == "shutting-down"
    assert refused.headers["Retry-After"]
    assert httpx.get(f"{base}/readyz").status_code == 503
    assert finish_slow_request(held, body, length=len(body) + 10) == 200
    assert process.wait(timeout=20) in (0, -signal.SIGTERM)
