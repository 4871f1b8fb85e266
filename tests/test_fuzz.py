"""Hostile uploads: mutated JPEG, PNG, GIF, WebP, TIFF and BMP bytes and random multipart bodies
to the app in process (FastAPI's TestClient); huge and malformed headers over raw sockets to a
real ``python -m server`` (uvicorn's own limits). Every request gets a documented answer (never
a 5xx), nothing crashes, and memory and open files stay bounded.

Hypothesis drives the mutations with a bounded number of examples (the whole module runs in
well under a minute on two cores); a failure prints the exact bytes that caused it.
"""

from __future__ import annotations

import os
import socket
import time
from collections import Counter
from collections.abc import Callable

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.main import create_app
from server.settings import Settings
from testkit.checks import Expected, check_classification
from testkit.images import encode, smooth_image
from testkit.processes import Resources, ServerProcess, sample_resources

# What the API documents for a bad upload; 5xx is never acceptable.
DOCUMENTED = {200, 400, 413, 415, 422}
SCALE = 64
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
MAX_RSS_GROWTH_MB = 150
STATUSES: Counter[str] = Counter()  # what the run got, printed by the last test (pytest -s)


def _seed(fmt: str) -> bytes:
    image = smooth_image(96, 72, seed=len(fmt))
    if fmt == "GIF":  # animated: two frames
        second = smooth_image(96, 72, seed=99)
        return encode(image, "GIF", save_all=True, append_images=[second], duration=100, loop=0)
    return encode(image, fmt)


SEEDS = {fmt: _seed(fmt) for fmt in ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP")}
MIME = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "GIF": "image/gif",
    "WEBP": "image/webp",
    "TIFF": "image/tiff",
    "BMP": "image/bmp",
}


# Small limits: a mutated header claiming a huge image or a large body is refused cheaply.
LIMITS = {"scales": (SCALE,), "max_upload_mb": 2, "max_pixels": 4_000_000}


def warm(client) -> None:
    """One good request: sessions and arenas exist before resources are measured."""
    ok = client.post("/v1/classify", files={"file": ("a.png", SEEDS["PNG"], "image/png")})
    assert ok.status_code == 200, ok.text


@pytest.fixture(scope="module")
def client(two_model_repository, app_log):
    """The app in this process; ``client.baseline``: this process's resources once warm."""
    repository, _ = two_model_repository
    with TestClient(create_app(Settings(repository=repository, **LIMITS))) as client:
        warm(client)
        client.baseline = sample_resources(os.getpid())
        yield client
    log = app_log.text()
    assert "Traceback" not in log and "Exception in ASGI" not in log, log[-5000:]


@pytest.fixture(scope="module")
def server(two_model_repository, tmp_path_factory):
    """The same app in a real server, for requests no HTTP client would write."""
    repository, _ = two_model_repository
    log_dir = tmp_path_factory.mktemp("fuzz-logs")
    args = [
        "--repository",
        str(repository),
        "--scales",
        str(SCALE),
        "--max-upload-mb",
        "2",
        "--max-pixels",
        "4000000",
    ]
    with ServerProcess(*args, log_dir=log_dir) as front:
        with httpx.Client(base_url=front.url, timeout=60) as client:
            warm(client)
        front.baseline = front.resources()
        yield front
    log = front.log()
    assert "Traceback" not in log and "Exception in ASGI" not in log, front.log_tail(80)


def assert_documented(response: httpx.Response, expected: Expected | None = None) -> None:
    """A documented status with a JSON body: the result, or ``{"detail": "..."}``."""
    STATUSES[f"{response.request.url.path} {response.status_code}"] += 1
    assert response.status_code in DOCUMENTED, (response.status_code, response.text[:500])
    body = response.json()
    if response.status_code == 200 and expected is not None:
        size = body.get("image", {})  # a mutation may change the size in the header
        at_size = Expected(
            **{**expected.__dict__, "width": size.get("width"), "height": size.get("height")}
        )
        assert check_classification(body, at_size) == []
    elif response.status_code != 200:
        assert isinstance(body.get("detail"), str) and body["detail"], body


