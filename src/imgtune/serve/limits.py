"""What the server refuses, and how: the limits of a request (:class:`Limits`), the one error shape every
refusal takes (:class:`ApiError` -> ``{"error": {"kind", "message"}}``), and the ASGI :class:`Guard` that runs
before any endpoint: the API key, draining on shutdown, the concurrency limit (503 + ``Retry-After``) and the
upload size (413, counted on the bytes received, whatever ``Content-Length`` claims).

Decompression bombs are refused by imgtune's decoder itself (:mod:`imgtune.data.decode` reads the header and
checks the pixel count against ``PIL.Image.MAX_IMAGE_PIXELS`` before decoding any pixel); the server sets
that limit from :attr:`Limits.max_pixels`.
"""

from __future__ import annotations

import hmac
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from starlette.responses import JSONResponse

from ..encode import from_base64
from ..errors import UsageError

if TYPE_CHECKING:
    from .metrics import ServeMetrics

OPEN_PATHS = ("/healthz",)  # answered without the key, even while draining
RETRY_AFTER_S = 1
MAX_HEADER_BYTES = 32 << 10  # all request headers together (h11 only bounds headers that arrive in pieces)


@dataclass(frozen=True)
class Limits:
    max_upload_bytes: int = 20 << 20  # the whole request body
    max_pixels: int = 50_000_000  # width x height of one image, checked from its header
    decode_timeout_s: float = 10.0  # per image
    max_images: int = 32  # per request
    max_concurrency: int = 64  # requests being answered at once; more get 503 + Retry-After

    def __post_init__(self):
        for name, value in asdict(self).items():
            if not value > 0:
                raise UsageError(f"the server's {name.replace('_', '-')} must be positive; got {value}")

    def to_dict(self) -> dict:
        return asdict(self)


class ApiError(Exception):
    """A refusal the client can act on: an HTTP status, a short ``kind`` a program can test, a message that
    says what to do."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message
        self.headers = headers or {}

    def response(self, extra: dict | None = None) -> JSONResponse:
        body = {"error": {"kind": self.kind, "message": self.message}, **(extra or {})}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def key_matches(headers: dict[str, str], key: bytes) -> bool:
    """True when the request carries ``key`` as ``X-API-Key``, ``Authorization: Bearer KEY`` or as the
    password of HTTP Basic (how a browser sends it for the page). Compared in constant time."""
    offered = [headers.get("x-api-key", "")]
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        offered.append(value.strip())
    elif scheme.lower() == "basic":
        try:
            offered.append(from_base64(value.strip()).decode("utf-8").partition(":")[2])
        except (ValueError, UnicodeDecodeError):
            pass
    found = False
    for candidate in offered:  # every candidate compared, so the time does not say which form matched
        found |= hmac.compare_digest(candidate.encode("utf-8", "surrogateescape"), key)
    return found


class ServerState:
    """What the guard and the endpoints share: readiness, draining, and the requests in flight."""

    def __init__(self):
        self.ready = False
        self.draining = False
        self.in_flight = 0


class Guard:
    """ASGI middleware in front of every endpoint (see the module's docstring). ``endpoints``: the paths
    metrics are labelled with; anything else is counted as ``other`` (no label per random path)."""

    def __init__(self, app, limits: Limits, state: ServerState, metrics: "ServeMetrics", key: bytes | None,
                 endpoints: tuple[str, ...]):
        self.app, self.limits, self.state, self.metrics, self.key = app, limits, state, metrics, key
        self.endpoints = endpoints

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        endpoint = scope["path"] if scope["path"] in self.endpoints else "other"
        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                self.metrics.error(refusal.kind)
                return await refusal.response()(scope, receive, sending)
            self.state.in_flight += 1
            try:
                await self.app(scope, self._bounded(receive), sending)
            finally:
                self.state.in_flight -= 1
        finally:
            self.metrics.request(endpoint, status[0], time.perf_counter() - start)

    def _refusal(self, scope) -> ApiError | None:
        size = sum(len(k) + len(v) for k, v in scope["headers"])
        if size > MAX_HEADER_BYTES:
            return ApiError(431, "headers-too-large", f"the request headers ({size} bytes) are over the limit of "
                            f"{MAX_HEADER_BYTES} bytes", {"Connection": "close"})
        if scope["path"] in OPEN_PATHS:
            return None
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.key is not None and not key_matches(headers, self.key):
            return ApiError(401, "unauthorized", "a valid API key is needed: send it as `X-API-Key: KEY` or "
                            "`Authorization: Bearer KEY`", {"WWW-Authenticate": 'Basic realm="imgtune"'})
        if self.state.draining:
            return ApiError(503, "shutting-down", "the server is shutting down; retry on another instance",
                            {"Retry-After": str(RETRY_AFTER_S), "Connection": "close"})
        if self.state.in_flight >= self.limits.max_concurrency:
            return ApiError(503, "busy", f"the server is answering {self.limits.max_concurrency} requests "
                            "already (its concurrency limit); retry after a second",
                            {"Retry-After": str(RETRY_AFTER_S)})
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.limits.max_upload_bytes:
            return self._too_large(int(length))
        return None

    def _too_large(self, size: int) -> ApiError:
        return ApiError(413, "too-large", f"the request body ({size} bytes or more) is over the limit of "
                        f"{self.limits.max_upload_bytes} bytes; send smaller or fewer images",
                        {"Connection": "close"})

    def _bounded(self, receive):
        """``receive`` that raises :class:`ApiError` 413 once the body passes the limit (a body sent
        chunked, or longer than its Content-Length, is counted too); endpoints turn it into the answer."""
        received = 0

        async def bounded():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limits.max_upload_bytes:
                    raise self._too_large(received)
            return message
        return bounded
