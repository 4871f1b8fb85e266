"""Every response carries ``X-Request-ID``, and the server's one log line per request names it.

A client's usable id is echoed, anything else is replaced by a fresh uuid4 hex; in process
(FastAPI's TestClient) for the rules, and in a real ``python -m server`` for the log as a user
reads it (one line per request, uvicorn's own access line off).
"""

from __future__ import annotations

import logging
import re
import uuid

import httpx
import pytest
from fastapi.testclient import TestClient

from server.main import create_app
from server.settings import Settings
from testkit.images import jpeg
from testkit.processes import ServerProcess

FRESH_ID = re.compile(r"[0-9a-f]{32}")
LONGEST_ID = 128


@pytest.fixture(scope="module")
def client(two_model_repository):
    repo, _ = two_model_repository
    settings = Settings(repository=repo, scales=(64,), max_upload_mb=1)
    with TestClient(create_app(settings)) as client:
        yield client


def not_an_image(client: TestClient, **headers: str) -> httpx.Response:
    files = {"file": ("notes.txt", b"plain text", "text/plain")}
    return client.post("/v1/classify", files=files, headers=headers)


@pytest.mark.parametrize(
    "sent",
    [
        "abc",
        str(uuid.uuid4()),
        "Root=1-5759e988-bd862e3fe1be46a994272793",  # an AWS X-Ray style trace id
        "a" * LONGEST_ID,
    ],
)
def test_a_usable_client_id_is_echoed(client, sent):
    assert client.get("/healthz", headers={"X-Request-ID": sent}).headers["x-request-id"] == sent
    assert client.get("/nowhere", headers={"X-Request-ID": sent}).headers["x-request-id"] == sent
    response = not_an_image(client, **{"X-Request-ID": sent})
    assert response.status_code == 415 and response.headers["x-request-id"] == sent


@pytest.mark.parametrize(
    "sent",
    [
        b"a" * (LONGEST_ID + 1),
        b"",
        b"two words",
        b"tab\tinside",
        b"bell\x07",
        b'quote"d',
        b"semi;colon",
        "caf\u00e9".encode("latin-1"),
    ],
    ids=["too-long", "empty", "space", "tab", "control", "quote", "semicolon", "non-ascii"],
)
def test_an_unusable_client_id_is_replaced_by_a_fresh_one(client, sent):
    response = client.get("/healthz", headers=[(b"X-Request-ID", sent)])
    assert response.status_code == 200
    assert FRESH_ID.fullmatch(response.headers["x-request-id"]), response.headers


def test_without_a_client_id_every_response_gets_its_own(client):
    responses = [
        client.get("/healthz"),
        client.get("/nowhere"),
        client.get("/docs"),
        client.get("/static/docs/swagger-ui.css"),
        not_an_image(client),
        # Refused from Content-Length by the upload limit, before the body is read.
        client.post("/v1/classify", files={"file": ("big.jpg", bytes(2**20 + 1), "image/jpeg")}),
        client.post("/v1/classify", files={"file": ("photo.jpg", jpeg(96, 96), "image/jpeg")}),
    ]
    assert [r.status_code for r in responses] == [200, 404, 200, 200, 415, 413, 200]
    ids = [r.headers["x-request-id"] for r in responses]
    assert all(FRESH_ID.fullmatch(i) for i in ids) and len(set(ids)) == len(ids), ids


def test_each_request_is_logged_once_with_its_id(client, caplog):
    caplog.set_level(logging.INFO, logger="server.access")
    not_an_image(client, **{"X-Request-ID": "report-415"})
    client.get("/nowhere?x=1", headers={"X-Request-ID": "report-404"})
    fresh = client.get("/healthz").headers["x-request-id"]
    lines = [r.getMessage() for r in caplog.records if r.name == "server.access"]
    expected = {
        "report-415": '"POST /v1/classify HTTP/1.1" 415 ',
        "report-404": '"GET /nowhere?x=1 HTTP/1.1" 404 ',
        fresh: '"GET /healthz HTTP/1.1" 200 ',
    }
    for request_id, request_and_status in expected.items():
        (line,) = [line for line in lines if f"request_id={request_id}" in line]
        assert request_and_status in line, line
        assert re.search(r" \d+\.\d ms request_id=", line), line


def test_the_server_log_has_one_line_per_request_naming_its_id(two_model_repository, tmp_path):
    repo, _ = two_model_repository
    with ServerProcess("--repository", str(repo), "--scales", "64", log_dir=tmp_path) as server:
        sent = {
            "real-200": httpx.get(f"{server.url}/v1/models", headers={"X-Request-ID": "real-200"}),
            "real-404": httpx.get(f"{server.url}/nowhere", headers={"X-Request-ID": "real-404"}),
            "real-415": httpx.post(
                f"{server.url}/v1/classify",
                files={"file": ("notes.txt", b"plain text", "text/plain")},
                headers={"X-Request-ID": "real-415"},
            ),
        }
        log = server.log()
    for request_id, response in sent.items():
        assert response.headers["x-request-id"] == request_id
        (line,) = [line for line in log.splitlines() if request_id in line]
        assert f" {response.status_code} " in line and f"request_id={request_id}" in line, line
    # One line per request: uvicorn's access line (which has no id) is not written beside ours.
    assert len(re.findall(r'"GET /nowhere HTTP/1\.1"', log)) == 1, log
