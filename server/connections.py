"""Connections at the HTTP layer: every client hears its answer, stalled clients are released,
and open connections are bounded.

uvicorn's h11 protocol, with three changes (:func:`protocol_class`):

- **Lingering close.** An answer sent before the request body has been read (a 413 judged from
  the Content-Length, any error) is followed by a half close (FIN) and by reading and
  discarding the rest of the body, as nginx's ``lingering_close`` does, before the socket is
  closed: closing with unread bytes makes the kernel send a reset, which destroys the answer
  in a client that sends its whole body before it reads (``urllib.request``, Java's
  ``HttpURLConnection``). The draining stops at the end of the body, at the client's close,
  after ``LINGER_BYTES`` or after ``LINGER_SECONDS``, whichever comes first.
- **Client timeout.** A connection that sends no byte for ``client_timeout`` seconds while the
  server waits for its request head or body gets a JSON 408 and is closed; one that has sent
  nothing since it opened (or since its last answer, past uvicorn's keep-alive timeout) is
  closed without an answer. The request's task sees the client gone, so its upload (Starlette
  spools files over 1 MB to a temporary file) and anything it holds are freed. Time while the
  server has paused reading (uvicorn's back-pressure on a body the app has not pulled) counts
  too, with bytes piling up unread in the socket counted as bytes from the client.
- **Connection limit.** Beyond ``max_connections`` open connections a new one is answered a
  JSON 503 with Retry-After, then closed with the same lingering close.
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import json
import logging
import resource
import termios
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("server")

# The rest of a body is drained for at most this long and this many bytes after an early answer.
LINGER_SECONDS = 5.0
LINGER_BYTES = 64 * 2**20
# What the server asks a client refused for the connection limit to wait before it retries.
RETRY_AFTER_S = 1
# File descriptors beyond the connections: the models, logs, spooled uploads, the event loop.
SPARE_FILES = 256


def json_response(status: int, reason: str, detail: str, extra: dict[str, str] | None = None):
    """The bytes of a complete HTTP/1.1 response with ``{"detail": ...}``, closing the
    connection (written straight to the socket: h11 cannot answer a request it has not
    parsed)."""
    body = json.dumps({"detail": detail}).encode()
    headers = {
        "content-type": "application/json",
        "content-length": str(len(body)),
        "connection": "close",
        **(extra or {}),
    }
    head = f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return head.encode("latin-1") + b"\r\n" + body


class _Transport:
    """The connection's transport as uvicorn sees it: ``close()`` starts a lingering close
    where body bytes are still to come."""

    def __init__(self, transport: asyncio.Transport, protocol: ConnectionProtocol) -> None:
        self._transport = transport
        self._protocol = protocol

    def close(self) -> None:
        self._protocol.close_after_answer()

    def is_closing(self) -> bool:
        return self._protocol.lingering or self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class ConnectionProtocol(H11Protocol):
    """uvicorn's h11 protocol with lingering close, a client timeout and a connection limit
    (the class attributes, set by :func:`protocol_class`)."""

    client_timeout: float = 30.0
    max_connections: int | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lingering = False
        self.refused = False
        self.last_byte_at = self.loop.time()
        self._raw_transport: asyncio.Transport | None = None
        self._lingered_bytes = 0
        self._unread_seen = 0
        self._client_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None

    # --- the asyncio protocol ---

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Take the connection, or refuse it beyond ``max_connections``."""
        self._raw_transport = transport
        if self.max_connections is not None and len(self.connections) >= self.max_connections:
            self._refuse()
            return
        super().connection_made(_Transport(transport, self))  # type: ignore[arg-type]
        self.last_byte_at = self.loop.time()
        self._client_timer = self.loop.call_later(self.client_timeout, self._check_client)

    def data_received(self, data: bytes) -> None:
        """Bytes from the client: parsed, or discarded while lingering."""
        self.last_byte_at = self.loop.time()
        self._unread_seen = 0
        if self.lingering or self.refused:
            self._discard(data)
            return
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        """The socket is closed: stop the timers."""
        for timer in (self._client_timer, self._linger_timer):
            if timer is not None:
                timer.cancel()
        if self.refused:
            return
        super().connection_lost(exc)

    # --- lingering close ---

    def close_after_answer(self) -> None:
        """uvicorn closes the connection: at once, or after draining the unread body."""
        transport = self._raw_transport
        if transport is None or transport.is_closing():
            return
        if self.lingering or self.conn.their_state is not h11.SEND_BODY:
            transport.close()
            return
        self._linger()

    def _linger(self) -> None:
        self.lingering = True
        transport = self._raw_transport
        if transport.can_write_eof():
            transport.write_eof()  # the answer is complete: FIN once it has been sent
        transport.resume_reading()
        if self.cycle is not None:
            self.cycle.body = bytearray()  # read, never to be delivered
        self._linger_timer = self.loop.call_later(LINGER_SECONDS, transport.close)

    def _discard(self, data: bytes) -> None:
        self._lingered_bytes += len(data)
        if self._lingered_bytes > LINGER_BYTES:
            self._raw_transport.close()
            return
        if self.refused:
            return  # no parser: drained until the client closes or the time is up
        try:
            self.conn.receive_data(data)
            while True:
                event = self.conn.next_event()
                if event is h11.NEED_DATA:
                    return
                if not isinstance(event, h11.Data):  # the body's end, or past it
                    break
        except h11.RemoteProtocolError:
            pass
        self._raw_transport.close()

    # --- connection limit ---

    def _refuse(self) -> None:
        self.refused = True
        log.warning(
            "refused a connection: %d open, the --max-connections limit", self.max_connections
        )
        detail = (
            f"the server has {self.max_connections} open connections, its --max-connections "
            f"limit; retry in {RETRY_AFTER_S} s, or start the server with a larger "
            "--max-connections"
        )
        self._raw_transport.write(
            json_response(503, "Service Unavailable", detail, {"retry-after": str(RETRY_AFTER_S)})
        )
        self._linger()

    # --- client timeout ---

    def _waiting_for(self) -> str | None:
        """What the server waits for from the client now: ``"head"``, ``"body"``, or None
        (the app is working, or uvicorn's keep-alive timeout runs)."""
        if self.conn.their_state is h11.SEND_BODY:
            return "body"
        if (
            self.conn.their_state is h11.IDLE
            and self.conn.our_state is h11.IDLE
            and self.timeout_keep_alive_task is None
        ):
            return "head"
        return None

    def _unread_bytes(self) -> int:
        """Bytes from the client in the kernel's receive queue, not yet read by the server."""
        sock = self._raw_transport.get_extra_info("socket") if self._raw_transport else None
        if sock is None:
            return 0
        count = array.array("i", [0])
        try:
            fcntl.ioctl(sock.fileno(), termios.FIONREAD, count)
        except OSError:  # closed meanwhile
            return 0
        return count[0]

    def _check_client(self) -> None:
        self._client_timer = None
        transport = self._raw_transport
        if self.lingering or transport is None or transport.is_closing():
            return
        if self.flow.read_paused:
            # Paused time counts (else a client stalling while the app is slow to pull its body
            # would never be released); bytes piling up unread meanwhile are the client's.
            unread = self._unread_bytes()
            if unread != self._unread_seen:
                self._unread_seen = unread
                self.last_byte_at = self.loop.time()
        silent_s = self.loop.time() - self.last_byte_at
        waiting = self._waiting_for()
        if waiting is None or silent_s < self.client_timeout:
            wait_s = self.client_timeout - silent_s if waiting else self.client_timeout
            self._client_timer = self.loop.call_later(max(wait_s, 0.01), self._check_client)
            return
        self._release_stalled(waiting)

    def _release_stalled(self, waiting: str) -> None:
        transport = self._raw_transport
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        started = self.conn.trailing_data[0] or self.conn.their_state is not h11.IDLE
        # An early answer (sent before the body was read) leaves nothing to say but the close.
        answered = waiting == "body" and self.cycle is not None and self.cycle.response_started
        if self.cycle is not None and not self.cycle.response_complete:
            # The request's task reads "client gone": its upload and its slot are freed.
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        if waiting == "head" and not started:
            log.info("%s sent nothing for %g s: closed", client, self.client_timeout)
        elif answered:
            log.info("%s stopped sending its body for %g s: closed", client, self.client_timeout)
        else:
            where = "the request head" if waiting == "head" else "the request body"
            log.warning(
                "%s sent no byte of %s for %g s: answered 408", client, where, self.client_timeout
            )
            detail = (
                f"no byte of {where} arrived for {self.client_timeout:g} s (the server's "
                "--client-timeout): the connection is closed; send the whole request without "
                "pausing, or ask the operator for a larger --client-timeout"
            )
            transport.write(json_response(408, "Request Timeout", detail))
            if self._unread_bytes() > 0:
                self._linger()  # closing on unread bytes would reset the 408 away
                return
        transport.close()


def protocol_class(client_timeout: float, max_connections: int | None) -> type[ConnectionProtocol]:
    """The protocol class to pass to uvicorn as ``http=``, with these limits."""
    return type(
        "ConnectionProtocol",
        (ConnectionProtocol,),
        {"client_timeout": client_timeout, "max_connections": max_connections},
    )


def raise_file_limit(max_connections: int) -> None:
    """Raise this process's soft limit on open files to fit ``max_connections`` sockets and
    the server's own files, as far as the hard limit allows: past it, accept() would fail."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + SPARE_FILES
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
