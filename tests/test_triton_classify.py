"""Triton's ``classify`` model against the HTTP API: the same answers, the same refusals.

A stock tritonclient sends encoded files; what comes back must equal, within 1e-6, what
``POST /v1/classify`` answers for the same file and options on the embedded ONNX Runtime
backend. Both run the same graphs on the same views, so they differ only by float rounding of
one run against another (a few 1e-8 on a posterior here), far inside 1e-6.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from fastapi.testclient import TestClient
from tritonclient.utils import InferenceServerException

from server.main import create_app
from server.settings import Settings
from testkit import REPOSITORY_ROOT
from testkit.images import build_image_set, header_bomb, jpeg, minimal_pdf, one_bit_bomb, truncated
from testkit.ports import free_ports

# The task's bound: classify must give the HTTP API's probabilities within this.
SAME = 1e-6
IMAGES = build_image_set(seed=3)[:6] + build_image_set(seed=3)[9:11]
REQUESTS = [
    {},  # the defaults: each model's serving scales (256,384,512), flips, both models, top 5
    {"scales": "256,384", "flip": False, "top_k": 3, "models": "m19"},
    {"mode": "both", "top_k": 7, "scales": "256"},
]


@pytest.fixture(scope="module")
def http_api(two_model_repository):
    """The HTTP API in this process, on the embedded ONNX Runtime backend."""
    repository, _ = two_model_repository
    with TestClient(create_app(Settings(repository=repository))) as client:
        yield client


@pytest.fixture(scope="module")
def triton(triton_server):
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    yield client
    client.close()


def http_answer(http_api: TestClient, data: bytes, parameters: dict):
    query = {k: str(v).lower() if isinstance(v, bool) else v for k, v in parameters.items()}
    return http_api.post("/v1/classify", params=query, files={"file": ("f", data)})


def files_input(*files: bytes, module=grpcclient):
    array = np.array([[data] for data in files], dtype=np.object_)
    tensor = module.InferInput("image", list(array.shape), "BYTES")
    tensor.set_data_from_numpy(array)
    return tensor


def classify(triton, *files: bytes, parameters: dict | None = None, outputs=None):
    requested = [grpcclient.InferRequestedOutput(name) for name in outputs] if outputs else None
    return triton.infer("classify", [files_input(*files)], outputs=requested, parameters=parameters)


def assert_same(got_probabilities, got_indices, got_labels, expected: list[dict]) -> None:
    assert [int(i) for i in got_indices] == [p["index"] for p in expected]
    assert [label.decode() for label in got_labels] == [p["label"] for p in expected]
    np.testing.assert_allclose(
        got_probabilities, [p["probability"] for p in expected], rtol=0, atol=SAME
    )


@pytest.mark.parametrize("parameters", REQUESTS, ids=["defaults", "options", "both-modes"])
def test_stock_client_gets_the_http_api_answer(triton, http_api, parameters):
    for upload in IMAGES:
        expected = http_answer(http_api, upload.data, parameters)
        assert expected.status_code == 200, expected.text
        expected = expected.json()
        result = classify(triton, upload.data, parameters=parameters)
        assert_same(
            result.as_numpy("probabilities")[0],
            result.as_numpy("indices")[0],
            result.as_numpy("labels")[0],
            expected["predictions"],
        )
        models = [name.decode() for name in result.as_numpy("models")[0]]
        assert models == expected["models"]
        for m, name in enumerate(models):
            assert_same(
                result.as_numpy("model_probabilities")[0][m],
                result.as_numpy("model_indices")[0][m],
                result.as_numpy("model_labels")[0][m],
                expected["per_model"][name],
            )
        assert result.as_numpy("scales")[0].tolist() == expected["scales"]
        width, height = result.as_numpy("image_size")[0].tolist()
        assert {"width": width, "height": height} == expected["image"]


def test_kserve_http_with_binary_data_gives_the_same(triton_server, triton):
    data = jpeg(300, 200, seed=5)
    parameters = {"top_k": 4, "flip": True}
    client = httpclient.InferenceServerClient(triton_server.http_url)
    outputs = [
        httpclient.InferRequestedOutput(n, binary_data=True) for n in ("probabilities", "indices")
    ]
    via_http = client.infer(
        "classify", [files_input(data, module=httpclient)], outputs=outputs, parameters=parameters
    )
    via_grpc = classify(triton, data, parameters=parameters)
    assert via_http.as_numpy("indices").tolist() == via_grpc.as_numpy("indices").tolist()
    # The same model on the same file: equal up to the rounding of two separate runs.
    np.testing.assert_allclose(
        via_http.as_numpy("probabilities"), via_grpc.as_numpy("probabilities"), rtol=0, atol=SAME
    )
    client.close()


def test_several_files_in_one_request_each_get_their_own_answer(triton):
    files = [upload.data for upload in IMAGES[:3]]
    together = classify(triton, *files, parameters={"top_k": 3})
    assert together.as_numpy("indices").shape == (3, 3)
    for row, data in enumerate(files):
        alone = classify(triton, data, parameters={"top_k": 3})
        assert together.as_numpy("indices")[row].tolist() == alone.as_numpy("indices")[0].tolist()
        np.testing.assert_allclose(
            together.as_numpy("probabilities")[row],
            alone.as_numpy("probabilities")[0],
            rtol=0,
            atol=SAME,
        )


def refusals() -> list[tuple[str, bytes, dict]]:
    """(what, file, parameters) the HTTP API refuses with a 4xx."""
    good = jpeg(120, 90, seed=1)
    return [
        ("not an image", b"plain text, not an image", {}),
        ("a PDF", minimal_pdf(), {}),
        ("a truncated JPEG", truncated(jpeg(400, 300, seed=2), 0.4), {}),
        ("a header claiming 60 MP", header_bomb(10_000, 6_000), {}),
        ("60 MP of one-bit pixels", one_bit_bomb(10_000, 6_000), {}),
        ("an extreme aspect ratio", jpeg(4000, 20, seed=3), {}),
        ("scales not numbers", good, {"scales": "256,big"}),
        ("a scale below the crop", good, {"scales": "32"}),
        ("top_k zero", good, {"top_k": 0}),
        ("an unknown model", good, {"models": "m16,vgg99"}),
        ("an unknown mode", good, {"mode": "sliding"}),
    ]


@pytest.mark.parametrize("what, data, parameters", refusals(), ids=[r[0] for r in refusals()])
def test_a_refused_request_carries_the_http_api_message(triton, http_api, what, data, parameters):
    expected = http_answer(http_api, data, parameters)
    assert 400 <= expected.status_code < 500, (what, expected.text)
    with pytest.raises(InferenceServerException) as refused:
        classify(triton, data, parameters=parameters)
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert refused.value.message() == expected.json()["detail"]
    # One refused request leaves the model serving the next.
    assert classify(triton, jpeg(96, 96, seed=4)).as_numpy("indices").shape == (1, 5)


def test_one_bad_file_among_several_is_named(triton):
    files = [jpeg(96, 96, seed=1), b"not an image", jpeg(96, 96, seed=2)]
    with pytest.raises(InferenceServerException) as refused:
        classify(triton, *files)
    assert refused.value.message().startswith("file 2 of 3: the file is not an image")


def test_parameters_of_the_wrong_type_name_the_parameter(triton):
    for parameters, needle in (
        ({"flip": "sometimes"}, "flip: must be true or false"),
        ({"top_k": "five"}, "top_k: must be an integer"),
        ({"heatmap": 3}, "heatmap: must be true or false"),
    ):
        with pytest.raises(InferenceServerException) as refused:
            classify(triton, jpeg(96, 96), parameters=parameters)
        assert refused.value.message().startswith(needle)


def test_heatmap_equals_the_http_api_heatmap(triton, http_api):
    data = jpeg(200, 150, seed=6)
    expected = http_answer(http_api, data, {"heatmap": True, "scales": "256"}).json()["heatmap"]
    result = classify(triton, data, parameters={"heatmap": True, "scales": "256"})
    heatmap = result.as_numpy("heatmap")[0]
    assert heatmap.shape == (expected["height"], expected["width"])
    # Raw class scores (not posteriors): fp32 rounding of scores of magnitude ~10.
    np.testing.assert_allclose(heatmap, expected["scores"], rtol=1e-5, atol=1e-5)
    assert int(result.as_numpy("indices")[0][0]) == expected["index"]


DOC = REPOSITORY_ROOT / "docs" / "triton.md"


def documented(marker: str) -> str:
    """The code block that follows ``<!-- marker -->`` in docs/triton.md."""
    found = re.search(rf"<!-- {marker} -->\s*```\w+\n(.*?)```", DOC.read_text(), re.S)
    assert found, f"docs/triton.md has no code block after <!-- {marker} -->"
    return found.group(1)


@contextlib.contextmanager
def foreground(command: list[str]):
    """``make triton`` in the foreground until it says it is ready; Ctrl-C (SIGINT to its process
    group, as a terminal sends it) when done."""
    process = subprocess.Popen(
        command,
        cwd=REPOSITORY_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        lines = []
        for line in process.stderr:  # ends when the process does: a failed start
            lines.append(line)
            if line.startswith("tritonlocal: ready"):
                break
        assert lines and lines[-1].startswith("tritonlocal: ready"), "".join(lines[-20:])
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_documented_client_runs_against_make_triton(two_model_repository, http_api, tmp_path):
    """The tritonclient snippet of docs/triton.md, as a user runs it, against ``make triton``."""
    repository, _ = two_model_repository
    http, grpc, metrics = free_ports(3)
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(jpeg(320, 240, seed=8))
    snippet = documented("classify-tritonclient")
    assert snippet.count('"127.0.0.1:8001"') == 1 and snippet.count('"photo.jpg"') == 1
    script = tmp_path / "client.py"
    script.write_text(
        snippet.replace('"127.0.0.1:8001"', f'"127.0.0.1:{grpc}"').replace(
            '"photo.jpg"', repr(str(photo))
        )
    )
    make = [
        "make",
        "--no-print-directory",
        "triton",
        f"MODEL_REPOSITORY={repository}",
        f"TRITON_HTTP_PORT={http}",
        f"TRITON_GRPC_PORT={grpc}",
        f"TRITON_METRICS_PORT={metrics}",
    ]
    with foreground(make):
        # Run as a user runs it: a plain script, outside the repository.
        printed = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path
        )
    assert printed.returncode == 0, printed.stderr
    expected = http_answer(http_api, photo.read_bytes(), {"scales": "256,384,512"}).json()
    lines = printed.stdout.split("\n")[:5]
    assert [line.rsplit(" ", 1)[0] for line in lines] == [
        p["label"] for p in expected["predictions"]
    ]
    for line, prediction in zip(lines, expected["predictions"], strict=True):
        assert abs(float(line.rsplit(" ", 1)[1]) - prediction["probability"]) <= 5e-5  # :.4f


def test_documented_curl_gets_the_same_top5(triton_server, triton, tmp_path):
    """The curl snippet of docs/triton.md (KServe v2 HTTP, binary data) as a user runs it."""
    assert shutil.which("curl"), "curl is needed: apt-get install curl (.ci/run installs it)"
    photo = jpeg(320, 240, seed=9)
    (tmp_path / "photo.jpg").write_bytes(photo)
    snippet = documented("classify-curl")
    assert snippet.count("http://127.0.0.1:8000/") == 1
    snippet = snippet.replace("http://127.0.0.1:8000/", f"http://{triton_server.http_url}/")
    printed = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", snippet],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert printed.returncode == 0, printed.stderr
    outputs = {output["name"]: output["data"] for output in json.loads(printed.stdout)["outputs"]}
    expected = classify(triton, photo, parameters={"scales": "256,384,512", "top_k": 5})
    assert outputs["indices"] == expected.as_numpy("indices")[0].tolist()
    assert outputs["labels"] == [label.decode() for label in expected.as_numpy("labels")[0]]
    np.testing.assert_allclose(
        outputs["probabilities"], expected.as_numpy("probabilities")[0], rtol=0, atol=SAME
    )
