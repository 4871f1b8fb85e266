"""The Locust load test: a short smoke run through ``loadtest/run.sh`` with no failed request,
and the checks it applies to every response catch wrong answers (so a pass means something)."""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from loadtest.monitor import Sample, growth
from server.main import create_app
from server.settings import Settings
from testkit import REPOSITORY_ROOT as ROOT
from testkit.checks import check_batch, check_classification
from testkit.images import build_image_set
from testkit.processes import ServerProcess
from testkit.request_mix import Plan, choose_plan, server_info

SCALES = "64,96,128"
# The script runs the interpreter these tests run in, wherever its virtual environment lies.
SCRIPT_ENV = {**os.environ, "PYTHON": sys.executable}


def test_smoke_load_run_has_no_failed_request(two_model_repository, tmp_path):
    repository, _ = two_model_repository
    out = tmp_path / "results"
    result = subprocess.run(
        [
            "loadtest/run.sh",
            "--repository",
            str(repository),
            "--scales",
            SCALES,
            "--duration",
            "20s",
            "--users",
            "6",
            "--spawn-rate",
            "6",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=SCRIPT_ENV,
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    summary = json.loads((out / "summary.json").read_text())
    assert summary["locust_exit_code"] == 0
    assert summary["total"]["failures"] == 0, report
    endpoints = {e["name"]: e for e in summary["endpoints"]}
    assert set(endpoints) == {"/v1/models", "/v1/classify", "/v1/classify/batch"}, report
    assert endpoints["/v1/classify"]["requests"] >= 20, report
    assert endpoints["/v1/classify/batch"]["requests"] >= 3, report
    # The figures a user reads: p50/p95/p99, requests/s and failures, and Locust's own CSVs.
    assert "p50 ms" in result.stdout and "p95 ms" in result.stdout and "p99 ms" in result.stdout
    assert "req/s" in result.stdout and "PASSED (0 failed requests)" in result.stdout
    for name in (
        "locust_stats.csv",
        "locust_stats_history.csv",
        "locust_failures.csv",
        "resources.csv",
    ):
        assert (out / name).stat().st_size > 0, name
    assert "frontend: RSS" in result.stdout


def test_run_fails_when_requests_fail(two_model_repository, tmp_path):
    """A server that refuses every classification (bad scales for its models) fails the run."""
    repository, _ = two_model_repository
    out = tmp_path / "results"
    with ServerProcess(
        "--repository",
        str(repository),
        "--scales",
        SCALES,
        "--max-upload-mb",
        "0.01",
        log_dir=tmp_path,
    ) as front:
        result = subprocess.run(
            [
                "loadtest/run.sh",
                "--host",
                front.url,
                "--duration",
                "4s",
                "--users",
                "2",
                "--spawn-rate",
                "2",
                "--out",
                str(out),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            env=SCRIPT_ENV,
        )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "413" in result.stdout and "FAILED" in result.stdout


@pytest.fixture(scope="module")
def client(two_model_repository):
    repository, _ = two_model_repository
    with TestClient(create_app(Settings(repository=repository, scales=(64, 96, 128)))) as client:
        yield client


def classify(client: TestClient, upload, plan: Plan) -> dict:
    files = {"file": (upload.filename, upload.data, upload.content_type)}
    response = client.post("/v1/classify", params=plan.params, files=files)
    assert response.status_code == 200, response.text
    return response.json()


def test_every_plan_of_the_mix_is_answered_correctly(client):
    info = server_info(client.get("/v1/models").json())
    assert info.models == ("m16", "m19") and info.default_scales == (64, 96, 128)
    images = build_image_set()
    rng = random.Random(7)
    plans = [choose_plan(rng, info) for _ in range(40)]
    assert {p.mode for p in plans} >= {"dense", "multicrop"} and any(p.heatmap for p in plans)
    for index, plan in enumerate(plans[:12]):
        upload = images[index % len(images)]
        body = classify(client, upload, plan)
        assert check_classification(body, plan.expected(upload)) == []


def test_checks_catch_wrong_answers(client):
    upload = build_image_set()[0]
    plan = Plan(
        {"heatmap": "true", "top_k": "3"}, 3, (64, 96, 128), True, ("m16", "m19"), "dense", True
    )
    body = classify(client, upload, plan)
    expected = plan.expected(upload)
    assert check_classification(body, expected) == []

    def problems_after(change) -> list[str]:
        wrong = copy.deepcopy(body)
        change(wrong)
        return check_classification(wrong, expected)

    assert problems_after(lambda b: b["predictions"].pop())  # top_k=3 asked, 2 given
    assert problems_after(lambda b: b["predictions"].reverse())  # not most probable first
    assert problems_after(lambda b: b["predictions"][0].update(probability=1.5))
    assert problems_after(lambda b: b["per_model"].pop("m19"))
    assert problems_after(lambda b: b.update(scales=[64, 96]))
    assert problems_after(lambda b: b.update(flip=False))
    assert problems_after(lambda b: b["image"].update(width=upload.width + 1))
    assert problems_after(lambda b: b["timing_ms"].pop("decode"))
    assert problems_after(lambda b: b.pop("heatmap"))
    assert problems_after(lambda b: b["heatmap"]["scores"].pop())
    assert problems_after(lambda b: b["heatmap"].update(scale=64))
    assert problems_after(lambda b: b.pop("mode"))

    batch = {"results": [{**body, "filename": upload.filename}]}
    assert check_batch(batch, [(upload.filename, expected)]) == []
    assert check_batch(batch, [("other.jpg", expected)])
    assert check_batch({"results": []}, [(upload.filename, expected)])
    failed = {"results": [{"filename": upload.filename, "error": {"status": 422, "message": "x"}}]}
    assert check_batch(failed, [(upload.filename, expected)])


def series(values: list[float], every_s: float = 5.0) -> list[Sample]:
    return [Sample(i * every_s, "frontend", v, 20, 8) for i, v in enumerate(values)]


def test_growth_after_warmup_flags_a_leak_not_a_warmup():
    warming_then_flat = [100 + 10 * i for i in range(12)] + [220.0] * 36  # 4 min, 1 min warm-up
    (rss, fds) = growth(series(warming_then_flat), warmup_s=60, window_s=60)
    assert rss.measure == "rss_mb" and abs(rss.ratio) < 0.01 and fds.ratio == 0
    leaking = [200 + 2 * i for i in range(48)]  # +2 MB every 5 s
    (rss, _) = growth(series(leaking), warmup_s=60, window_s=60)
    assert rss.ratio > 0.10  # the soak's limit
    with pytest.raises(ValueError, match="need warm-up"):
        growth(series([100.0] * 10), warmup_s=60, window_s=60)
