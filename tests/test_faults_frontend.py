"""Faults at the front end: SIGTERM under load, and clients that vanish mid-upload.

SIGTERM (what Kubernetes and systemd send): the server stops accepting at once, requests in
flight (being uploaded or classified) finish with their normal answer, and it exits within
``--grace-period``; a request that outlasts the grace period is cut, and the exit still comes on
time. A client that disconnects while uploading (FIN or RST, with part or all of its body sent)
costs nothing: no error, no leaked file or slot, and other clients are served throughout.
"""

from __future__ import annotations

import json
import socket
import struct
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from loadtest.locust_runner import start_locust
from testkit.checks import Expected, check_batch, check_classification
from testkit.images import build_image_set, encode, smooth_image
from testkit.processes import ServerProcess

SCALES = "64,96,128"
IMAGES = build_image_set()
PHOTO = IMAGES[6]  # 1600x1200 JPEG
EXPECTED = Expected(
    top_k=5,
    scales=(64, 96, 128),
    flip=True,
    models=("m16", "m19"),
    mode="dense",
    heatmap=False,
    width=PHOTO.width,
    height=PHOTO.height,
)


def multipart(data: bytes, filename: str = "photo.jpg", boundary: str = "vggserve-b") -> bytes:
    return (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="{filename}"\r\nContent-Type: image/jpeg\r\n\r\n'
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )


def request_head(port: int, length: int, boundary: str = "vggserve-b") -> bytes:
    return (
        f"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


class SlowUpload(threading.Thread):
    """A client uploading ``PHOTO`` in ``pieces`` over ``seconds``, then reading the answer."""

    def __init__(self, port: int, seconds: float, pieces: int = 10) -> None:
        super().__init__(daemon=True)
        self.port, self.seconds, self.pieces = port, seconds, pieces
        self.started = threading.Event()
        self.answer = b""
        self.error: Exception | None = None

    def run(self) -> None:
        body = multipart(PHOTO.data)
        step = len(body) // self.pieces + 1
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=60) as sock:
                sock.sendall(request_head(self.port, len(body)) + body[:step])
                self.started.set()
                for start in range(step, len(body), step):
                    time.sleep(self.seconds / self.pieces)
                    sock.sendall(body[start : start + step])
                while chunk := sock.recv(65536):
                    self.answer += chunk
        except OSError as exc:
            self.error = exc
        finally:
            self.started.set()

    def json(self) -> dict:
        head, _, body = self.answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), self.answer[:300]
        return json.loads(body)


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def classify_batch(url: str) -> httpx.Response:
    files = [("files", (u.filename, u.data, u.content_type)) for u in IMAGES[5:8]]
    return httpx.post(f"{url}/v1/classify/batch", files=files, timeout=60)


def test_sigterm_under_load_finishes_in_flight_refuses_new_and_exits_in_time(
    two_model_repository, tmp_path
):
    repository, _ = two_model_repository
    grace = 10.0
    args = ["--repository", str(repository), "--scales", SCALES, "--grace-period", str(grace)]
    with ServerProcess(*args, log_dir=tmp_path) as front:
        events = tmp_path / "events.jsonl"
        locust = start_locust(
            front.url,
            tmp_path / "locust",
            users=4,
            spawn_rate=4,
            duration="40s",
            think_time="0.05,0.3",
            events_file=events,
            log_path=tmp_path / "locust.log",
        )
        try:
            time.sleep(6)  # load established
            upload = SlowUpload(front.port, seconds=3)
            upload.start()
            upload.started.wait(10)
            with ThreadPoolExecutor(2) as pool:
                batches = [pool.submit(classify_batch, front.url) for _ in range(2)]
                time.sleep(0.3)  # the batches are received and being classified
                term_at = time.time()
                front.terminate()
                # The listening socket closes as soon as the server handles the signal.
                wait_for(lambda: refused(front.port), "new connections refused after SIGTERM", 5)
                refused_after = time.time() - term_at
                for batch in batches:  # in flight: answered in full
                    response = batch.result()
                    assert response.status_code == 200, response.text
                    expected = [
                        (
                            u.filename,
                            Expected(**{**EXPECTED.__dict__, "width": u.width, "height": u.height}),
                        )
                        for u in IMAGES[5:8]
                    ]
                    assert check_batch(response.json(), expected) == []
            upload.join(30)
            assert upload.error is None, upload.error
            assert check_classification(upload.json(), EXPECTED) == []  # still uploading at TERM
            code = front.wait(grace + 5)
            exited_after = time.time() - term_at
        finally:
            locust.terminate()
            locust.wait(30)
    assert code in (0, -15), front.log_tail()  # uvicorn re-raises SIGTERM after a clean stop
    assert exited_after < grace, f"exit took {exited_after:.1f} s with a {grace} s grace period"
    log = front.log_path.read_text()
    assert "Application shutdown complete" in log and "Traceback" not in log, log[-3000:]

    records = [json.loads(line) for line in events.read_text().splitlines() if line.strip()]
    for record in records:
        start = record["t"] - record["ms"] / 1000
        if start < term_at - 0.25:  # sent well before SIGTERM: in flight, so answered
            assert record["ok"], record
        elif not record["ok"]:  # after: refused or closed by a stopped server, never a 5xx
            assert record["status"] == 0, record
    in_flight = [r for r in records if r["t"] - r["ms"] / 1000 < term_at < r["t"]]
    print(
        f"SIGTERM under load: {len(records)} requests, {len(in_flight)} Locust requests in "
        f"flight at SIGTERM (+ 2 batches and a slow upload) all answered; new connections "
        f"refused {refused_after:.2f} s after SIGTERM; exit {exited_after:.2f} s after "
        "SIGTERM"
    )


