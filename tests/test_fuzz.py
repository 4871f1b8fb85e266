"""Hostile uploads: mutated JPEG, PNG, GIF, WebP, TIFF and BMP bytes and random multipart bodies
to the app in process (FastAPI's TestClient); huge and malformed headers over raw sockets to a
real ``python -m server`` (uvicorn's own limits). Every request gets a documented answer (never
a 5xx, never an empty answer where a status is due), nothing crashes, and memory and open files
stay bounded. Every image answered 200 is answered with the numbers the library computes in this
process for the same bytes.

Hypothesis drives the mutations with a bounded number of examples (the whole module runs in
well under a minute on two cores); a failure prints the exact bytes that caused it.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from inference import ImageError, read_repository
from inference.backends.onnxruntime import OnnxRuntimeBackend
from server.main import create_app
from server.settings import Settings
from testkit.checks import Expected, check_classification
from testkit.expected_posteriors import ImagePosteriors, image_posteriors
from testkit.images import encode, smooth_image
from testkit.processes import Resources, ServerProcess, sample_resources
from testkit.raw_http import exchange

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
def client(two_model_repository, app_log, library):
    """The app in this process; ``client.baseline``: this process's resources once warm (the
    library's sessions, which live in this process too, already open)."""
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


class Library:
    """The protocol in this process (ONNX Runtime on the same repository, the server's decoder
    and limits): what the server must answer for an image's bytes."""

    def __init__(self, repository) -> None:
        self.models = read_repository(repository)
        self.backend = OnnxRuntimeBackend(self.models)
        self.model_scales = {name: (SCALE,) for name in self.models}
        self._answers: dict[str, ImagePosteriors | ImageError] = {}

    def answer(self, data: bytes) -> ImagePosteriors | ImageError:
        """The image's dense posteriors at Q=64, or the error the decoder raises for it."""
        key = hashlib.sha256(data).hexdigest()
        if key not in self._answers:
            try:
                self._answers[key] = image_posteriors(
                    self.backend,
                    self.models,
                    data,
                    self.model_scales,
                    modes=("dense",),
                    max_pixels=LIMITS["max_pixels"],
                )
            except ImageError as exc:
                self._answers[key] = exc
        return self._answers[key]

    def problems(self, body: dict, data: bytes) -> list[str]:
        """What is wrong with ``body`` as the answer for the image ``data``."""
        answer = self.answer(data)
        if isinstance(answer, ImageError):
            return [f"answered 200, but the library refuses these bytes: {answer}"]
        expected = replace(EXPECTED, width=answer.width, height=answer.height, posteriors=answer)
        return check_classification(body, expected)


@pytest.fixture(scope="module")
def library(two_model_repository) -> Library:
    repository, _ = two_model_repository
    return Library(repository)


def assert_documented(
    response: httpx.Response, library: Library, candidates: Sequence[bytes] = ()
) -> None:
    """A documented status with a JSON body: for an error ``{"detail": "..."}``; for a 200 the
    result the library computes for one of the ``candidates`` (the image files sent), or for
    a batch one result per file, each either that or an error."""
    STATUSES[f"{response.request.url.path} {response.status_code}"] += 1
    assert response.status_code in DOCUMENTED, (response.status_code, response.text[:500])
    body = response.json()
    if response.status_code != 200:
        assert isinstance(body.get("detail"), str) and body["detail"], body
        return
    results = body.get("results", [body])
    for result in results:
        if "error" in result:
            assert result["error"]["status"] in DOCUMENTED - {200}, result
            assert isinstance(result["error"]["message"], str) and result["error"]["message"]
            continue
        found = [library.problems(result, data) for data in dict.fromkeys(candidates)]
        assert any(problems == [] for problems in found), (result, found)


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
def test_mutated_images_get_a_documented_answer(client, library, sample):
    fmt, data = sample
    files = {"file": (f"mutated.{fmt.lower()}", data, MIME[fmt])}
    response = client.post("/v1/classify", params={"flip": "false"}, files=files)
    assert_documented(response, library, [data])


@pytest.mark.parametrize("fmt", sorted(SEEDS))
def test_seed_images_get_the_library_answer(client, library, fmt):
    files = {"file": (f"seed.{fmt.lower()}", SEEDS[fmt], MIME[fmt])}
    response = client.post("/v1/classify", params={"flip": "false"}, files=files)
    assert response.status_code == 200, response.text
    assert library.problems(response.json(), SEEDS[fmt]) == []


@st.composite
def multipart_bodies(draw) -> tuple[str, bytes, list[bytes]]:
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
    body, payloads = b"", []
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
        payloads.append(payload)
        encoded = [h.encode("utf-8", "surrogatepass") for h in headers]
        body += b"--" + boundary.encode() + newline + newline.join(encoded) + newline + newline
        body += payload + newline
    body += draw(
        st.sampled_from(
            (b"--" + boundary.encode() + b"--" + newline, b"", b"--" + boundary.encode())
        )
    )
    return content_type, body, payloads


