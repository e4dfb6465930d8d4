"""The images of a request: multipart form files in fields named ``file`` (repeat the field for several),
or a JSON body ``{"images": ["<Base64>", ...]}``. Whatever is malformed is an :class:`ApiError` (4xx)
saying what was wrong; a single file that is empty or not valid Base64 is that image's error, beside the
others."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from ..encode import from_base64
from .limits import ApiError, Limits

FIELD = "file"
NAME_CHARS = 200  # longest file name echoed back
CONTENT_TYPES = ("multipart/form-data", "application/json")


@dataclass(frozen=True)
class Upload:
    name: str  # the file name the client gave (shortened), or "image N"
    data: bytes
    error: tuple[str, str] | None = None  # (kind, message) when the bytes could not even be taken


async def read_uploads(request: Request, limits: Limits) -> list[Upload]:
    """The request's images, at least one and at most ``limits.max_images``."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in CONTENT_TYPES:
        raise ApiError(415, "unsupported-content-type", f"Content-Type {kind or '(none)'!r} is not accepted: "
                       "send images as multipart/form-data in fields named 'file', or JSON "
                       '{"images": ["<Base64>", ...]}')
    uploads = await (_multipart(request, limits) if kind == "multipart/form-data" else _json(request, limits))
    if not uploads:
        raise ApiError(400, "no-image", "the request holds no image: send files in fields named 'file', or "
                       'JSON {"images": ["<Base64>", ...]} with at least one')
    if len(uploads) > limits.max_images:
        raise _too_many(len(uploads), limits)
    return uploads


def _too_many(count: int | str, limits: Limits) -> ApiError:
    return ApiError(413, "too-many-images", f"{count} images in one request; at most {limits.max_images} "
                    "are accepted: split them over several requests")


async def _multipart(request: Request, limits: Limits) -> list[Upload]:
    try:
        form = await request.form(max_files=limits.max_images, max_fields=limits.max_images + 16,
                                  max_part_size=64 << 10)
    except HTTPException as exc:  # starlette's answer to a MultiPartException
        if "Too many files" in str(exc.detail):
            raise _too_many(f"more than {limits.max_images}", limits) from exc
        raise ApiError(400, "bad-multipart", f"malformed multipart body: {exc.detail}") from exc
    except ValueError as exc:  # python-multipart's own parse errors, which starlette >= 1.0 lets through
        raise ApiError(400, "bad-multipart", f"malformed multipart body: {exc}") from exc
    try:
        uploads = []
        for index, value in enumerate(form.getlist(FIELD)):
            if isinstance(value, UploadFile):
                uploads.append(Upload(_name(value.filename, index), await value.read()))
            else:
                uploads.append(Upload(f"image {index}", b"", ("not-a-file", "the 'file' field held text, not a "
                                                               "file: send the image as a file part")))
        return uploads
    finally:
        await form.close()  # spooled temporary files go now, not when collected


async def _json(request: Request, limits: Limits) -> list[Upload]:
    body = await request.body()
    if not body:
        raise ApiError(400, "empty-body", 'the JSON body is empty: send {"images": ["<Base64>", ...]}')
    return await asyncio.to_thread(_parse_json, body, limits)  # megabytes of JSON and Base64: off the loop


def _parse_json(body: bytes, limits: Limits) -> list[Upload]:
    try:
        values = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, "bad-json", f"the body is not valid JSON ({exc})") from exc
    images = values.get("images") if isinstance(values, dict) else None
    if not isinstance(images, list):
        raise ApiError(400, "bad-json", 'the JSON body must be an object {"images": ["<Base64>", ...]}')
    if len(images) > limits.max_images:
        raise _too_many(len(images), limits)
    return [_decoded(index, item) for index, item in enumerate(images)]


def _decoded(index: int, item) -> Upload:
    name = f"image {index}"
    if not isinstance(item, str):
        return Upload(name, b"", ("bad-encoding", "each image must be a Base64 string"))
    try:
        return Upload(name, from_base64(item))  # a data: URI is accepted as well
    except ValueError as exc:
        return Upload(name, b"", ("bad-encoding", f"not valid Base64 ({exc})"))


def _name(filename: str | None, index: int) -> str:
    name = (filename or "").strip()
    return name[:NAME_CHARS] if name else f"image {index}"
