"""Faults at the front end: SIGTERM under load, and clients that vanish mid-upload.

SIGTERM (what Kubernetes and systemd send): the server stops accepting at once, requests in
flight (being uploaded or classified) finish with their normal answer, and it exits within
``--grace-period``; a request that outlasts the grace period is cut, and the exit still comes on
time. A client that disconnects while uploading (FIN or RST, with part or all of its body sent)
costs nothing: no error, no leaked file or slot, and other clients are served throughout.

Requests count as in flight only once the server has read what was sent of them (the kernel's
socket queues say so, ``testkit.raw_http.server_has_read``), so no step waits for a time that a
loaded machine might not keep.
"""

from __future__ import annotations

import socket
import struct
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from loadtest.locust_runner import RequestEvents, start_locust
from loadtest.run import SMALL_SCALES
from testkit.checks import Expected, check_batch, check_classification
from testkit.expected_posteriors import ExpectedPosteriors, cached
from testkit.images import build_image_set, encode
from testkit.processes import ServerProcess
from testkit.raw_http import read_response, wait_until_read

SCALES = ",".join(map(str, SMALL_SCALES))
IMAGES = build_image_set()
PHOTO = IMAGES[6]  # 1600x1200 JPEG
BATCH = IMAGES[5:8]
EXPECTED = Expected(
    top_k=5,
    scales=SMALL_SCALES,
    flip=True,
    models=("m16", "m19"),
    mode="dense",
    heatmap=False,
    width=PHOTO.width,
    height=PHOTO.height,
)
# Successful Locust requests before the faults: the load is established.
LOAD_BEFORE = 6
# Only a bound on a hang: every wait below ends on an event.
HANG_BOUND_S = 300


@pytest.fixture(scope="module")
def expected(two_model_repository) -> ExpectedPosteriors:
    repository, _ = two_model_repository
    return ExpectedPosteriors.load(cached(repository, {"m16": SMALL_SCALES, "m19": SMALL_SCALES}))


def multipart(files: list[tuple[str, bytes]], field: str, boundary: str = "vggserve-b") -> bytes:
    body = b""
    for filename, data in files:
        body += (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
                f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
            ).encode()
            + data
            + b"\r\n"
        )
    return body + f"--{boundary}--\r\n".encode()


def request_head(port: int, length: int, path: str = "/v1/classify", boundary="vggserve-b"):
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def start_upload(port: int, body: bytes, path: str, sent: float = 1.0) -> socket.socket:
    """A connection with the request's head and the first ``sent`` of its body sent and read by
    the server: from then on the request is in flight there."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=HANG_BOUND_S)
    sock.sendall(request_head(port, len(body), path) + body[: int(len(body) * sent)])
    wait_until_read(sock, HANG_BOUND_S)
    return sock


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def wait_for(condition, what: str, timeout: float = HANG_BOUND_S) -> float:
    """Poll ``condition`` until it holds; seconds it took. ``timeout`` only bounds a hang."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"{what} within {timeout} s"
        time.sleep(0.02)
    return time.monotonic() - started


