"""The HTTP API (FastAPI; OpenAPI at ``/docs``): ``POST /predict``, ``POST /explain``, ``GET /healthz``,
``/readyz``, ``/metadata``, ``/metrics`` and the page at ``/``. Every error is JSON
``{"error": {"kind", "message"}}`` with a 4xx status (503 when busy, loading or shutting down); an
unexpected failure is logged and answered 500 in the same shape, never a dropped connection."""

from __future__ import annotations

import contextlib
import logging
from urllib.parse import quote

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException

from .limits import ApiError, Guard
from .page import render_page
from .server import drain_on_sigterm
from .service import DEFAULT_METHOD, OVERLAY_MAX_SIDE, SERVED_METHODS, Service
from .uploads import read_uploads

log = logging.getLogger(__name__)

ENDPOINTS = ("/", "/predict", "/explain", "/healthz", "/readyz", "/metadata", "/metrics", "/docs", "/openapi.json")
_IMAGES_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "file": {"type": "array", "items": {"type": "string", "format": "binary"},
                 "description": "one or several images (repeat the field)"}}}},
    "application/json": {"schema": {"type": "object", "required": ["images"], "properties": {
        "images": {"type": "array", "items": {"type": "string", "format": "byte"},
                   "description": "image files, each as Base64 text"}}}}}}}
_ONE_IMAGE_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary"}}}}}}}


def create_app(service: Service) -> FastAPI:
    """The app serving ``service``; the model warms up when the app starts (``/readyz`` says when)."""

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        await service.start()
        drain_on_sigterm(service.state)
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="imgtune", version=service.metadata()["imgtune"], lifespan=lifespan,
                  description=f"Image classifier served by imgtune: {', '.join(service.classes)}")
    key = service.options.api_key.encode("utf-8") if service.options.api_key else None
    app.add_middleware(Guard, limits=service.options.limits, state=service.state, metrics=service.metrics,
                       key=key, endpoints=ENDPOINTS)
    _error_handlers(app, service)
    _info_routes(app, service)
    _model_routes(app, service)
    return app


def _error_handlers(app: FastAPI, service: Service) -> None:
    def answer(error: ApiError) -> JSONResponse:
        service.metrics.error(error.kind)
        return error.response()

    @app.exception_handler(ApiError)
    async def api_error(_request, exc: ApiError):
        return answer(exc)

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(_request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in exc.errors())
        return answer(ApiError(422, "bad-parameter", problems or "invalid parameters"))

    @app.exception_handler(HTTPException)
    async def http_error(_request, exc: HTTPException):
        kind = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "bad-request")
        return answer(ApiError(exc.status_code, kind, str(exc.detail), dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def unexpected(_request, exc: Exception):
        log.error("unexpected failure answering a request", exc_info=exc)
        return answer(ApiError(500, "internal", "the server failed unexpectedly (a bug in imgtune; see its log)"))


def _info_routes(app: FastAPI, service: Service) -> None:
    @app.get("/", response_class=HTMLResponse, summary="The page: drop an image, see the top 5 and the heat map")
    async def page():
        return HTMLResponse(render_page(service.metadata()))

    @app.get("/healthz", summary="The process is up")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="The model is loaded and a warm-up prediction is done")
    async def readyz():
        if service.state.draining:
            return JSONResponse({"status": "shutting-down"}, status_code=503)
        if not service.state.ready:
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "1"})
        return {"status": "ready", "engine": service.engine}

    @app.get("/metadata", summary="Classes, preprocessing, metrics with intervals, model card, limits")
    async def metadata():
        return service.metadata()

    @app.get("/metrics", summary="Prometheus text format: requests, errors by kind, latency, batch sizes")
    async def metrics():
        body, content_type = service.metrics.render(service.state.in_flight, service.state.ready)
        return Response(body, media_type=content_type)


def _model_routes(app: FastAPI, service: Service) -> None:
    @app.post("/predict", openapi_extra=_IMAGES_BODY,
              summary="Labels and probabilities of one or several images, in order; errors per image")
    async def predict(request: Request, top_k: int = Query(3, ge=1, le=1000),
                      calibrated: bool = Query(False, description="temperature-scaled probabilities")):
        uploads = await read_uploads(request, service.options.limits)
        results = await service.predict(uploads, top_k, calibrated)
        body = {"engine": service.engine, "calibrated": calibrated, "results": results}
        if all("error" in r for r in results):
            service.metrics.error("no-readable-image")
            return _all_failed(results)
        return body

    @app.post("/explain", openapi_extra=_ONE_IMAGE_BODY, response_class=Response,
              responses={200: {"content": {"image/png": {}}, "description": "the heat map over the image"}},
              summary=f"Heat map overlay (PNG, {DEFAULT_METHOD} by default) for the predicted or a named class")
    async def explain(request: Request,
                      method: str = Query(DEFAULT_METHOD, description=f"one of {', '.join(SERVED_METHODS)}"),
                      class_name: str | None = Query(None, alias="class", description="default: predicted"),
                      max_side: int = Query(OVERLAY_MAX_SIDE, ge=16, le=8192)):
        uploads = await read_uploads(request, service.options.limits)
        if len(uploads) != 1:
            raise ApiError(400, "one-image", f"/explain takes one image; got {len(uploads)}")
        png, info = await service.explain(uploads[0], class_name, method, max_side)
        headers = {f"X-Imgtune-{k.replace('_', '-').title()}": quote(str(v), safe=" +()")
                   for k, v in info.items()}
        return Response(png, media_type="image/png", headers=headers)


def _all_failed(results: list[dict]) -> JSONResponse:
    error = ApiError(422, "no-readable-image", "none of the images could be read; each one's reason is in "
                     "results")
    return error.response({"results": results})
