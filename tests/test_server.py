"""The HTTP API of the front end, in process (FastAPI's TestClient), two small models; and the
command line's ``--help`` and start-up failures, as a real ``python -m server``.

Numbers are checked against the independent PyTorch reference (``tests/reference.py``).
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient

from server.main import create_app
from server.settings import Settings
from testkit.checks import RESPONSE_KEYS
from testkit.images import decoded, encode, jpeg, smooth_image
from testkit.processes import run_server_command
from testkit.tolerances import posterior_bound

from .reference import protocol, protocol_modes

PREDICTION_KEYS = {"index", "label", "probability"}


@pytest.fixture(scope="module")
def client(two_model_repository):
    repo, _ = two_model_repository
    with TestClient(create_app(Settings(repository=repo))) as client:
        yield client


def classify(client: TestClient, data: bytes, name: str = "image.jpg", **params):
    return client.post("/v1/classify", params=params, files={"file": (name, data, "image/jpeg")})


def check_predictions(items: list[dict], probabilities: np.ndarray, k: int, tolerance: float):
    """Sorted by probability, top k of ``probabilities`` (the reference) within ``tolerance``
    (testkit.tolerances' posterior bound: fp32 served, float64 reference)."""
    assert len(items) == k
    assert all(set(item) == PREDICTION_KEYS for item in items)
    got = [item["probability"] for item in items]
    assert got == sorted(got, reverse=True)
    expected = np.argsort(-probabilities, kind="stable")[:k]
    assert [item["index"] for item in items] == expected.tolist()
    np.testing.assert_allclose(got, probabilities[expected], rtol=0, atol=tolerance)
    assert [item["label"] for item in items] == [f"class_{i}" for i in expected]


def test_default_request_matches_reference_and_schema(client, torch_models):
    data = jpeg(300, 300, seed=1)  # square: the cheapest reference at Q = 256, 384, 512
    response = classify(client, data)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == RESPONSE_KEYS  # no heatmap unless asked
    assert body["scales"] == [256, 384, 512] and body["flip"] is True
    assert body["models"] == ["m16", "m19"] and body["mode"] == "dense"
    assert body["image"] == {"width": 300, "height": 300}
    assert set(body["timing_ms"]) == {"decode", "preprocess", "inference", "total"}
    assert all(v >= 0 for v in body["timing_ms"].values())
    assert body["timing_ms"]["total"] >= body["timing_ms"]["inference"]

    image = decoded(data)
    models = [torch_models["m16"], torch_models["m19"]]
    reference = protocol(models, image)
    bound = posterior_bound(models, reference.largest_score)
    assert set(body["per_model"]) == {"m16", "m19"}
    for name, expected in zip(("m16", "m19"), reference.per_model, strict=True):
        check_predictions(body["per_model"][name], expected, 5, bound)
    check_predictions(body["predictions"], reference.probs, 5, bound)  # the mean over models


def test_query_parameters_are_honoured(client, torch_models):
    data = jpeg(240, 330, seed=2)
    response = classify(client, data, scales="64,100", flip="false", models="m19", top_k=3)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["scales"], body["flip"], body["models"]) == ([64, 100], False, ["m19"])
    assert list(body["per_model"]) == ["m19"]
    reference = protocol([torch_models["m19"]], decoded(data), scales=(64, 100), flip=False)
    bound = posterior_bound(torch_models["m19"], reference.largest_score)
    check_predictions(body["predictions"], reference.probs, 3, bound)


def test_heatmap_is_the_top1_score_map_at_the_largest_scale(client):
    response = classify(client, jpeg(320, 240, seed=3), scales="96,160", heatmap="true")
    assert response.status_code == 200, response.text
    body = response.json()
    heatmap = body["heatmap"]
    assert set(heatmap) == {"index", "label", "scale", "width", "height", "scores"}
    assert heatmap["index"] == body["predictions"][0]["index"]
    assert heatmap["label"] == body["predictions"][0]["label"]
    assert heatmap["scale"] == 160
    # crop 64 -> FC6 kernel 2: a map of (size / 32 - 1) cells a side; 160x213 -> 4 x 5.
    assert (heatmap["height"], heatmap["width"]) == (4, 5)
    scores = np.asarray(heatmap["scores"])
    assert scores.shape == (4, 5) and np.isfinite(scores).all() and scores.std() > 0


