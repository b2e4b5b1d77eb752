"""The HTTP API of `s2clip serve` (FastAPI): ``POST /segment``, ``GET /health``, ``GET /methods``.

Every refusal is a 4xx (503 when the queue is full or the server stops) with
``{"error": "<one line>"}``; an upload over the limit is refused from its Content-Length before the
body is read, a body that grows past it while streaming is cut off, and both close the connection;
a stalled body gets 408 (`ClientGuard`). Needs the ``serve`` extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import S2ClipError, first_line, one_line
from .serve_service import RequestError, SegmentOutcome, SegmentService, mask_png, outcome_json

FIELDS = ("image", "classes", "background", "no_background", "method", "sam", "sd", "precision")
FORM_OVERHEAD = 64 * 2**10  # multipart boundaries and the text fields, on top of the image
FIELD_BYTES = 16 * 2**10  # one text field
FORMATS = ("json", "png")

log = logging.getLogger("uvicorn.error")  # beside uvicorn's own lines, in its format


def _png_answer(outcome: SegmentOutcome) -> tuple[bytes, list[str]]:
    return mask_png(outcome), outcome.classes


ANSWERS: dict[str, Callable[[SegmentOutcome], Any]] = {"json": outcome_json, "png": _png_answer}


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": one_line(message)}, status_code=status)


class UploadTooLarge(Exception):
    """Raised from the request's `receive` once its body passes the limit."""


class BodyTimeout(Exception):
    """Raised from the request's `receive` when the client sends no body bytes for the read timeout."""


CLOSE = {"Connection": "close"}


def closing_error(status: int, message: str) -> JSONResponse:
    """An error answer after which the connection is closed (the rest of the request is not read)."""
    return JSONResponse({"error": one_line(message)}, status_code=status, headers=CLOSE)