def test_grace_period_bounds_the_exit_when_a_request_outlasts_it(two_model_repository, tmp_path):
    repository, _ = two_model_repository
    args = ["--repository", str(repository), "--scales", SCALES, "--grace-period", "1"]
    with ServerProcess(*args, log_dir=tmp_path) as front:
        upload = SlowUpload(front.port, seconds=8)  # far longer than the grace period
        upload.start()
        upload.started.wait(10)
        time.sleep(0.2)
        term_at = time.monotonic()
        front.terminate()
        code = front.wait(15)
        exited_after = time.monotonic() - term_at
        upload.join(15)
    assert code in (0, -15), front.log_tail()
    # 1 s of grace, then cancelling, the app's shutdown and the interpreter's exit.
    assert exited_after < 1 + 4, f"exit took {exited_after:.1f} s with a 1 s grace period"
    assert not upload.answer.startswith(b"HTTP/1.1 200")  # it was cut, not answered


def wait_for(condition, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(0.2)


def vanish(port: int, body: bytes, fraction: float, reset: bool) -> None:
    """Start an upload, send ``fraction`` of the body, then disconnect (FIN or RST)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        sock.sendall(request_head(port, len(body)) + body[: int(len(body) * fraction)])
        time.sleep(0.05)
        if reset:  # SO_LINGER 0: the close sends RST, as a crashed client or a dropped link
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()


def in_flight(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("vggserve_in_flight_requests "):
            return float(line.split()[1])
    raise AssertionError("no vggserve_in_flight_requests in /metrics")


@pytest.mark.parametrize("body_mb", [0.3, 3])  # 3 MB: spooled to a temporary file on disk
def test_clients_vanishing_mid_upload_cost_nothing(two_model_repository, tmp_path, body_mb):
    repository, _ = two_model_repository
    big = encode(
        smooth_image(int(700 * body_mb**0.5) * 2, int(500 * body_mb**0.5) * 2, seed=3), "PNG"
    )
    body = multipart(big, "big.png")
    with ServerProcess(
        "--repository", str(repository), "--scales", SCALES, log_dir=tmp_path
    ) as front:
        served: list[int] = []

        def storm_beside_steady_clients(vanishing: int) -> None:
            """``vanishing`` uploads cut short while two other clients classify photos."""
            stop = threading.Event()

            def steady_client() -> None:
                while not stop.is_set():
                    files = {"file": (PHOTO.filename, PHOTO.data, PHOTO.content_type)}
                    served.append(
                        httpx.post(f"{front.url}/v1/classify", files=files, timeout=60).status_code
                    )

            with ThreadPoolExecutor(2) as pool:
                steady = [pool.submit(steady_client) for _ in range(2)]
                try:
                    for index in range(vanishing):
                        fraction = (0.1, 0.5, 0.95, 1.0)[index % 4]  # 1.0: gone before the answer
                        vanish(front.port, body, fraction, reset=index % 2 == 0)
                finally:
                    stop.set()
                for future in steady:
                    future.result()
            wait_for(lambda: in_flight(front.url) == 0, "no request left in flight")

        # The first round brings arenas and caches to their working size under this very mix;
        # a leak shows as growth over the second.
        storm_beside_steady_clients(12)
        baseline = front.resources()
        storm_beside_steady_clients(12)
        assert served and set(served) == {200}, served
        # A leaked socket or spooled file per vanished upload would be +12 here; +2 is the noise
        # of connections the server has not yet seen closed.
        wait_for(
            lambda: front.resources().open_fds <= baseline.open_fds + 2,
            "open files back to where they were",
        )
        # Uploads over 1 MB are spooled to (unnamed) temporary files: none may stay open.
        temporary = [
            f.path
            for f in psutil.Process(front.pid).open_files()
            if f.path.startswith(tempfile.gettempdir()) and f.path != str(front.log_path)
        ]
        assert not temporary, temporary
        now = front.resources()
        grown_mb = (now.rss_bytes - baseline.rss_bytes) / 2**20
        print(
            f"{len(served)} steady requests served during 24 vanishing {body_mb} MB uploads; "
            f"RSS over the second 12: {grown_mb:+.0f} MB, open files {baseline.open_fds} -> "
            f"{now.open_fds}"
        )
        # No bound on RSS here: over 12 uploads it moves by +-70 MB with glibc arenas (2-4 MP
        # decodes on several threads), a noise larger than any leak it could show. Open files,
        # spooled files and slots above are the exact checks; the soak measures RSS.
        assert classify_batch(front.url).status_code == 200
        log = front.log_path.read_text()
    assert "Traceback" not in log and "500 Internal" not in log, log[-3000:]