@pytest.mark.parametrize("flip", [True, False], ids=["flip", "no-flip"])
def test_multicrop_and_both_match_the_reference(client, torch_models, flip):
    # 3:2, so at Q = 64 and 96 (96 x 64 and 144 x 96) every crop start of the 5 x 5 grid is a
    # whole pixel: how a half pixel rounds is not the paper's to say, and not checked here.
    data = jpeg(300, 200, seed=4)
    models = [torch_models["m16"], torch_models["m19"]]
    references = protocol_modes(models, decoded(data), (64, 96), flip, crop=64)
    for mode in ("multicrop", "both"):
        params = {"scales": "64,96", "mode": mode, "flip": str(flip).lower(), "top_k": 10}
        response = classify(client, data, **params)
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["mode"], body["flip"], body["scales"]) == (mode, flip, [64, 96])
        reference = references[mode]
        bound = posterior_bound(models, reference.largest_score)
        for name, expected in zip(("m16", "m19"), reference.per_model, strict=True):
            check_predictions(body["per_model"][name], expected, 10, bound)
        check_predictions(body["predictions"], reference.probs, 10, bound)
        # Far from the dense answer, so the comparison tells the modes apart.
        assert np.abs(references["dense"].probs - reference.probs).max() > 100 * bound


def test_32_concurrent_requests_are_all_correct(client, torch_models):
    """Four different images, eight requests each, all in flight together."""
    images = [jpeg(160 + 16 * i, 128, seed=10 + i) for i in range(4)]
    models = [torch_models["m16"], torch_models["m19"]]
    expected = [protocol(models, decoded(d), scales=(64, 96)) for d in images]

    def one(i: int):
        return i % 4, classify(client, images[i % 4], scales="64,96", top_k=10)

    with ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(one, range(32)))
    for which, response in results:
        assert response.status_code == 200, response.text
        reference = expected[which]
        bound = posterior_bound(models, reference.largest_score)
        check_predictions(response.json()["predictions"], reference.probs, 10, bound)


