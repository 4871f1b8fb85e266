"""The HTTP front end with ``--backend triton`` against the real tritonserver.

Same answers as the embedded ONNX Runtime backend; 503 (and ``/readyz`` false) while Triton is
down, at start or mid-run; back to 200 when Triton returns, without restarting the front end.
"""

from __future__ import annotations

import time

import httpx
import numpy as np
import tritonclient.grpc as grpcclient

from inference import decode_image
from inference.protocol import dense_batch, multicrop_batch
from testkit.images import jpeg
from testkit.processes import ServerProcess, local_triton
from testkit.tolerances import largest_score, posterior_bound

PARAMS = {"scales": "64,96,128", "top_k": 10}


def classify(url: str, data: bytes, **params) -> httpx.Response:
    files = {"file": ("image.jpg", data, "image/jpeg")}
    return httpx.post(f"{url}/v1/classify", params={**PARAMS, **params}, files=files, timeout=60)


def test_same_answers_as_the_embedded_backend(triton_server, two_model_repository, tmp_path):
    repository, torch_models = two_model_repository
    common = ["--repository", str(repository)]
    images = [
        jpeg(120, 90, seed=1, quality=95),
        jpeg(77, 150, seed=2, quality=95),
        jpeg(200, 200, seed=3, quality=95),
    ]
    # Only Triton's address: the models, labels and scales are read from Triton.
    triton_args = ["--backend", "triton", "--triton-url", triton_server.grpc_url]
    triton = grpcclient.InferenceServerClient(triton_server.grpc_url)
    calls_before = classify_calls(triton)
    requests = 0
    with (
        ServerProcess(*triton_args, log_dir=tmp_path) as via_triton,
        ServerProcess(*common, log_dir=tmp_path) as embedded,
    ):
        assert httpx.get(f"{via_triton.url}/readyz").json()["ready"] is True
        listed = httpx.get(f"{via_triton.url}/v1/models").json()
        assert {m["backend"] for m in listed["models"]} == {"triton"}
        # What Triton serves, described as the embedded server describes its repository.
        assert listed == {
            **httpx.get(f"{embedded.url}/v1/models").json(),
            "models": [{**m, "backend": "triton"} for m in listed["models"]],
        }
        for data in images:
            for params in ({}, {"mode": "both", "flip": "false"}):
                got = classify(via_triton.url, data, **params)
                requests += 1
                expected = classify(embedded.url, data, **params)
                assert got.status_code == expected.status_code == 200, got.text
                got, expected = got.json(), expected.json()
                pairs = [(got["predictions"], expected["predictions"])]
                pairs += [(got["per_model"][m], expected["per_model"][m]) for m in ("m16", "m19")]
                # The same graphs, possibly batched otherwise by Triton: equal within the fp32
                # bounds of testkit.tolerances.
                tolerance = posterior_tolerance(repository, torch_models, data, params)
                for mine, theirs in pairs:
                    assert [p["index"] for p in mine] == [p["index"] for p in theirs]
                    np.testing.assert_allclose(
                        [p["probability"] for p in mine],
                        [p["probability"] for p in theirs],
                        rtol=0,
                        atol=tolerance,
                    )
    # One classify call per request, nothing else from the front end.
    assert classify_calls(triton) - calls_before == requests
    triton.close()


def classify_calls(triton) -> int:
    """Requests Triton's classify model has answered successfully."""
    stats = triton.get_inference_statistics("classify", as_json=True)["model_stats"][0]
    return int(stats["inference_stats"]["success"].get("count", 0))


def posterior_tolerance(repository, torch_models, data: bytes, params: dict) -> float:
    """How far two fp32 runs of the served graphs may differ in a posterior of this request."""
    image = decode_image(data)
    scales = [int(q) for q in PARAMS["scales"].split(",")]
    flip = params.get("flip", "true") == "true"
    views = [dense_batch(image, q, flip) for q in scales]
    if params.get("mode", "dense") != "dense":
        views += [multicrop_batch(image, q, 64, flip) for q in scales]
    graphs = [repository / name / "1" / "model.onnx" for name in torch_models]
    return posterior_bound(torch_models.values(), largest_score(graphs, views))


def wait_for(condition, what: str, timeout: float = 120) -> None:
    """Poll until ``condition()`` holds; the deadline only bounds a hang."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.2)


def test_503_while_triton_is_down_then_success_without_restarting(two_model_repository, tmp_path):
    repository, _ = two_model_repository
    triton = local_triton(repository)
    grpc = triton.ports["grpc"]
    image = jpeg(110, 100, seed=4, quality=95)
    with ServerProcess(
        "--repository",
        str(repository),
        "--backend",
        "triton",
        "--triton-url",
        f"127.0.0.1:{grpc}",
        log_dir=tmp_path,
    ) as front:
        try:
            # Triton down at start: not ready, and a clear 503.
            ready = httpx.get(f"{front.url}/readyz")
            assert ready.status_code == 503 and ready.json()["ready"] is False
            assert f"Triton at 127.0.0.1:{grpc} is unreachable" in ready.json()["detail"]
            down = classify(front.url, image)
            assert down.status_code == 503
            assert f"Triton at 127.0.0.1:{grpc} is unreachable" in down.json()["detail"]
            assert "Retry-After" in down.headers

            triton.start()  # comes up later: the same front end serves
            wait_for(lambda: classify(front.url, image).status_code == 200, "200 after start")
            assert httpx.get(f"{front.url}/readyz").status_code == 200
            before = classify(front.url, image).json()

            triton.kill()  # dies while serving
            outage = classify(front.url, image)
            assert outage.status_code == 503, outage.text
            assert "unreachable" in outage.json()["detail"]
            assert httpx.get(f"{front.url}/readyz").status_code == 503

            triton.start()  # and comes back
            wait_for(lambda: classify(front.url, image).status_code == 200, "200 after restart")
            assert httpx.get(f"{front.url}/readyz").json()["ready"] is True
            assert classify(front.url, image).json()["predictions"] == before["predictions"]
            assert front.alive()  # the same front-end process throughout
        finally:
            triton.kill()
            triton.close()
