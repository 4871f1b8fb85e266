"""Clients that stop sending, on plain sockets to a server on 127.0.0.1: mid-head, mid-body,
mid-upload or before their first byte; when each is answered, and with what; and what the
server process still holds of them (connections, spooled uploads).

Linux only (``/proc``). Used by the connection tests and ``bench/stalled_clients.py``.
"""

from __future__ import annotations

import os
import selectors
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from testkit.raw_http import Exchange, read_response

BOUNDARY = "vggserve-b"
MULTIPART_HEAD = (
    f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.jpg"\r\n'
    "Content-Type: image/jpeg\r\n\r\n"
).encode()
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"

# What a stalled client has sent when it stops: no byte; 40 bytes of a request head; a head
# declaring 1 MB and 4 KB of the body; a head declaring 3 MB and 1.5 MB of the body (over 1 MB,
# so Starlette spools it to a temporary file).
KINDS = ("nothing", "head", "body", "spooled")
# Of every 30 stalls: 1 nothing, 14 head, 14 body, 1 spooled (interleaved).
PLAN_CYCLE = 30


def post_head(port: int, length: int) -> bytes:
    """The head of a multipart POST to /v1/classify declaring ``length`` body bytes."""
    return (
        f"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: {CONTENT_TYPE}\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def stall_bytes(kind: str, port: int) -> bytes:
    """What a stalled client of ``kind`` (one of :data:`KINDS`) sends before it stops."""
    if kind == "nothing":
        return b""
    if kind == "head":
        return post_head(port, 2**20)[:40]
    if kind == "body":
        return post_head(port, 2**20) + MULTIPART_HEAD + bytes(4096)
    if kind == "spooled":
        return post_head(port, 3 * 2**20) + MULTIPART_HEAD + bytes(3 * 2**19)
    raise ValueError(f"unknown stall kind {kind!r}; one of {', '.join(KINDS)}")


def mixed_plan(count: int) -> list[str]:
    """``count`` stall kinds, interleaved 1 : 14 : 14 : 1 (nothing : head : body : spooled)
    in every :data:`PLAN_CYCLE`; 300 gives 10, 140, 140 and 10."""
    plan = []
    for i in range(count):
        position = i % PLAN_CYCLE
        if position == 0:
            plan.append("nothing")
        elif position == PLAN_CYCLE // 2:
            plan.append("spooled")
        else:
            plan.append("head" if position % 2 else "body")
    return plan


@dataclass
class Stall:
    """One stalled connection: what it stopped in, its socket, when its last byte was sent
    (``time.monotonic()``), and whether sending failed (the server closed it first)."""

    kind: str
    sock: socket.socket
    last_byte_at: float
    send_failed: bool = False


def open_stalls(port: int, plan: Sequence[str], timeout: float = 120) -> list[Stall]:
    """One connection to 127.0.0.1:``port`` per kind of ``plan``, each sending its
    :func:`stall_bytes` and then nothing; ``timeout`` bounds each socket's blocking calls."""
    stalls = []
    for kind in plan:
        data = stall_bytes(kind, port)
        # The time is taken before the last byte leaves (before connecting, for a socket that
        # sends none), so the server cannot have read it earlier: a silence measured from it
        # is never shorter than the server's.
        last_byte_at = time.monotonic()
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        failed = False
        try:
            if data:
                sock.sendall(data[:-1])
                last_byte_at = time.monotonic()
                sock.sendall(data[-1:])
        except OSError:  # refused and closed before all was sent: its answer is still read
            failed = True
        stalls.append(Stall(kind, sock, last_byte_at, failed))
    return stalls


@dataclass(frozen=True)
class Answer:
    """What came back on a stalled connection, and when: ``silence_s`` seconds after its last
    byte was sent."""

    stall: Stall
    exchange: Exchange
    at: float
    silence_s: float


def collect_answers(stalls: Sequence[Stall], timeout: float) -> tuple[list[Answer], list[Stall]]:
    """Wait for each stall's answer (a response, or the server's close) and close its socket;
    returns the answers in the order they came and the stalls still unanswered after
    ``timeout`` seconds. An epoll selector: more than 1024 sockets are fine."""
    answers = []
    with selectors.DefaultSelector() as selector:
        for stall in stalls:
            selector.register(stall.sock, selectors.EVENT_READ, stall)
        deadline = time.monotonic() + timeout
        while selector.get_map() and time.monotonic() < deadline:
            wait_s = min(1.0, max(0.0, deadline - time.monotonic()))
            for key, _ in selector.select(timeout=wait_s):
                stall = key.data
                at = time.monotonic()
                selector.unregister(stall.sock)
                exchange = read_response(stall.sock)
                stall.sock.close()
                answers.append(Answer(stall, exchange, at, at - stall.last_byte_at))
        pending = [key.data for key in selector.get_map().values()]
    return answers, pending


def server_connections(pid: int) -> int:
    """TCP connections process ``pid`` holds open (its listening sockets not counted)."""
    import psutil

    return sum(
        1
        for connection in psutil.Process(pid).net_connections(kind="tcp")
        if connection.status != psutil.CONN_LISTEN
    )


def open_files_under(pid: int, folder: Path | str) -> list[str]:
    """Files under ``folder`` that process ``pid`` has open, unlinked ones (spooled uploads)
    included."""
    paths = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            paths.append(os.readlink(fd))
        except OSError:  # closed meanwhile
            continue
    return [path for path in paths if path.startswith(f"{folder}/")]