def test_batch_keeps_order_and_isolates_a_bad_file(client, torch_models):
    good = [jpeg(200, 160, seed=20), jpeg(150, 220, seed=21)]
    files = [
        ("files", ("first.jpg", good[0], "image/jpeg")),
        ("files", ("notes.txt", b"these are not pixels\n", "text/plain")),
        ("files", ("second.jpg", good[1], "image/jpeg")),
        ("files", ("half.jpg", good[1][: len(good[1]) // 2], "image/jpeg")),
    ]
    response = client.post("/v1/classify/batch", params={"scales": "64", "top_k": 3}, files=files)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["filename"] for r in results] == ["first.jpg", "notes.txt", "second.jpg", "half.jpg"]
    models = [torch_models["m16"], torch_models["m19"]]
    for result, data in ((results[0], good[0]), (results[2], good[1])):
        assert "error" not in result
        assert set(result) == RESPONSE_KEYS | {"filename"}
        reference = protocol(models, decoded(data), (64,))
        bound = posterior_bound(models, reference.largest_score)
        check_predictions(result["predictions"], reference.probs, 3, bound)
    assert results[1]["error"]["status"] == 415
    assert "not an image" in results[1]["error"]["message"]
    assert results[3]["error"]["status"] == 422
    assert "truncated" in results[3]["error"]["message"]
    assert set(results[1]) == {"filename", "error"}


def test_batch_file_count_is_bounded(client):
    data = encode(smooth_image(8, 8, 0), "PNG")
    files = [("files", (f"{i}.png", data, "image/png")) for i in range(33)]
    response = client.post("/v1/classify/batch", files=files)
    assert response.status_code == 413
    assert "33 files" in response.json()["detail"] and "32" in response.json()["detail"]


def test_models_endpoint(client):
    response = client.get("/v1/models")
    assert response.status_code == 200
    body = response.json()
    assert body["default_scales"] == [256, 384, 512]
    assert [m["name"] for m in body["models"]] == ["m16", "m19"]
    m16 = body["models"][0]
    assert m16 == {
        "name": "m16",
        "arch": "vgg16",
        "classes": 10,
        "min_size": 64,
        "scales": [256, 384, 512],  # written into its config.pbtxt by the exporter
        "preprocessing": {
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
            "input": "uint8 RGB NCHW",
        },
        "backend": "onnxruntime",
        "version": 1,
        "precision": "fp32",
    }
    assert body["models"][1]["arch"] == "vgg19"


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"ready": True, "backend": "onnxruntime"}


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format, labels in any order (0 when absent)."""
    for line in text.splitlines():
        match = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if match is None or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if found == labels:
            return float(match.group(3))
    return 0.0


def test_metrics_count_requests_stages_and_load(client):
    before = client.get("/metrics").text
    assert classify(client, jpeg(100, 100, seed=5), scales="64").status_code == 200
    assert classify(client, b"plain text", name="x.txt").status_code == 415
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    after = response.text

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    requests = "vggserve_http_requests_total"
    assert delta(requests, endpoint="/v1/classify", method="POST", status="200") == 1
    assert delta(requests, endpoint="/v1/classify", method="POST", status="415") == 1
    for stage in ("decode", "preprocess", "inference", "total"):
        assert delta("vggserve_stage_duration_seconds_count", stage=stage) == 1
        assert metric(after, "vggserve_stage_duration_seconds_bucket", stage=stage, le="+Inf") >= 1
    assert (
        metric(after, "vggserve_http_request_duration_seconds_count", endpoint="/v1/classify") >= 2
    )
    assert "vggserve_in_flight_requests 0.0" in after
    assert "vggserve_waiting_requests 0.0" in after
    assert "vggserve_rejected_requests_total 0.0" in after


def test_openapi_documents_the_api(client):
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/v1/classify", "/v1/classify/batch", "/v1/models", "/healthz", "/readyz"} <= set(
        spec["paths"]
    )
    classify_op = spec["paths"]["/v1/classify"]["post"]
    assert {p["name"] for p in classify_op["parameters"]} == {
        "top_k",
        "scales",
        "flip",
        "models",
        "heatmap",
        "mode",
    }
    assert {"200", "413", "415", "422", "429", "503"} <= set(classify_op["responses"])


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_api_docs_load_only_this_servers_assets(client, page):
    """The docs pages work without internet access: every script, style and icon they name is
    a path on this server, served from the installed package, and their Content-Security-Policy
    keeps the browser from loading anything elsewhere."""
    response = client.get(page)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    # Any absolute or protocol-relative URL, in an attribute or in the inline script.
    assert not re.search(r"(?:https?:)?//", response.text), response.text
    assets = re.findall(r'\b(?:src|href|spec-url)="([^"]*)"|\burl: \'([^\']*)\'', response.text)
    paths = {path for pair in assets for path in pair if path}
    assert "/openapi.json" in paths and len(paths) >= 3, paths
    for path in paths:
        assert path.startswith("/"), path
        asset = client.get(path)
        assert asset.status_code == 200 and len(asset.content) > 1000, path
    # One directive whose sources are this origin and in-page content only: no host, no scheme
    # that reaches the network.
    policy = response.headers["content-security-policy"].split()
    assert policy[0] == "default-src" and "'self'" in policy
    assert set(policy[1:]) <= {"'self'", "'unsafe-inline'", "'unsafe-eval'", "data:", "blob:"}


def test_web_page_is_served_self_contained(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for needle in ('id="file-input"', 'id="predictions"', 'id="heatmap"', 'id="error"'):
        assert needle in page.text
    # Everything the page loads comes from this server: no CDN, no build output elsewhere.
    assets = re.findall(r'<(?:script|link|img)\b[^>]*\b(?:src|href)="([^"]*)"', page.text)
    assert "/static/app.js" in assets and "/static/style.css" in assets
    assert all(a.startswith("/") or a.startswith("data:") for a in assets), assets
    for asset in ("/static/app.js", "/static/style.css"):
        response = client.get(asset)
        assert response.status_code == 200
        assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", response.text)  # no URLs


def test_help_documents_every_flag():
    result = run_server_command("--help")
    assert result.returncode == 0
    for flag in (
        "--repository",
        "--models",
        "--backend",
        "--triton-url",
        "--host",
        "--port",
        "--scales",
        "--max-upload-mb",
        "--max-pixels",
        "--max-concurrency",
        "--max-queue",
        "--threads",
    ):
        assert flag in result.stdout
    assert "127.0.0.1:8001" in result.stdout and "8080" in result.stdout


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_missing_or_empty_repository_exits_with_one_line(tmp_path, kind):
    repo = tmp_path / "repo"
    if kind == "empty":
        repo.mkdir()
    result = run_server_command("--repository", str(repo), "--port", "18999")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "python export/to_onnx.py" in lines[0] and "make models" in lines[0]
    assert str(repo) in lines[0]


def test_bad_default_scales_exit_with_one_line(two_model_repository):
    repo, _ = two_model_repository
    result = run_server_command("--repository", str(repo), "--scales", "32", "--port", "18999")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "error: --scales: Q=32 is outside [64, 1024] (the smallest input m16, m19 accept is 64)"
    )
