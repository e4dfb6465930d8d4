"""imgtune serve RUN: the run as a web service (FastAPI on uvicorn) with a page to drop images on.

Endpoints: POST /predict, POST /explain, GET /healthz, /readyz, /metadata, /metrics, and the page at /;
OpenAPI at /docs (docs/serve.md). Concurrent requests are batched (--max-batch, --max-wait-ms) through the
predictor imgtune predict uses. Listens on 127.0.0.1 unless told otherwise; another address needs an API
key (--api-key-env NAME) or --insecure. SIGTERM: requests in flight finish, new ones get 503."""

from __future__ import annotations

from .args import positive_float, positive_int


def register(commands) -> None:
    p = commands.add_parser("serve", help="serve a run over HTTP: an API and a web page", description=__doc__)
    p.add_argument("run", help="run folder written by imgtune train")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    p.add_argument("--port", metavar="PORT", type=int, default=8000, help="default 8000")
    p.add_argument("--engine", choices=("auto", "torch", "onnxruntime"), default="auto",
                   help="onnxruntime runs the run's ONNX export (imgtune export RUN); auto (default) uses it when "
                        "it matches the run's weights, else torch")
    p.add_argument("--device", default="auto", help="torch engine: cpu, cuda, mps or auto")
    p.add_argument("--api-key-env", metavar="NAME",
                   help="require the API key held in environment variable NAME (X-API-Key or Authorization: "
                        "Bearer) on every endpoint but /healthz")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without an API key (warns)")
    p.add_argument("--max-batch", metavar="N", type=positive_int, default=32, help="most images per model batch (default 32)")
    p.add_argument("--max-wait-ms", metavar="MS", type=float, default=5.0,
                   help="how long a batch waits for more images (default 5 ms; 0: never waits)")
    p.add_argument("--workers", metavar="N", type=positive_int, default=1,
                   help="worker processes, each with its own copy of the model (default 1)")
    limits = p.add_argument_group("limits (what is refused with a 4xx or 503)")
    limits.add_argument("--max-upload-mb", metavar="MB", type=positive_float, default=20.0, help="request body (default 20)")
    limits.add_argument("--max-pixels", metavar="N", type=positive_int, default=50_000_000,
                        help="width x height of one image, checked before decoding (default 50000000)")
    limits.add_argument("--decode-timeout", metavar="SECONDS", type=positive_float, default=10.0, help="seconds per image (default 10)")
    limits.add_argument("--max-images", metavar="N", type=positive_int, default=32, help="images per request (default 32)")
    limits.add_argument("--max-concurrency", metavar="N", type=positive_int, default=64,
                        help="requests answered at once; more get 503 with Retry-After (default 64)")
    p.set_defaults(handler=run)


def run(args) -> int:
    from ..errors import UsageError

    try:
        from ..serve.limits import Limits
        from ..serve.server import serve
        from ..serve.service import ServeOptions
    except ImportError as exc:
        raise UsageError(f"imgtune serve needs FastAPI, uvicorn, python-multipart and prometheus-client "
                         f"({exc}): pip install 'imgtune[serve]'") from exc

    if args.max_wait_ms < 0 or not args.max_wait_ms < float("inf"):
        raise UsageError(f"--max-wait-ms must be 0 or more; got {args.max_wait_ms}")
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port must be between 0 and 65535; got {args.port}")
    limits = Limits(max_upload_bytes=int(args.max_upload_mb * (1 << 20)), max_pixels=args.max_pixels,
                    decode_timeout_s=args.decode_timeout, max_images=args.max_images,
                    max_concurrency=args.max_concurrency)
    options = ServeOptions(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, limits=limits)
    serve(args.run, args.host, args.port, args.engine, args.device, options, args.api_key_env, args.workers,
          args.insecure, "warning" if args.quiet else "info")
    return 0
