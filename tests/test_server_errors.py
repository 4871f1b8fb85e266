"""Every bad input gets a clear JSON error with the right status, and the server stays up.

The app runs in process (FastAPI's TestClient) with small limits (1 MB uploads, 4 MP images, one
request at a time and one waiting); another points at a Triton that is not there, another serves
a graph that fails at run time. Bodies refused while they stream in are sent over raw sockets to
a real ``python -m server`` with the same limits.
"""

from __future__ import annotations

import re
import select
import socket
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import httpx
import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import TensorProto, helper

from export.repository import ModelInfo, write_model
from inference import classifier as classifier_module
from server.main import create_app
from server.settings import Settings
from testkit.images import (
    decoded,
    encode,
    header_bomb,
    jpeg,
    minimal_pdf,
    one_bit_bomb,
    smooth_image,
    truncated,
)
from testkit.ports import free_port
from testkit.processes import ServerProcess
from testkit.tolerances import posterior_bound

from .reference import protocol

LIMIT_MB = 1
MAX_PIXELS = 4_000_000
LIMITS = {
    "max_upload_mb": LIMIT_MB,
    "max_pixels": MAX_PIXELS,
    "max_concurrency": 1,
    "max_queue": 1,
    "scales": (64, 96),
}


@pytest.fixture(scope="module")
def client(two_model_repository, app_log):
    repo, _ = two_model_repository
    with TestClient(create_app(Settings(repository=repo, **LIMITS))) as client:
        yield client


@pytest.fixture(scope="module")
def server(two_model_repository, tmp_path_factory):
    """The same limits in a real server, for requests written on raw sockets."""
    repo, _ = two_model_repository
    args = [
        "--repository",
        str(repo),
        "--max-upload-mb",
        str(LIMIT_MB),
        "--max-pixels",
        str(MAX_PIXELS),
        "--max-concurrency",
        "1",
        "--max-queue",
        "1",
        "--scales",
        "64,96",
    ]
    with ServerProcess(*args, log_dir=tmp_path_factory.mktemp("logs")) as server:
        yield server


def post(
    client: TestClient, data: bytes, name: str = "upload.jpg", ctype: str = "image/jpeg", **params
):
    return client.post("/v1/classify", params=params, files={"file": (name, data, ctype)})


