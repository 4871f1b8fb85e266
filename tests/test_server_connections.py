"""Connections at the edge of the real ``python -m server``: every client hears its answer,
stalled clients are released, and open connections are bounded.

- An upload refused from its Content-Length (413) before its body is read: the server keeps
  reading and discarding the body (a lingering close), so clients that send the whole body
  before they read (``urllib.request``, ``requests``, ``httpx``) get the JSON 413, not a reset.
- Hundreds of clients that stop sending mid-head or mid-body get a JSON 408 (or, having sent
  nothing, a close) once ``--client-timeout`` passes without a byte, while other clients are
  served; their sockets and spooled uploads are freed.
- Beyond ``--max-connections`` a new connection gets a JSON 503 with Retry-After.

Every wait ends on an event; the deadlines only bound a hang.
"""

from __future__ import annotations

import asyncio
import json
import select
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import httpx
import pytest
import requests
import uvicorn

from server.connections import protocol_class
from testkit.images import build_image_set
from testkit.processes import ServerProcess
from testkit.raw_http import all_read, read_response
from testkit.stalled_clients import (
    BOUNDARY,
    CONTENT_TYPE,
    MULTIPART_HEAD,
    collect_answers,
    mixed_plan,
    open_files_under,
    open_stalls,
    post_head,
    server_connections,
)

LIMIT_MB = 4
CLIENT_TIMEOUT_S = 2
MAX_CONNECTIONS = 50
UPLOAD_MB = 25
HANG_BOUND_S = 120
STALLS = 300
PHOTO = build_image_set()[0]
# Direct to the server: an http_proxy in the environment must not intercept 127.0.0.1.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def temporary_dir(tmp_path_factory):
    """The server's TMPDIR: where Starlette spools uploads over 1 MB."""
    return tmp_path_factory.mktemp("server-tmp")


@pytest.fixture(scope="module")
def server(two_model_repository, temporary_dir, tmp_path_factory):
    repository, _ = two_model_repository
    args = ["--repository", str(repository), "--scales", "64", "--max-upload-mb", str(LIMIT_MB)]
    args += ["--client-timeout", str(CLIENT_TIMEOUT_S)]
    with ServerProcess(
        *args, log_dir=tmp_path_factory.mktemp("logs"), environment={"TMPDIR": str(temporary_dir)}
    ) as front:
        yield front
    log = front.log_path.read_text()
    assert "Traceback" not in log and "500 Internal" not in log, log[-3000:]


def upload_body() -> bytes:
    """A multipart upload of ``UPLOAD_MB`` MB, far over the server's limit."""
    return MULTIPART_HEAD + bytes(UPLOAD_MB * 2**20) + f"\r\n--{BOUNDARY}--\r\n".encode()


def assert_413(status: int, body: bytes) -> None:
    assert status == 413, body[:500]
    detail = json.loads(body)["detail"]
    assert f"{UPLOAD_MB + 0.0:.1f} MB, over the limit of {LIMIT_MB} MB" in detail, detail
    assert "--max-upload-mb" in detail


def post_with_urllib(url: str, body: bytes) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": CONTENT_TYPE})
    try:
        with DIRECT.open(request, timeout=HANG_BOUND_S) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def post_with_requests(url: str, body: bytes) -> tuple[int, bytes]:
    with requests.Session() as session:
        session.trust_env = False
        response = session.post(
            url, data=body, headers={"Content-Type": CONTENT_TYPE}, timeout=HANG_BOUND_S
        )
        return response.status_code, response.content


def post_with_httpx(url: str, body: bytes) -> tuple[int, bytes]:
    with httpx.Client(trust_env=False, timeout=HANG_BOUND_S) as client:
        response = client.post(url, content=body, headers={"Content-Type": CONTENT_TYPE})
        return response.status_code, response.content


def post_with_curl(url: str, body: bytes, tmp_path) -> tuple[int, bytes]:
    assert shutil.which("curl"), "curl is needed: apt-get install curl (.ci/run installs it)"
    upload, answer = tmp_path / "upload.bin", tmp_path / "answer.json"
    upload.write_bytes(body)
    done = subprocess.run(
        ["curl", "--silent", "--show-error", "--noproxy", "*", "--output", str(answer)]
        + ["--write-out", "%{http_code}", "-H", f"Content-Type: {CONTENT_TYPE}"]
        + ["--data-binary", f"@{upload}", url],
        capture_output=True,
        text=True,
        timeout=HANG_BOUND_S,
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout), answer.read_bytes()