class ClientGuard:
    """ASGI middleware that keeps one client from holding or flooding the server:

    - bodies over `max_bytes` get 413 with ``Connection: close`` (uvicorn then closes the socket and
      reads no more of the body): from the Content-Length header before anything is read, or as soon
      as a streamed (chunked) body passes the limit; any answer given before the body is read whole
      (a malformed form, say) closes the connection too, so no body is ever read to be thrown away;
    - a body that stalls (no bytes for `read_timeout_s` while the server waits for them) gets 408
      and the connection closed;
    - a client that goes away mid-request is one line in the log (no traceback);
    - a request still running when the server stops is answered 503 (no traceback).
    """

    def __init__(self, app: ASGIApp, max_bytes: int, message: str, read_timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.message = message
        self.read_timeout_s = read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.strip().isdigit() or int(length) > self.max_bytes):
            response = (closing_error(413, self.message) if length.strip().isdigit()
                        else closing_error(400, "bad Content-Length header"))
            await response(scope, receive, send)
            return
        # Over HTTP/1.1 a body comes with a Content-Length over 0 or as chunks.
        has_body = (length is not None and int(length) > 0) or b"chunked" in headers.get(b"transfer-encoding", b"")
        received = 0
        body_done = False  # the body's last message has arrived
        started = False

        async def guarded_receive() -> Message:
            nonlocal received, body_done
            if body_done:  # only http.disconnect is left to come: wait as long as it takes
                return await receive()
            try:
                async with asyncio.timeout(self.read_timeout_s):
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.max_bytes:
                    raise UploadTooLarge
            else:
                body_done = True
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                sent_headers = list(message.get("headers", []))
                if has_body and not body_done and all(name.lower() != b"connection" for name, _ in sent_headers):
                    # answered before the body was read whole: close rather than read the rest for nothing
                    message = {**message, "headers": [*sent_headers, (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, guarded_receive, tracking_send)
        except UploadTooLarge:
            if not started:
                await closing_error(413, self.message)(scope, receive, send)
        except BodyTimeout:
            log.warning("closed the connection of %s: its %s %s body stalled for %g s (%d bytes received)",
                        _client(scope), scope["method"], _path(scope), self.read_timeout_s, received)
            if not started:
                await closing_error(408, f"request body stalled for {self.read_timeout_s:g} s")(scope, receive, send)
        except ClientDisconnect:
            log.warning("%s disconnected during %s %s (%d bytes received)", _client(scope), scope["method"],
                        _path(scope), received)
        except asyncio.CancelledError:  # the server stops and cancels what still runs after its grace time
            if not started:
                with contextlib.suppress(Exception):
                    await closing_error(503, "the server is stopping")(scope, receive, send)


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return f"client {client[0]}:{client[1]}" if client else "a client"


def _path(scope: Scope) -> str:
    """The request's path for a log line: escaped (it is the client's, %0A included) and bounded."""
    return ascii(scope.get("path", ""))[1:-1][:200]


def wanted_format(query: str | None, accept: str | None) -> str:
    """``json`` or ``png``: the ``format`` query parameter, else the Accept header (PNG when it asks
    for image/png and not for JSON), else JSON."""
    if query is not None:
        fmt = query.strip().lower()
        if fmt not in FORMATS:
            raise RequestError(f"unknown format {query[:20]!r}; choose one of: {', '.join(FORMATS)}")
        return fmt
    accept = (accept or "").lower()
    return "png" if "image/png" in accept and "application/json" not in accept else "json"


async def _form_fields(request: Request, max_upload: int) -> tuple[UploadFile, dict[str, str]]:
    """The uploaded image and the text fields of a multipart form; `RequestError` for anything else."""
    try:
        form = await request.form(max_files=1, max_fields=len(FIELDS) + 2, max_part_size=FIELD_BYTES)
    except UploadTooLarge:
        raise
    except (StarletteHTTPException, MultiPartException, ValueError, KeyError) as exc:
        detail = getattr(exc, "detail", None) or getattr(exc, "message", None) or str(exc)
        raise RequestError(f"malformed form: {detail}") from None
    unknown = sorted(k for k in form.keys() if k not in FIELDS)
    if unknown:
        await form.close()
        raise RequestError(f"unknown field {unknown[0][:40]!r}; fields: {', '.join(FIELDS)}")
    upload = form.get("image")
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    if not isinstance(upload, UploadFile):
        await form.close()
        raise RequestError("no image: send the image as the multipart file field 'image'")
    if upload.size is not None and upload.size > max_upload:
        await form.close()
        raise RequestError(f"image: the upload is over {max_upload / 2**20:g} MB", status=413)
    return upload, fields


def create_app(service: SegmentService) -> FastAPI:
    """The API app (the page is mounted on it by `commands.serve`)."""
    limits = service.limits
    app = FastAPI(title="s2clip", summary="Training-free open-vocabulary segmentation", docs_url=None,
                  redoc_url=None)
    app.add_middleware(ClientGuard, max_bytes=limits.max_upload_bytes + FORM_OVERHEAD,
                       message=f"upload too large: at most {limits.max_upload_bytes / 2**20:g} MB",
                       read_timeout_s=limits.read_timeout_s)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        what = errors[0].get("msg", "invalid request") if errors else "invalid request"
        return error_response(422, f"invalid request: {what}")

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"internal error ({type(exc).__name__}: {first_line(exc)[:200]})")

    @app.get("/health")
    def health() -> dict[str, Any]:
        """Whether the server is up, what it loaded and how many requests are queued."""
        return service.health()

    @app.get("/methods")
    def methods() -> dict[str, Any]:
        """The methods this server runs (`method` field of /segment); the first is the default."""
        return {"default": service.default_method, "methods": service.method_info()}

    @app.post("/segment", response_model=None)
    async def segment(request: Request, format: str | None = None) -> Response:
        """Multipart form: ``image`` (file), ``classes`` (``cat,dog; puppy``), optional
        ``background`` ('; '-separated names), ``no_background``, ``method``, ``sam``, ``sd``,
        ``precision``. Answers JSON (RLE masks, shares), or the mask PNG with ``?format=png`` or
        ``Accept: image/png``."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            fmt = wanted_format(format, request.headers.get("accept"))
            upload, fields = await _form_fields(request, limits.max_upload_bytes)
            try:
                req = service.parse_request(fields)
                data = await upload.read(limits.max_upload_bytes + 1)
                if len(data) > limits.max_upload_bytes:
                    raise RequestError(f"image: the upload is over {limits.max_upload_bytes / 2**20:g} MB", 413)
            finally:
                await upload.close()
            # Decoding, segmenting and the answer run on the worker: one hand-off per request.
            answer = await asyncio.wrap_future(service.submit_upload(data, upload.filename, req, ANSWERS[fmt]))
        except RequestError as exc:
            return error_response(exc.status, str(exc))
        except S2ClipError as exc:  # e.g. a precision this device cannot run
            return error_response(400, str(exc))
        if fmt == "png":
            body, classes = answer
            return Response(body, media_type="image/png",
                            headers={"X-S2clip-Classes": json.dumps(classes, ensure_ascii=True)})
        answer["timings_s"]["total"] = round(loop.time() - started, 4)
        return JSONResponse(answer)

    return app