def test_sigterm_under_load_finishes_in_flight_refuses_new_and_exits_in_time(
    two_model_repository, expected, tmp_path
):
    repository, _ = two_model_repository
    grace = 10.0
    args = ["--repository", str(repository), "--scales", SCALES, "--grace-period", str(grace)]
    with ServerProcess(*args, log_dir=tmp_path) as front:
        locust = start_locust(
            front.url,
            tmp_path / "locust",
            users=4,
            spawn_rate=4,
            duration=f"{HANG_BOUND_S}s",
            think_time="0.05,0.3",
            events_file=tmp_path / "events.jsonl",
            log_path=tmp_path / "locust.log",
            expected_posteriors=cached(repository, {"m16": SMALL_SCALES, "m19": SMALL_SCALES}),
        )
        events = RequestEvents(tmp_path / "events.jsonl", locust)
        try:
            events.wait_until(lambda rs: sum(r.ok for r in rs) >= LOAD_BEFORE, "load")
            # Two batches, received whole and being classified, and an upload a tenth sent.
            batch_body = multipart([(u.filename, u.data) for u in BATCH], "files")
            batches = [start_upload(front.port, batch_body, "/v1/classify/batch") for _ in "ab"]
            photo_body = multipart([(PHOTO.filename, PHOTO.data)], "file")
            upload = start_upload(front.port, photo_body, "/v1/classify", sent=0.1)

            term_at = time.time()
            front.terminate()
            # The listening socket closes as soon as the server handles the signal.
            refused_after = wait_for(lambda: refused(front.port), "new connections refused")
            # The upload still streaming at SIGTERM is sent in full now, and answered.
            upload.sendall(photo_body[int(len(photo_body) * 0.1) :])
            answers = [read_response(sock) for sock in (*batches, upload)]
            code = front.wait(HANG_BOUND_S)
            exited_after = time.time() - term_at
        finally:
            locust.terminate()
            locust.wait(120)
    for sock in (*batches, upload):
        sock.close()

    *batch_answers, upload_answer = answers
    for answer in batch_answers:  # in flight: answered in full, with the right numbers
        assert answer.response is not None and answer.response.status == 200, answer
        want = [
            (u.filename, replace(EXPECTED, width=u.width, height=u.height, posteriors=p))
            for u, p in ((u, expected.for_upload(u)) for u in BATCH)
        ]
        assert check_batch(answer.response.json(), want) == []
    assert upload_answer.response is not None and upload_answer.response.status == 200
    want = replace(EXPECTED, posteriors=expected.for_upload(PHOTO))
    assert check_classification(upload_answer.response.json(), want) == []
    assert code in (0, -15), front.log_tail()  # uvicorn re-raises SIGTERM after a clean stop
    assert exited_after < grace, f"exit took {exited_after:.1f} s with a {grace} s grace period"
    log = front.log_path.read_text()
    assert "Application shutdown complete" in log and "Traceback" not in log, log[-3000:]

    records = events.read()
    assert sum(r.ok and r.t < term_at for r in records) >= LOAD_BEFORE
    for record in records:
        # Answered with a right body (the checks compare the numbers too), or not answered at
        # all: refused, or closed unread by a stopping server. Never a 5xx or a wrong answer.
        assert record.ok or record.status == 0, record
        if record.t < term_at:  # completed before SIGTERM: a normal answer
            assert record.ok, record
    in_flight = [r for r in records if r.start < term_at < r.t and r.ok]
    print(
        f"SIGTERM under load: {len(records)} Locust requests, {len(in_flight)} in flight at "
        f"SIGTERM answered (+ 2 batches and a streaming upload, all answered with the right "
        f"numbers); new connections refused {refused_after:.2f} s after SIGTERM; exit "
        f"{exited_after:.2f} s after SIGTERM"
    )


def test_grace_period_bounds_the_exit_when_a_request_outlasts_it(two_model_repository, tmp_path):
    repository, _ = two_model_repository
    args = ["--repository", str(repository), "--scales", SCALES, "--grace-period", "1"]
    with ServerProcess(*args, log_dir=tmp_path) as front:
        body = multipart([(PHOTO.filename, PHOTO.data)], "file")
        # A tenth sent, the rest never: the request outlasts any grace period.
        upload = start_upload(front.port, body, "/v1/classify", sent=0.1)
        term_at = time.monotonic()
        front.terminate()
        code = front.wait(HANG_BOUND_S)
        exited_after = time.monotonic() - term_at
        answer = read_response(upload)
        upload.close()
    assert code in (0, -15), front.log_tail()
    # 1 s of grace, then cancelling, the app's shutdown and the interpreter's exit.
    assert exited_after < 1 + 4, f"exit took {exited_after:.1f} s with a 1 s grace period"
    # Cut, not answered: no 200 (uvicorn answers the cancelled request with its plain-text
    # 500 when the response had not begun; docs/reliability.md).
    assert answer.response is None or answer.response.status != 200, answer


def vanish(port: int, body: bytes, fraction: float, reset: bool) -> None:
    """Start an upload, send ``fraction`` of the body; once the server has read it, disconnect
    (FIN, or RST as a crashed client or a dropped link)."""
    sock = start_upload(port, body, "/v1/classify", fraction)
    try:
        if reset:  # SO_LINGER 0: the close sends RST
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()