@st.composite
def mutated_images(draw) -> tuple[str, bytes]:
    """A seed file with 1-4 random edits: some in the magic number (then it is no image at all),
    more in the rest of the header (sizes, modes, chunk lengths), most anywhere in the data."""
    fmt = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[fmt])
    for _ in range(draw(st.integers(1, 4))):
        end = max(1, len(data))
        region = draw(st.sampled_from(("magic", "header", "header", "data", "data", "data")))
        low, high = {"magic": (0, 7), "header": (8, 63), "data": (8, end - 1)}[region]
        where = draw(st.integers(min(low, end - 1), max(min(low, end - 1), min(high, end - 1))))
        edit = draw(st.sampled_from(("flip", "byte", "insert", "delete", "truncate", "repeat")))
        if edit == "flip" and data:
            data[where] ^= 1 << draw(st.integers(0, 7))
        elif edit == "byte" and data:
            data[where] = draw(st.sampled_from((0x00, 0xFF, 0x7F, 0x80, draw(st.integers(0, 255)))))
        elif edit == "insert":
            data[where:where] = draw(st.binary(min_size=1, max_size=32))
        elif edit == "delete":
            del data[where : where + draw(st.integers(1, 64))]
        elif edit == "truncate":
            del data[where:]
        elif edit == "repeat":
            data[where:where] = data[where : where + draw(st.integers(1, 256))]
    return fmt, bytes(data)


EXPECTED = Expected(
    top_k=5,
    scales=(SCALE,),
    flip=False,
    models=("m16", "m19"),
    mode="dense",
    heatmap=False,
    width=0,
    height=0,
)


# Pillow warns about the corrupt metadata it skips in a mutated file: the answer is what counts.
@pytest.mark.filterwarnings("ignore::UserWarning:PIL")
@FUZZ
@given(mutated_images())
def test_mutated_images_get_a_documented_answer(client, sample):
    fmt, data = sample
    files = {"file": (f"mutated.{fmt.lower()}", data, MIME[fmt])}
    response = client.post("/v1/classify", params={"flip": "false"}, files=files)
    assert_documented(response, EXPECTED)