def assert_error(response: httpx.Response, status: int, *needles: str) -> str:
    """The status, a JSON ``{"detail": str}`` body, every needle in the message, and a request
    id (a fresh uuid4 in hex: these requests send none) to match the error to its log line."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"]), response.headers
    body = response.json()
    assert list(body) == ["detail"] and isinstance(body["detail"], str)
    for needle in needles:
        assert needle in body["detail"], body["detail"]
    return body["detail"]


# --- 400: the request lacks its image ---------------------------------------------------------


def test_no_file_field(client):
    response = client.post("/v1/classify", files={"image": ("a.jpg", jpeg(), "image/jpeg")})
    assert_error(response, 400, "no image uploaded", "'file'")


def test_not_multipart_at_all(client):
    response = client.post(
        "/v1/classify", content=b'{"file": "cat.jpg"}', headers={"content-type": "application/json"}
    )
    assert_error(response, 400, "multipart/form-data field 'file'")


def test_file_field_that_is_not_a_file(client):
    response = client.post("/v1/classify", data={"file": "cat.jpg"})
    assert_error(response, 400, "file", "expected an uploaded file")


def test_empty_file(client):
    assert_error(post(client, b"", name="empty.jpg"), 400, "'empty.jpg' is empty")


# --- 415: not an image ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, data, ctype",
    [
        ("notes.txt", b"hello, this is text\n" * 20, "text/plain"),
        ("noise.jpg", np.random.default_rng(0).bytes(4096), "image/jpeg"),
        ("paper.pdf", minimal_pdf(), "application/pdf"),
    ],
    ids=["text", "random-bytes", "pdf"],
)
def test_not_an_image(client, name, data, ctype):
    assert_error(post(client, data, name=name, ctype=ctype), 415, "not an image", "JPEG, PNG")


# --- 422: an image, but broken ------------------------------------------------------------------


def test_truncated_jpeg(client):
    assert_error(post(client, truncated(jpeg(320, 240, seed=3))), 422, "corrupt or truncated")


def test_corrupt_png(client):
    data = bytearray(encode(smooth_image(64, 64, 1), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 8 : idat + 40] = bytes(32)  # zeroed compressed pixels: zlib fails
    assert_error(post(client, bytes(data), name="bad.png", ctype="image/png"), 422, "corrupt")


def test_extreme_aspect_ratio(client):
    strip = encode(smooth_image(2000, 20, 2), "PNG")
    detail = assert_error(post(client, strip, ctype="image/png", scales="512"), 422, "2000x20")
    assert "aspect ratio" in detail


# --- 413: too big ---------------------------------------------------------------------------------


def test_pixel_count_over_the_limit_is_refused_before_decoding(client):
    bomb = one_bit_bomb(2500, 2000)  # 5 MP of 1-bit pixels in a few kilobytes
    assert len(bomb) < 20_000
    detail = assert_error(post(client, bomb, name="bomb.png", ctype="image/png"), 413)
    assert "2500x2000" in detail and "4,000,000" in detail


def test_header_claiming_a_huge_image_is_refused_before_decoding(client):
    # 100000 x 100000 claimed, one pixel of data: decoding would fail as truncated (422); the
    # 413 shows the size was judged from the header alone.
    bomb = header_bomb(100_000, 100_000)
    assert len(bomb) < 100
    assert_error(
        post(client, bomb, name="claim.png", ctype="image/png"),
        413,
        "too many pixels: 10,000,000,000, over the limit of",
        "downscale it",
    )


def test_upload_over_the_limit_declared_in_content_length(client):
    big = bytes(LIMIT_MB * 2**20 + 1)
    assert_error(
        post(client, big, name="big.jpg"), 413, "over the limit of 1 MB", "--max-upload-mb"
    )


def open_request(port: int, headers: dict[str, str]) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock.sendall(f"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}\r\n".encode())
    return sock


def read_response(sock: socket.socket, timeout: float = 10) -> tuple[int, bytes]:
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1]


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


MULTIPART_HEAD = (
    b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="huge.jpg"\r\n'
    b"Content-Type: image/jpeg\r\n\r\n"
)


def test_declared_oversize_body_is_refused_before_it_is_sent(server):
    """Content-Length says 50 MB; only 64 KB are ever sent, and 413 comes back at once."""
    sock = open_request(
        server.port,
        {"Content-Type": "multipart/form-data; boundary=XyZ", "Content-Length": str(50 * 2**20)},
    )
    with sock:
        sock.sendall(MULTIPART_HEAD + bytes(65536))
        # Any answer at all comes before the body: the rest of it is never sent. (The timeout
        # only bounds a hang.)
        status, body = read_response(sock, timeout=120)
    assert status == 413 and b"50.0 MB, over the limit of 1 MB" in body


def test_streamed_body_is_refused_as_soon_as_it_passes_the_limit(server):
    """Chunked upload without a length: the server counts bytes as they arrive and answers
    413 after about 1 MB, while the body is still unfinished (no final chunk is ever sent)."""
    sock = open_request(
        server.port,
        {"Content-Type": "multipart/form-data; boundary=XyZ", "Transfer-Encoding": "chunked"},
    )
    sent, offered = 0, 64 * 2**20  # far more than the limit, the socket buffers and any delay
    with sock:
        pieces = [MULTIPART_HEAD] + [bytes(65536)] * (offered // 65536)
        for piece in pieces:
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            sent += len(piece)
            if select.select([sock], [], [], 0.02)[0]:
                break  # the server answered before we finished
        status, body = read_response(sock, timeout=120)
    assert status == 413 and b"passed the limit of 1 MB while it was streaming in" in body
    # The final chunk is never sent, so the answer came while the body was unfinished; and it
    # came before everything was offered. (Socket buffers absorb a few MB, so what we managed to
    # send says little about where the server stopped reading.)
    assert sent < offered + len(MULTIPART_HEAD)


# --- 422: bad parameters, each named ----------------------------------------------------------------


@pytest.mark.parametrize(
    "params, needles",
    [
        ({"scales": "32"}, ["scales:", "Q=32", "64"]),
        ({"scales": "64,,96"}, ["scales:", "comma-separated"]),
        ({"scales": "64;96"}, ["scales:", "comma-separated"]),
        ({"models": "m16,vgg99"}, ["models:", "unknown model vgg99", "m16, m19"]),
        ({"models": ","}, ["models:", "comma-separated"]),
        ({"top_k": "0"}, ["top_k:", "between 1 and 10"]),
        ({"top_k": "11"}, ["top_k:", "between 1 and 10"]),
        ({"top_k": "five"}, ["top_k:", "integer"]),
        ({"mode": "sparse"}, ["mode:", "'dense', 'multicrop' or 'both'"]),
        ({"flip": "sometimes"}, ["flip:", "boolean"]),
    ],
    ids=lambda v: "-".join(v) if isinstance(v, dict) else None,
)
def test_bad_parameter_is_named(client, params, needles):
    assert_error(post(client, jpeg(96, 96), **params), 422, *needles)


# --- 429: overload -------------------------------------------------------------------------------


def metric_value(client: TestClient, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def test_burst_beyond_slot_and_queue_gets_429_with_retry_after(
    client, two_model_repository, monkeypatch
):
    """One slot and one queue place: of 12 simultaneous requests, the one in the slot is held
    until the others have been answered, so exactly 10 are refused at once, the admitted two are
    correct, and the refusals are counted."""
    _, torch_models = two_model_repository
    data = jpeg(256, 192, seed=7)
    rejected_before = metric_value(client, "vggserve_rejected_requests_total")

    # The admitted request waits in its view preparation (a worker thread) until released.
    release = threading.Event()
    make_batch = classifier_module.dense_batch

    def dense_batch_once_released(*args, **kwargs):
        assert release.wait(timeout=120), "the burst's other requests were never answered"
        return make_batch(*args, **kwargs)

    monkeypatch.setattr(classifier_module, "dense_batch", dense_batch_once_released)
    with ThreadPoolExecutor(max_workers=12) as pool:
        futures = [pool.submit(post, client, data, models="m19") for _ in range(12)]
        deadline = time.monotonic() + 120  # only bounds a hang
        while sum(f.done() for f in futures) < 10:
            assert time.monotonic() < deadline, "fewer than 10 answers while one request runs"
            wait(futures, timeout=0.1, return_when=FIRST_COMPLETED)
        release.set()
        responses = [f.result() for f in futures]
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 2 + [429] * 10, statuses
    reference = protocol([torch_models["m19"]], decoded(data), scales=(64, 96))
    bound = posterior_bound(torch_models["m19"], reference.largest_score)
    for response in responses:
        if response.status_code == 429:
            assert int(response.headers["retry-after"]) >= 1
            assert_error(response, 429, "at capacity", "retry in")
        else:
            got = [p["probability"] for p in response.json()["predictions"]]
            np.testing.assert_allclose(got, np.sort(reference.probs)[::-1][:5], rtol=0, atol=bound)
    rejected = metric_value(client, "vggserve_rejected_requests_total") - rejected_before
    assert rejected == 10
    # The burst is over: the next request is served.
    assert post(client, jpeg(96, 96)).status_code == 200


def test_server_survived_every_error_above(server, client, app_log):
    assert server.alive()
    assert client.get("/healthz").status_code == 200
    response = post(client, jpeg(128, 96, seed=9))
    assert response.status_code == 200 and len(response.json()["predictions"]) == 5
    assert metric_value(client, "vggserve_in_flight_requests") == 0
    assert "Traceback" not in app_log.text() and "Traceback" not in server.log()


# --- 503: the engine is down; 500: a bug ------------------------------------------------------------


def test_backend_down_is_503_and_not_ready(two_model_repository):
    repo, _ = two_model_repository
    nobody = f"127.0.0.1:{free_port()}"  # nothing listens there
    settings = Settings(repository=repo, backend="triton", triton_url=nobody, scales=(64,))
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["ready"] is False
        response = post(client, jpeg(96, 96))
        detail = assert_error(response, 503, "triton inference backend is unavailable", nobody)
        assert "retry" in detail.lower()
        assert int(response.headers["retry-after"]) >= 1
        # The models are Triton's: until it has answered once, no request can be judged.
        assert post(client, b"not an image").status_code == 503
        assert client.get("/v1/models").status_code == 503
        assert client.get("/healthz").status_code == 200


def broken_repository(root) -> None:
    """A model whose graph names its input "x", not "image": loads fine, fails on every run."""
    x = helper.make_tensor_value_info("x", TensorProto.UINT8, ["N", 3, "H", "W"])
    probs = helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 10])
    weights = helper.make_tensor("w", TensorProto.FLOAT, [3, 10], [1.0] * 30)
    nodes = [
        helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("GlobalAveragePool", ["xf"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    graph = helper.make_graph(nodes, "broken", [x], [probs], initializer=[weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    info = ModelInfo(
        name="broken",
        num_classes=10,
        mean=(0.5, 0.5, 0.5),
        std=(0.2, 0.2, 0.2),
        min_size=64,
        arch="vgg16",
    )
    write_model(root, info, 1, model.SerializeToString(), [f"c{i}" for i in range(10)])


def test_unexpected_failure_is_a_logged_json_500(tmp_path, caplog):
    broken_repository(tmp_path / "repo")
    settings = Settings(repository=tmp_path / "repo", scales=(64,))
    # raise_server_exceptions: an exception that escaped the app would fail this test here.
    with TestClient(create_app(settings), raise_server_exceptions=True) as client:
        response = post(client, jpeg(96, 96))
        request_id = response.headers["x-request-id"]
        assert_error(
            response, 500, "internal server error", "bug in vggserve", "logged", request_id
        )
        assert client.get("/healthz").status_code == 200
        assert post(client, b"").status_code == 400  # and still answers the rest correctly
        metrics = client.get("/metrics").text
        assert 'endpoint="/v1/classify",method="POST",status="500"} 1.0' in metrics
    # The user's report quotes the id; the traceback is found under it.
    assert f"unexpected error on POST /v1/classify (request_id={request_id})" in caplog.text
    assert caplog.text.count("Traceback") == 1  # logged once, and it never left the app