def well_formed(field: str, *payloads: bytes) -> tuple[str, bytes, list[bytes]]:
    """A multipart body as a browser writes it, one part per payload (a multipart_bodies value)."""
    body = b""
    for index, payload in enumerate(payloads):
        body += (
            (
                f'--zz\r\nContent-Disposition: form-data; name="{field}"; filename="f{index}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            + payload
            + b"\r\n"
        )
    return "multipart/form-data; boundary=zz", body + b"--zz--\r\n", list(payloads)


# Bodies that classify (random ones seldom do), so the answers' numbers are checked every run.
@FUZZ
@example(well_formed("file", SEEDS["WEBP"]), "/v1/classify")
@example(well_formed("files", SEEDS["TIFF"], b"noise", SEEDS["BMP"]), "/v1/classify/batch")
@given(multipart_bodies(), st.sampled_from(("/v1/classify", "/v1/classify/batch")))
def test_random_multipart_bodies_get_a_documented_answer(client, library, request_body, path):
    content_type, body, payloads = request_body
    response = client.post(
        path, params={"flip": "false"}, content=body, headers={"Content-Type": content_type}
    )
    assert_documented(response, library, payloads)


# How the server must answer each hostile request below.
# The API's own refusal: 400 with a JSON {"detail"}, the connection kept open for the next request.
APP = "app"
# uvicorn's HTTP parser (h11) refuses the request before the app sees it: 400 with its plain-text
# message "Invalid HTTP request received." and Connection: close, then it closes. After a
# malformed request line, headers or framing, the server cannot tell where a next request would
# begin, so it must close (RFC 9112 section 9.6, 11.2).
PARSER = "parser"
# No complete request ever arrives (the client sends part of one, then FIN): there is nothing to
# answer, and HTTP lets the server close without a response (RFC 9112 section 8); it closes
# cleanly (FIN, no byte sent).
CLOSE = "close"

HUGE = 50 * 2**20  # 50 MB of header: refused long before it is all read
HOSTILE_REQUESTS = {
    "huge header": (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * HUGE + b"\r\n\r\n",
        PARSER,
    ),
    "100k headers": (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-H%d: v\r\n" % i for i in range(100_000))
        + b"\r\n",
        PARSER,
    ),
    "huge query": (b"GET /healthz?" + b"a=b&" * 200_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", PARSER),
    # 60 kB of boundary: the head stays under the parser's 64 KiB limit, so the multipart
    # parser is what meets it.
    "huge boundary": (
        b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data;"
        b" boundary=" + b"b" * 60_000 + b"\r\nContent-Length: 4\r\n\r\nabcd",
        APP,
    ),
    "not http (TLS hello)": (
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64 + b"\r\n\r\n",
        PARSER,
    ),
    "negative length": (
        b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        PARSER,
    ),
    "two lengths": (
        b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
        b"Content-Length: 9\r\n\r\nabcd",
        PARSER,
    ),
    "bad chunking": (
        b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: multipart/form-data; boundary=zz\r\n\r\nzzzz\r\n",
        PARSER,
    ),
    "half a head, then FIN": (b"GET /healthz HTTP/1.1\r\nHost: x\r\n", CLOSE),
    # A multipart upload: the app waits for the whole body before it can answer (without a
    # multipart Content-Type it would answer 400 at once, before or after the FIN arrives).
    "upload cut short, then FIN": (
        b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
        b"Content-Type: multipart/form-data; boundary=zz\r\n\r\n--zz\r\n"
        b'Content-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n'
        + SEEDS["JPEG"][:100],
        CLOSE,
    ),
}


@pytest.mark.parametrize("name", list(HOSTILE_REQUESTS))
def test_huge_and_malformed_requests_get_400_or_a_clean_close(server, name):
    request, kind = HOSTILE_REQUESTS[name]
    before = server.resources().rss_bytes
    answer = exchange(server.port, request, wait_for_close=kind != APP, half_close=kind == CLOSE)
    response = answer.response
    if kind == CLOSE:
        assert answer.received == b"" and answer.closed and not answer.reset, answer
    else:
        # A whole answer (status line, headers, all of its body), never an empty one.
        assert response is not None, answer.received[:300]
        assert response.status == 400, response
    if kind == APP:
        assert response.headers["content-type"] == "application/json", response
        assert isinstance(response.json()["detail"], str) and response.json()["detail"]
        assert response.headers.get("connection") != "close", response
    if kind == PARSER:
        assert response.headers["content-type"].startswith("text/plain"), response
        assert response.body == b"Invalid HTTP request received.", response
        assert response.headers["connection"] == "close" and answer.closed, answer
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
