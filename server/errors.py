"""Every failure becomes a JSON ``{"detail": "..."}`` with the right status, never a bare 500.

Image problems carry their own ``kind`` (415, 413, 422), parameter problems name the parameter
(422), overload is 429 with ``Retry-After``, an engine that is down is 503; anything else is a
bug of ours: logged with its traceback and answered with a JSON 500 that says so.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inference import ImageError, OptionError
from inference.backends.base import BackendUnavailable
from server.admission import Overloaded
from server.request_id import request_id

log = logging.getLogger("server")

IMAGE_ERROR_STATUS = {
    "unsupported": 415,  # not an image at all
    "too_large": 413,  # more pixels than --max-pixels
    "corrupt": 422,  # an image, but broken or truncated
    "unprocessable": 422,  # e.g. an aspect ratio too extreme to rescale
    "invalid": 422,
}
# Seconds a client should wait before retrying when the engine is down.
BACKEND_RETRY_AFTER_S = 5


class BadUpload(ValueError):
    """The request lacks what it must carry (no file, an empty file): HTTP 400."""


class TooManyFiles(ValueError):
    """More files in one batch than the server takes: HTTP 413."""


def image_error_status(error: ImageError) -> int:
    """The HTTP status for an image the service cannot use."""
    return IMAGE_ERROR_STATUS.get(error.kind, 422)


def image_error_message(error: ImageError) -> str:
    """A user-facing sentence for an image error."""
    return str(error)


def option_error_message(error: OptionError) -> str:
    """``"<parameter>: <what is wrong>"`` (``str(OptionError)`` already has this form)."""
    return str(error)


def _json(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


async def _image_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ImageError)
    return _json(image_error_status(exc), image_error_message(exc))


async def _option_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, OptionError)
    return _json(422, option_error_message(exc))


async def _bad_upload(_request: Request, exc: Exception) -> JSONResponse:
    return _json(400, str(exc))


async def _too_many_files(_request: Request, exc: Exception) -> JSONResponse:
    return _json(413, str(exc))


async def _overloaded(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Overloaded)
    request.app.state.server.metrics.rejected.inc()
    return _json(429, str(exc), {"Retry-After": str(exc.retry_after_s)})


async def _backend_unavailable(request: Request, exc: Exception) -> JSONResponse:
    backend = request.app.state.server.settings.backend
    return _json(
        503,
        f"the {backend} inference backend is unavailable: {exc} (retry in "
        f"{BACKEND_RETRY_AFTER_S} s; /readyz answers 200 once it is back)",
        {"Retry-After": str(BACKEND_RETRY_AFTER_S)},
    )


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's parameter errors as one sentence naming each parameter.

    A missing or non-file ``file``/``files`` field is the caller's request being malformed
    (400), not a bad parameter value (422).
    """
    assert isinstance(exc, RequestValidationError)
    problems = []
    status = 422
    for error in exc.errors():
        location = [str(part) for part in error.get("loc", ())]
        name = location[-1] if location else "request"
        if location[:1] == ["body"] and name in ("file", "files"):
            status = 400
            problems.append(
                f"{name}: expected an uploaded file in the multipart/form-data field {name!r} "
                f"(e.g. curl -F {name}=@photo.jpg ...)"
            )
            continue
        value = error.get("input")
        shown = f" (got {value!r})" if isinstance(value, str | int | float) else ""
        problems.append(f"{name}: {error.get('msg', 'invalid value')}{shown}")
    return _json(status, "; ".join(problems) or "invalid request")


def install_error_handlers(app: FastAPI) -> None:
    """Map the service's exceptions to JSON responses on ``app``."""
    app.add_exception_handler(ImageError, _image_error)
    app.add_exception_handler(OptionError, _option_error)
    app.add_exception_handler(BadUpload, _bad_upload)
    app.add_exception_handler(TooManyFiles, _too_many_files)
    app.add_exception_handler(Overloaded, _overloaded)
    app.add_exception_handler(BackendUnavailable, _backend_unavailable)
    app.add_exception_handler(RequestValidationError, _validation_error)


class UnexpectedErrorMiddleware:
    """Last line of defence: log the traceback, answer a JSON 500 that calls it a server bug.

    Sits inside the metrics middleware (so the 500 is counted) and keeps the exception from
    reaching uvicorn, which would log it a second time.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            identifier = request_id(scope)
            log.exception(
                "unexpected error on %s %s (request_id=%s)",
                scope["method"],
                scope["path"],
                identifier,
            )
            if started:
                raise  # the response is half sent: only dropping the connection is left
            body = json.dumps(
                {
                    "detail": f"internal server error ({type(exc).__name__}): this is a bug in "
                    "vggserve, not a problem with your request; it has been logged with its "
                    f"details under request id {identifier}. Please report it with that id."
                }
            ).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
