"""Every response carries an ``X-Request-ID``, and one log line per request names it.

The id is the client's own when it sent a usable one (a proxy's or a caller's trace id), else a
fresh uuid4 in hex. The log line (logger ``server.access``, INFO) has the client address, the
request line, the status, the time taken and the id, so an error a user reports by its id can be
found in the log; it replaces uvicorn's access log, which has neither the time nor the id.
"""

from __future__ import annotations

import logging
import re
import time
import urllib.parse
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "X-Request-ID"
_HEADER_KEY = HEADER.lower().encode()
# Token characters only, bounded: the id is echoed into a response header and written into a log
# line, so nothing that could split either (spaces, quotes, control characters) is taken as is.
ACCEPTED_ID = re.compile(r"[A-Za-z0-9._:/+=@~-]{1,128}")

access_log = logging.getLogger("server.access")


def request_id(scope: Scope) -> str | None:
    """The id :class:`RequestIdMiddleware` gave this request (None outside it)."""
    return scope.get("state", {}).get("request_id")


def chosen_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's ``X-Request-ID`` if it sent an acceptable one, else a new uuid4 hex."""
    for name, value in headers:
        if name.lower() == _HEADER_KEY:
            text = value.decode("latin-1")
            if ACCEPTED_ID.fullmatch(text):
                return text
            break  # only the first one counts; an unusable one is replaced, not searched past
    return uuid.uuid4().hex


class RequestIdMiddleware:
    """Outermost middleware: sets the id on every HTTP response and logs one line per request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        identifier = chosen_id(scope.get("headers", []))
        scope.setdefault("state", {})["request_id"] = identifier
        status: int | None = None

        async def labelled_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [
                    (name, value)
                    for name, value in message.get("headers", [])
                    if name.lower() != _HEADER_KEY
                ]
                headers.append((_HEADER_KEY, identifier.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, labelled_send)
        finally:
            access_log.info(
                '%s - "%s %s HTTP/%s" %s %.1f ms request_id=%s',
                _client(scope),
                scope["method"],
                _target(scope),
                scope.get("http_version", "1.1"),
                status if status is not None else "-",  # no answer was sent (disconnect, crash)
                (time.perf_counter() - started) * 1e3,
                identifier,
            )


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "-"


def _target(scope: Scope) -> str:
    """The path as the client sent it, quoted as uvicorn quotes it, with the query string."""
    path = urllib.parse.quote(scope["path"])
    query = scope.get("query_string", b"")
    return f"{path}?{query.decode('latin-1')}" if query else path