@pytest.mark.parametrize("client", ["urllib", "requests", "httpx", "curl"])
def test_every_client_hears_the_413_of_an_oversized_upload(server, client, tmp_path):
    """The 413 goes out from the Content-Length before the body is read; the server then reads
    and discards the 25 MB, so a client still sending hears the JSON answer, not a reset."""
    url, body = f"{server.url}/v1/classify", upload_body()
    if client == "urllib":
        status, answer = post_with_urllib(url, body)
    elif client == "requests":
        status, answer = post_with_requests(url, body)
    elif client == "httpx":
        status, answer = post_with_httpx(url, body)
    else:
        status, answer = post_with_curl(url, body, tmp_path)
    assert_413(status, answer)
    assert httpx.get(f"{server.url}/healthz", trust_env=False).status_code == 200


def in_flight(url: str) -> float:
    for line in httpx.get(f"{url}/metrics", trust_env=False).text.splitlines():
        if line.startswith("vggserve_in_flight_requests "):
            return float(line.split()[1])
    raise AssertionError("no vggserve_in_flight_requests in /metrics")


def wait_for(condition, what: str, timeout: float = HANG_BOUND_S) -> None:
    """Poll ``condition`` until it holds; ``timeout`` only bounds a hang."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(0.02)


def test_stalled_clients_are_answered_408_and_released_while_others_are_served(
    server, temporary_dir
):
    wait_for(lambda: server_connections(server.pid) == 0, "the health checks' sockets closed")
    # Files the server's libraries keep in TMPDIR (session markers), not uploads.
    files_before = set(temporary_dir.iterdir())
    stop = threading.Event()
    served: list[tuple[float, float, int]] = []

    def steady_client() -> None:
        with httpx.Client(trust_env=False, timeout=HANG_BOUND_S) as client:
            while not stop.is_set():
                began = time.monotonic()
                files = {"file": (PHOTO.filename, PHOTO.data, PHOTO.content_type)}
                status = client.post(f"{server.url}/v1/classify", files=files).status_code
                served.append((began, time.monotonic(), status))

    steady = threading.Thread(target=steady_client, daemon=True)
    steady.start()
    plan = mixed_plan(STALLS)
    try:
        stalls = open_stalls(server.port, plan, HANG_BOUND_S)
        wait_for(lambda: all_read([stall.sock for stall in stalls]), "every stall read")
        silent_since = time.monotonic()  # every stalled socket is silent from here at the latest
        assert server_connections(server.pid) >= len(stalls)
        wait_for(
            lambda: len(open_files_under(server.pid, temporary_dir)) == plan.count("spooled"),
            "the uploads over 1 MB spooled to temporary files",
        )
        released, pending = collect_answers(stalls, HANG_BOUND_S)
        assert not pending, f"{len(pending)} stalled sockets still open"
        all_released = time.monotonic()
    finally:
        stop.set()
        steady.join(HANG_BOUND_S)
    first_answer = released[0].at
    # Seconds from each socket's last byte sent to its answer or close.
    silences = [answer.silence_s for answer in released]
    # Nothing is released early: the server reads a byte after it is sent and answers
    # CLIENT_TIMEOUT_S after reading it, so no silence is shorter (asyncio's timers never fire
    # early).
    assert min(silences) >= CLIENT_TIMEOUT_S, min(silences)
    # On time: a check re-armed while the server was not waiting on the client fires at most
    # one timeout late; 1 s more for a loaded 2-core machine to write 300 answers.
    assert max(silences) <= 2 * CLIENT_TIMEOUT_S + 1, max(silences)
    print(
        f"{STALLS} stalled sockets released {min(silences):.1f} to {max(silences):.1f} s after "
        f"their last byte ({all_released - silent_since:.1f} s after the last stall was read); "
        f"{len(served)} steady requests"
    )
    answers: dict[str, list[bytes]] = {"nothing": [], "head": [], "body": [], "spooled": []}
    for answer in released:
        assert answer.exchange.closed or answer.exchange.response is not None, answer.stall.kind
        answers[answer.stall.kind].append(answer.exchange.received)
    # No request begun: nothing to answer.
    assert answers["nothing"] == [b""] * plan.count("nothing")
    for kind in ("head", "body", "spooled"):
        for received in answers[kind]:
            assert received.startswith(b"HTTP/1.1 408 "), (kind, received[:200])
            detail = json.loads(received.split(b"\r\n\r\n", 1)[1])["detail"]
            assert f"{CLIENT_TIMEOUT_S:g} s" in detail and "--client-timeout" in detail, detail
    # Served throughout: every steady request 200, and one ran while all 300 were stalled.
    assert served and {status for *_, status in served} == {200}, served
    assert any(began >= silent_since and ended <= first_answer for began, ended, _ in served)
    wait_for(lambda: server_connections(server.pid) == 0, "every socket of the stalls closed")
    wait_for(lambda: not open_files_under(server.pid, temporary_dir), "spooled uploads freed")
    assert set(temporary_dir.iterdir()) == files_before
    assert in_flight(server.url) == 0


def test_connections_beyond_max_connections_get_a_json_503(two_model_repository, tmp_path):
    repository, _ = two_model_repository
    args = ["--repository", str(repository), "--scales", "64"]
    args += ["--max-connections", str(MAX_CONNECTIONS)]
    with ServerProcess(*args, log_dir=tmp_path) as front:
        wait_for(lambda: server_connections(front.pid) == 0, "the health checks' sockets closed")
        held = []
        for _ in range(MAX_CONNECTIONS):
            sock = socket.create_connection(("127.0.0.1", front.port), timeout=HANG_BOUND_S)
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")  # half a head: read, so accepted
            held.append(sock)
        wait_for(lambda: all_read(held), "the 50 heads read")
        # Accepted, not refused: a refusal would be waiting to be read.
        assert not select.select(held, [], [], 0)[0]
        refusals = []
        for _ in range(10):
            with socket.create_connection(("127.0.0.1", front.port), timeout=HANG_BOUND_S) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                refusals.append(read_response(sock))
        with httpx.Client(trust_env=False) as client:
            refused_httpx = client.get(f"{front.url}/healthz")
        for sock in held[:5]:
            sock.close()
        wait_for(lambda: server_connections(front.pid) <= MAX_CONNECTIONS - 5, "5 closed")
        after = httpx.get(f"{front.url}/healthz", trust_env=False)
        for sock in held[5:]:
            sock.close()
    for exchange in refusals:
        assert exchange.response is not None, exchange.received[:300]
        assert exchange.response.headers["connection"] == "close"
        assert exchange.response.status == 503
        assert int(exchange.response.headers["retry-after"]) >= 1
        detail = exchange.response.json()["detail"]
        assert f"{MAX_CONNECTIONS} open connections" in detail and "--max-connections" in detail
    assert refused_httpx.status_code == 503 and "detail" in refused_httpx.json()
    assert after.status_code == 200


def test_a_client_that_stalls_while_the_server_paused_reading_is_released():
    """uvicorn stops reading a body the app has not pulled yet (past 64 KB buffered); a client
    that stops sending meanwhile still gets the 408 once no byte has arrived (read or piling up
    unread in the socket) for the client timeout, although the app never reads."""
    timeout_s = 0.5
    answered = threading.Event()

    async def busy_app(scope, receive, send) -> None:
        """Never reads the body: busy until the client has its answer."""
        while scope["type"] == "http" and not answered.is_set():
            await asyncio.sleep(0.05)

    config = uvicorn.Config(
        busy_app,
        host="127.0.0.1",
        port=0,
        http=protocol_class(timeout_s, None),
        lifespan="off",
        log_level="warning",
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, "the in-process server started", 30)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=HANG_BOUND_S) as sock:
            # 128 KB of a declared 1 MB: past uvicorn's 64 KB high-water mark, so reading pauses.
            # Some of it stays unread in the socket while reading is paused.
            sock.sendall(post_head(port, 2**20) + MULTIPART_HEAD + bytes(2**17))
            sent = time.monotonic()
            exchange = read_response(sock)
            silence = time.monotonic() - sent
    finally:
        answered.set()
        server.should_exit = True
        thread.join(HANG_BOUND_S)
    assert exchange.response is not None and exchange.response.status == 408, exchange.received
    # Not before the timeout; at most one timeout late (a check re-armed while the server was
    # not waiting on the client), 1 s more for a loaded machine.
    assert timeout_s <= silence <= 2 * timeout_s + 1, silence