@st.composite
def multipart_bodies(draw) -> tuple[str, bytes]:
    """A multipart request as a hostile client writes it: odd boundaries, names, headers,
    missing terminators, bare LFs, and parts that are images, broken images or noise."""
    # RFC 2046 boundary characters; no space at the ends (no client can send that header).
    token = st.text("abcXYZ0189'()+_,-./:=? ", min_size=1, max_size=70).map(str.strip)
    boundary = draw(token.filter(bool))
    declared = draw(st.sampled_from((boundary, boundary, f'"{boundary}"', "", "other")))
    newline = draw(st.sampled_from((b"\r\n", b"\r\n", b"\n")))
    content_type = draw(
        st.sampled_from(
            (
                f"multipart/form-data; boundary={declared}",
                "multipart/form-data",
                f"multipart/mixed; boundary={declared}",
                "application/octet-stream",
                f"multipart/form-data; boundary={declared}; charset=utf-8",
            )
        )
    )
    body = b""
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from(("file", "files", "", "x", 'fi"le', "file\x00")))
        disposition = f'form-data; name="{name}"'
        if draw(st.booleans()):
            disposition += f'; filename="{draw(st.text(max_size=20))}"'
        headers = [f"Content-Disposition: {disposition}"]
        if draw(st.booleans()):
            headers.append(f"Content-Type: {draw(st.sampled_from(sorted(MIME.values())))}")
        if draw(st.booleans()):
            headers.append(
                f"{draw(st.text('Xab-', min_size=1, max_size=8))}: {draw(st.text(max_size=40))}"
            )
        payload = draw(
            st.one_of(
                st.sampled_from(list(SEEDS.values())),
                st.sampled_from(list(SEEDS.values())).map(lambda b: b[: len(b) // 2]),
                st.binary(max_size=512),
            )
        )
        encoded = [h.encode("utf-8", "surrogatepass") for h in headers]
        body += b"--" + boundary.encode() + newline + newline.join(encoded) + newline + newline
        body += payload + newline
    body += draw(
        st.sampled_from(
            (b"--" + boundary.encode() + b"--" + newline, b"", b"--" + boundary.encode())
        )
    )
    return content_type, body


@FUZZ
@given(multipart_bodies(), st.sampled_from(("/v1/classify", "/v1/classify/batch")))
def test_random_multipart_bodies_get_a_documented_answer(client, request_body, path):
    content_type, body = request_body
    response = client.post(
        path, params={"flip": "false"}, content=body, headers={"Content-Type": content_type}
    )
    assert_documented(response)


def raw_exchange(port: int, request: bytes, chunk: int = 1 << 16) -> bytes:
    """Send ``request`` on a fresh connection; what came back before the server closed it.

    The server may close before everything is sent (it refused early): that is allowed.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        try:
            for start in range(0, len(request), chunk):
                sock.sendall(request[start : start + chunk])
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = b""
        try:
            while not _complete(answer):
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        except (ConnectionResetError, TimeoutError):
            pass
        return answer


def _complete(answer: bytes) -> bool:
    """A whole response: headers, and as many body bytes as Content-Length says."""
    head, found, body = answer.partition(b"\r\n\r\n")
    if not found:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return True


HUGE = 50 * 2**20  # 50 MB of header: refused long before it is all read
HOSTILE_REQUESTS = {
    "huge header": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * HUGE + b"\r\n\r\n",
    "100k headers": b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
    + b"".join(b"X-H%d: v\r\n" % i for i in range(100_000))
    + b"\r\n",
    "huge query": b"GET /healthz?" + b"a=b&" * 200_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "huge boundary": b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data;"
    b" boundary=" + b"b" * 100_000 + b"\r\nContent-Length: 4\r\n\r\nabcd",
    "not http": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64 + b"\r\n\r\n",
    "negative length": b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    "two lengths": b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
    b"Content-Length: 9\r\n\r\nabcd",
    "bad chunking": b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Type: multipart/form-data; boundary=zz\r\n\r\nzzzz\r\n",
}


@pytest.mark.parametrize("name", list(HOSTILE_REQUESTS))
def test_huge_and_malformed_requests_are_refused_with_400(server, name):
    before = server.resources().rss_bytes
    answer = raw_exchange(server.port, HOSTILE_REQUESTS[name])
    status_line = answer.split(b"\r\n", 1)[0]
    # 400, or (for bytes that are not HTTP at all) a closed connection: never a 5xx or a hang.
    assert status_line.startswith(b"HTTP/1.1 4") or answer == b"", answer[:200]
    if answer:
        assert status_line.startswith(b"HTTP/1.1 400"), answer[:200]
    grown_mb = (server.resources().rss_bytes - before) / 2**20
    assert grown_mb < 20, f"RSS grew by {grown_mb:.0f} MB for one {name} request"
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def assert_whole(client, baseline: Resources, sample: Callable[[], Resources]) -> str:
    """Still serving, nothing in flight, no 5xx counted, memory and open files bounded."""
    ok = client.post("/v1/classify", files={"file": ("a.jpg", SEEDS["JPEG"], "image/jpeg")})
    assert ok.status_code == 200
    metrics = client.get("/metrics").text
    assert 'status="500"' not in metrics and 'status="503"' not in metrics
    assert "vggserve_in_flight_requests 0.0" in metrics
    time.sleep(0.5)  # let closed connections' sockets be released
    now = sample()
    grown_mb = (now.rss_bytes - baseline.rss_bytes) / 2**20
    assert grown_mb < MAX_RSS_GROWTH_MB, f"RSS grew by {grown_mb:.0f} MB"
    assert now.open_fds <= baseline.open_fds + 5, (baseline, now)
    return f"RSS {grown_mb:+.0f} MB, open files {baseline.open_fds} -> {now.open_fds}"


def test_app_is_whole_after_the_fuzzing(client):
    summary = assert_whole(client, client.baseline, lambda: sample_resources(os.getpid()))
    print(f"fuzz: {dict(sorted(STATUSES.items()))}; {summary}")


def test_server_is_whole_after_the_hostile_requests(server):
    assert server.alive()
    with httpx.Client(base_url=server.url, timeout=60) as client:
        summary = assert_whole(client, server.baseline, server.resources)
    print(f"hostile requests: {summary}")
