"""Request bodies over the upload limit are refused while they arrive, not after.

A declared ``Content-Length`` over the limit is answered 413 before one byte of the body is read;
a body without one (chunked) is counted as it streams in and refused as soon as it passes the
limit, so multipart parsing never spools an oversized upload to memory or disk.
"""

from __future__ import annotations

import json

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class UploadTooLarge(HTTPException):
    """The request body passed the limit (HTTP 413)."""

    def __init__(self, limit_bytes: int, declared: int | None = None) -> None:
        limit = f"{limit_bytes / 2**20:g} MB"
        if declared is not None:
            size = f"the upload is {declared / 2**20:.1f} MB, over the limit of {limit}"
        else:
            size = f"the upload passed the limit of {limit} while it was streaming in"
        super().__init__(
            status_code=413,
            detail=f"{size}; send a smaller (downscaled or compressed) image, or start the "
            "server with a larger --max-upload-mb",
            # The unread rest of the body makes the connection unusable for another request.
            headers={"Connection": "close"},
        )


class UploadLimitMiddleware:
    """ASGI middleware enforcing ``limit_bytes`` on every HTTP request body."""

    def __init__(self, app: ASGIApp, limit_bytes: int) -> None:
        self.app = app
        self.limit_bytes = limit_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.limit_bytes:
            await _send_413(send, UploadTooLarge(self.limit_bytes, declared))
            return

        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit_bytes:
                    # Raised inside the body reader: FastAPI passes HTTPExceptions through, so
                    # the multipart parser stops here and the exception handler answers 413.
                    raise UploadTooLarge(self.limit_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except UploadTooLarge as exc:  # read outside a route (none today): answer here
            if started:
                raise
            await _send_413(send, exc)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the HTTP server rejects a malformed length itself
    return None


async def _send_413(send: Send, exc: UploadTooLarge) -> None:
    body = json.dumps({"detail": exc.detail}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})
