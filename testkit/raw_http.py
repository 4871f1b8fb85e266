"""HTTP/1.1 over a plain socket, for requests no HTTP client would send and for clients that
vanish: a response read whole (by its Content-Length, its chunks, or up to the close) and
parsed, and whether the server has read what was sent to it.

Linux only: :func:`server_has_read` looks at the kernel's socket queues in ``/proc/net/tcp``.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Response:
    """One complete HTTP response; ``headers`` by lower-case name (the last one of a name)."""

    status: int
    reason: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body as JSON; raises ``ValueError`` if it is not."""
        return json.loads(self.body)


class Incomplete(ValueError):
    """The bytes end before the response does."""


def _chunks(data: bytes) -> bytes:
    """The body of a chunked message (RFC 9112 7.1); raises :class:`Incomplete`."""
    body, at = b"", 0
    while True:
        end = data.find(b"\r\n", at)
        if end < 0:
            raise Incomplete("chunk size line not finished")
        size = int(data[at:end].split(b";")[0], 16)
        at = end + 2
        if size == 0:
            if data.find(b"\r\n", at) < 0:  # (no trailers:) the empty line that ends it
                raise Incomplete("last chunk not terminated")
            return body
        if len(data) < at + size + 2:
            raise Incomplete("chunk data not finished")
        body += data[at : at + size]
        at += size + 2


def parse_response(data: bytes, closed: bool) -> Response:
    """The response at the start of ``data``; ``closed``: the server has closed the connection
    after these bytes (which ends a body that has neither a length nor chunks). Raises
    :class:`Incomplete` if the response is not whole, ``ValueError`` if it is not HTTP."""
    head, found, rest = data.partition(b"\r\n\r\n")
    if not found:
        raise Incomplete("headers not finished")
    lines = head.decode("latin-1").split("\r\n")
    version, _, status_reason = lines[0].partition(" ")
    status, _, reason = status_reason.partition(" ")
    if not version.startswith("HTTP/1.") or not status.isdigit():
        raise ValueError(f"not an HTTP/1.x status line: {lines[0]!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = _chunks(rest)
    elif "content-length" in headers:
        length = int(headers["content-length"])
        if len(rest) < length:
            raise Incomplete(f"{len(rest)} of {length} body bytes")
        body = rest[:length]
    elif closed:
        body = rest
    else:
        raise Incomplete("body delimited by the close, which has not come")
    return Response(int(status), reason, headers, body)


@dataclass(frozen=True)
class Exchange:
    """What came back for one request on a fresh connection.

    ``response``: the complete response, or None; ``received``: every byte that came back;
    ``closed``: the server closed the connection (FIN or RST) after its answer, or without one;
    ``reset``: by a reset (RST: it closed with bytes of ours still unread).
    """

    response: Response | None
    received: bytes
    closed: bool
    reset: bool


def exchange(
    port: int,
    request: bytes,
    chunk: int = 1 << 16,
    timeout: float = 30,
    wait_for_close: bool = True,
    half_close: bool = False,
) -> Exchange:
    """Send ``request`` on a fresh connection to 127.0.0.1:``port`` while reading the answer.

    Sending runs in a thread of its own, so a server that answers before the request is all
    sent (a refused upload) is read at once; it may close before everything is sent. With
    ``half_close`` the sending side is shut (FIN) once all is sent: a client that is done.
    Reading stops when the response is complete and, with ``wait_for_close``, the server has
    closed the connection, or after ``timeout`` seconds without a byte (a bound on a hang).
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:

        def send() -> None:
            try:
                for start in range(0, len(request), chunk):
                    sock.sendall(request[start : start + chunk])
                if half_close:
                    sock.shutdown(socket.SHUT_WR)
            except OSError:  # closed by the server: what it answered is read below
                pass

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        received, closed, reset, response = b"", False, False, None
        while True:
            try:
                data = sock.recv(1 << 16)
            except ConnectionResetError:
                data, reset = b"", True
            except TimeoutError:
                break
            if not data:
                closed = True
            received += data
            if response is None:
                try:
                    response = parse_response(received, closed)
                except Incomplete:
                    pass
                except ValueError:
                    break
            if closed or (response is not None and not wait_for_close):
                break
        sender.join(timeout)
        return Exchange(response, received, closed, reset)


def read_response(sock: socket.socket) -> Exchange:
    """Read the answer to what was sent on ``sock``: until the response is complete, or the
    server closes the connection, or the socket's timeout passes without a byte."""
    received, closed, reset, response = b"", False, False, None
    while response is None and not closed:
        try:
            data = sock.recv(1 << 16)
        except ConnectionResetError:
            data, reset = b"", True
        except TimeoutError:
            break
        closed = not data
        received += data
        try:
            response = parse_response(received, closed)
        except Incomplete:
            pass
        except ValueError:
            break
    return Exchange(response, received, closed, reset)


def _tcp_queues() -> dict[tuple[int, int], tuple[int, int]]:
    """(local port, remote port) -> (send queue, receive queue) bytes of loopback TCP sockets."""
    queues = {}
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            local, remote, (tx, rx) = fields[1], fields[2], fields[4].split(":")
            if local.startswith("0100007F:") and remote.startswith("0100007F:"):
                key = (int(local.split(":")[1], 16), int(remote.split(":")[1], 16))
                queues[key] = (int(tx, 16), int(rx, 16))
    return queues


def server_has_read(sock: socket.socket) -> bool:
    """Whether the server at the other end of ``sock`` (on 127.0.0.1) has read every byte sent
    on it so far: none waits in our send queue, none in its receive queue. A server reads only
    connections it has accepted, so this is also proof that it holds the connection."""
    mine, theirs = sock.getsockname()[1], sock.getpeername()[1]
    queues = _tcp_queues()
    if (mine, theirs) not in queues or (theirs, mine) not in queues:
        return False
    return queues[(mine, theirs)][0] == 0 and queues[(theirs, mine)][1] == 0


def all_read(sockets: list[socket.socket]) -> bool:
    """:func:`server_has_read` for every socket of ``sockets``, from one look at the queues."""
    queues = _tcp_queues()
    for sock in sockets:
        mine, theirs = sock.getsockname()[1], sock.getpeername()[1]
        if (mine, theirs) not in queues or (theirs, mine) not in queues:
            return False
        if queues[(mine, theirs)][0] != 0 or queues[(theirs, mine)][1] != 0:
            return False
    return True


def wait_until_read(sock: socket.socket, timeout: float = 60) -> None:
    """Wait until :func:`server_has_read`; ``timeout`` only bounds a hang (``TimeoutError``)."""
    deadline = time.monotonic() + timeout
    while not server_has_read(sock):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the server did not read what was sent within {timeout:.0f} s")
        time.sleep(0.005)
