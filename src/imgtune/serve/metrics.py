"""The server's counters in Prometheus' text format (``GET /metrics``), kept by ``prometheus_client`` in a
registry of the app's own (two apps in one process, as in tests, never share counts). With ``--workers N``
each worker process counts its own requests."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _batch_buckets(max_batch: int) -> tuple[float, ...]:
    sizes, size = [], 1
    while size < max_batch:
        sizes.append(float(size))
        size *= 2
    return tuple(sizes) + (float(max_batch),)


class ServeMetrics:
    """Requests by endpoint and status, errors by kind, request latency, batch sizes and batch times,
    images by outcome, requests in flight and readiness."""

    def __init__(self, max_batch: int):
        disable_created_metrics()  # no *_created series: one less line per label set, nothing anyone reads
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("imgtune_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.errors = Counter("imgtune_errors", "Errors answered (whole requests and single images), by kind",
                              ["kind"], registry=r)
        self.images = Counter("imgtune_images", "Images received, by outcome", ["outcome"], registry=r)
        self.latency = Histogram("imgtune_request_duration_seconds", "Time to answer a request", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("imgtune_batch_size", "Images per model batch (dynamic batching)",
                                    buckets=_batch_buckets(max_batch), registry=r)
        self.batch_seconds = Histogram("imgtune_batch_duration_seconds", "Time the model takes per batch",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("imgtune_in_flight_requests", "Requests being answered", registry=r)
        self.ready = Gauge("imgtune_ready", "1 once the model is loaded and warmed up", registry=r)

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def error(self, kind: str) -> None:
        self.errors.labels(kind).inc()

    def batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def render(self, in_flight: int, ready: bool) -> tuple[bytes, str]:
        self.in_flight.set(in_flight)
        self.ready.set(1 if ready else 0)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