def in_flight(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("vggserve_in_flight_requests "):
            return float(line.split()[1])
    raise AssertionError("no vggserve_in_flight_requests in /metrics")


@pytest.fixture(scope="module")
def server(two_model_repository, tmp_path_factory):
    repository, _ = two_model_repository
    log_dir = tmp_path_factory.mktemp("vanishing")
    with ServerProcess(
        "--repository", str(repository), "--scales", SCALES, log_dir=log_dir
    ) as front:
        yield front
    log = front.log_path.read_text()
    assert "Traceback" not in log and "500 Internal" not in log, log[-3000:]


def noise_png(megabytes: float, seed: int = 3) -> bytes:
    """A PNG of random pixels (incompressible: about 3 bytes a pixel) of about ``megabytes``."""
    side = int((megabytes * 2**20 / 3) ** 0.5)
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), "PNG")


@pytest.mark.parametrize("body_mb", [0.3, 3])  # 3 MB: spooled to a temporary file on disk
def test_clients_vanishing_mid_upload_cost_nothing(server, body_mb):
    body = multipart([("big.png", noise_png(body_mb))], "file")
    served: list[int] = []

    def storm_beside_steady_clients(vanishing: int) -> None:
        """``vanishing`` uploads cut short while two other clients classify photos; each steady
        client has a request served that overlapped the storm before they stop."""
        stop = threading.Event()
        requests: list[list[tuple[float, float]]] = [[], []]
        began = [threading.Event(), threading.Event()]

        def steady_client(index: int) -> None:
            while not stop.is_set():
                started = time.monotonic()
                began[index].set()
                files = {"file": (PHOTO.filename, PHOTO.data, PHOTO.content_type)}
                response = httpx.post(f"{server.url}/v1/classify", files=files, timeout=60)
                served.append(response.status_code)
                requests[index].append((started, time.monotonic()))

        with ThreadPoolExecutor(2) as pool:
            steady = [pool.submit(steady_client, index) for index in range(2)]
            try:
                for event in began:
                    assert event.wait(HANG_BOUND_S), "a steady client never began"
                storm_began = time.monotonic()
                for index in range(vanishing):
                    fraction = (0.1, 0.5, 0.95, 1.0)[index % 4]  # 1.0: gone before the answer
                    vanish(server.port, body, fraction, reset=index % 2 == 0)
                storm_ended = time.monotonic()
                wait_for(
                    lambda: all(
                        any(start < storm_ended and end > storm_began for start, end in mine)
                        for mine in requests
                    ),
                    "a steady request served during the storm, for each steady client",
                )
            finally:
                stop.set()
            for future in steady:
                future.result()
        wait_for(lambda: in_flight(server.url) == 0, "no request left in flight")

    # The first round brings arenas and caches to their working size under this very mix;
    # a leak shows as growth over the second.
    storm_beside_steady_clients(12)
    baseline = server.resources()
    storm_beside_steady_clients(12)
    assert served and set(served) == {200}, served
    # A leaked socket or spooled file per vanished upload would be +12 here; +2 is the noise
    # of connections the server has not yet seen closed.
    wait_for(
        lambda: server.resources().open_fds <= baseline.open_fds + 2,
        "open files back to where they were",
    )
    # Uploads over 1 MB are spooled to (unnamed) temporary files: none may stay open.
    temporary = [
        f.path
        for f in psutil.Process(server.pid).open_files()
        if f.path.startswith(tempfile.gettempdir()) and f.path != str(server.log_path)
    ]
    assert not temporary, temporary
    now = server.resources()
    grown_mb = (now.rss_bytes - baseline.rss_bytes) / 2**20
    print(
        f"{len(served)} steady requests served during 24 vanishing {body_mb} MB uploads; "
        f"RSS over the second 12: {grown_mb:+.0f} MB, open files {baseline.open_fds} -> "
        f"{now.open_fds}"
    )
    # No bound on RSS here: over 12 uploads it moves by +-70 MB with glibc arenas (2 MP
    # decodes on several threads), a noise larger than any leak it could show. Open files,
    # spooled files and slots above are the exact checks; the soak measures RSS.
    files = [("files", (u.filename, u.data, u.content_type)) for u in BATCH]
    assert httpx.post(f"{server.url}/v1/classify/batch", files=files, timeout=60).status_code == 200
