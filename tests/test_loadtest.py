"""The Locust load test: a smoke run through ``loadtest/run.sh`` that stops once enough requests
are done, with no failed request and every answer's probabilities checked; runs against servers
that answer with errors or with wrong numbers fail; and the checks applied to every response
catch wrong answers (so a pass means something)."""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from loadtest.locust_runner import read_failures
from loadtest.monitor import Sample, growth
from loadtest.run import SMALL_SCALES
from server.main import create_app
from server.settings import Settings
from testkit import REPOSITORY_ROOT as ROOT
from testkit.checks import check_batch, check_classification
from testkit.expected_posteriors import ExpectedPosteriors, cached
from testkit.images import build_image_set
from testkit.processes import ServerProcess
from testkit.request_mix import Plan, choose_plan, server_info

SCALES = ",".join(map(str, SMALL_SCALES))
# The script runs the interpreter these tests run in, wherever its virtual environment lies.
SCRIPT_ENV = {**os.environ, "PYTHON": sys.executable}
# Only a bound on a hang: the runs below stop on request counts.
HANG_BOUND = "600s"
CLASSIFY_REQUESTS, BATCH_REQUESTS = 20, 3


@pytest.fixture(scope="module")
def expected_file(two_model_repository):
    """The image set's per-view posteriors for both models at the small scales."""
    repository, _ = two_model_repository
    return cached(repository, {"m16": SMALL_SCALES, "m19": SMALL_SCALES})


def run_script(*args: str) -> subprocess.Popen:
    """``loadtest/run.sh ARGS``, started."""
    return subprocess.Popen(
        ["loadtest/run.sh", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=SCRIPT_ENV,
    )


def finish(script: subprocess.Popen, timeout: float = 900) -> tuple[int, str]:
    """The script's exit code and output, once it exits."""
    output, _ = script.communicate(timeout=timeout)
    return script.returncode, output


def test_smoke_load_run_stops_after_its_requests_with_no_failure(
    two_model_repository, expected_file, tmp_path
):
    repository, _ = two_model_repository
    out = tmp_path / "results"
    code, report = finish(
        run_script(
            *("--repository", str(repository), "--scales", SCALES),
            *("--stop-after-classify", str(CLASSIFY_REQUESTS)),
            *("--stop-after-batch", str(BATCH_REQUESTS)),
            *("--duration", HANG_BOUND, "--users", "6", "--spawn-rate", "6"),
            *("--expected-posteriors", str(expected_file), "--out", str(out)),
        )
    )
    assert code == 0, report
    summary = json.loads((out / "summary.json").read_text())
    assert summary["locust_exit_code"] == 0 and summary["probabilities_checked"] is True
    assert summary["total"]["failures"] == 0, report
    endpoints = {e["name"]: e for e in summary["endpoints"]}
    assert set(endpoints) == {"/v1/models", "/v1/classify", "/v1/classify/batch"}, report
    # Stopped by the counts, not by the time bound, and not before them.
    locust_log = (out / "locust.log").read_text()
    assert "stopping:" in locust_log and "--run-time limit" not in locust_log, locust_log[-2000:]
    assert endpoints["/v1/classify"]["requests"] >= CLASSIFY_REQUESTS, report
    assert endpoints["/v1/classify/batch"]["requests"] >= BATCH_REQUESTS, report
    # The figures a user reads: p50/p95/p99, requests/s and failures, and Locust's own CSVs.
    assert "p50 ms" in report and "p95 ms" in report and "p99 ms" in report
    assert "req/s" in report and "PASSED (0 failed requests)" in report
    for name in (
        "locust_stats.csv",
        "locust_stats_history.csv",
        "locust_failures.csv",
        "resources.csv",
    ):
        assert (out / name).stat().st_size > 0, name
    assert "frontend: RSS" in report


def test_runs_fail_on_error_answers_and_on_wrong_numbers(
    two_model_repository, expected_file, tmp_path
):
    """One server refuses every upload over 10 kB (413); another serves m19's graph under the
    name m16 and m16's under m19, answering 200 with well-formed bodies and wrong numbers. Both
    runs fail, each saying why. The first also computes its own expected posteriors (dense
    only) from the repository its --host serves."""
    repository, _ = two_model_repository
    swapped = tmp_path / "swapped"
    shutil.copytree(repository, swapped)
    for one, other in (("m16", "m19"), ("m19", "m16")):
        shutil.copy(repository / one / "1" / "model.onnx", swapped / other / "1" / "model.onnx")
    stop_after = ("--stop-after-classify", "4", "--duration", HANG_BOUND)
    with (
        ServerProcess(
            *("--repository", str(repository), "--scales", SCALES, "--max-upload-mb", "0.01"),
            log_dir=tmp_path / "refusing",
        ) as refusing,
        ServerProcess(
            "--repository", str(swapped), "--scales", SCALES, log_dir=tmp_path / "swapped-log"
        ) as wrong,
    ):
        runs = [
            run_script(
                *("--host", refusing.url, "--repository", str(repository)),
                *("--check-probabilities", "dense", "--users", "2", "--spawn-rate", "2"),
                *(*stop_after, "--out", str(tmp_path / "refused")),
            ),
            run_script(
                *("--host", wrong.url, "--expected-posteriors", str(expected_file)),
                *("--users", "2", "--spawn-rate", "2"),
                *(*stop_after, "--out", str(tmp_path / "wrong")),
            ),
        ]
        (refused_code, refused), (wrong_code, wrong_numbers) = (finish(run) for run in runs)
    assert refused_code == 1 and "FAILED" in refused, refused
    assert "expected posteriors (dense) of the image set computed" in refused
    errors = [row["Error"] for row in read_failures(tmp_path / "refused" / "locust")]
    assert errors and all("413: " in error for error in errors), refused
    assert wrong_code == 1 and "FAILED" in wrong_numbers, wrong_numbers
    errors = [row["Error"] for row in read_failures(tmp_path / "wrong" / "locust")]
    assert errors and all("wrong" in e and "probability" in e for e in errors), wrong_numbers


@pytest.fixture(scope="module")
def client(two_model_repository):
    repository, _ = two_model_repository
    with TestClient(create_app(Settings(repository=repository, scales=SMALL_SCALES))) as client:
        yield client


@pytest.fixture(scope="module")
def expected(expected_file) -> ExpectedPosteriors:
    return ExpectedPosteriors.load(expected_file)


def classify(client: TestClient, upload, plan: Plan) -> dict:
    files = {"file": (upload.filename, upload.data, upload.content_type)}
    response = client.post("/v1/classify", params=plan.params, files=files)
    assert response.status_code == 200, response.text
    return response.json()


def test_every_plan_of_the_mix_is_answered_correctly(client, expected):
    info = server_info(client.get("/v1/models").json())
    assert info.models == ("m16", "m19") and info.default_scales == SMALL_SCALES
    images = build_image_set()
    rng = random.Random(7)
    plans = [choose_plan(rng, info) for _ in range(40)]
    # Every kind of plan once or more: modes, flip off, one model, a scale subset, a heat map.
    chosen = plans[:12] + [next(p for p in plans if p.mode == "both")]
    assert {p.mode for p in chosen} == {"dense", "multicrop", "both"}
    assert any(not p.flip for p in chosen) and any(len(p.models) == 1 for p in chosen)
    assert any("scales" in p.params for p in chosen) and any(p.heatmap for p in chosen)
    for index, plan in enumerate(chosen):
        upload = images[index % len(images)]
        body = classify(client, upload, plan)
        assert check_classification(body, plan.expected(upload, expected.for_upload(upload))) == []


def dense_plan(
    scales=SMALL_SCALES, flip: bool = True, mode: str = "dense", models=("m16", "m19")
) -> Plan:
    params = {"heatmap": "true", "top_k": "3", "scales": ",".join(map(str, scales))}
    params |= {"flip": str(flip).lower(), "mode": mode, "models": ",".join(models)}
    return Plan(params, 3, tuple(scales), flip, tuple(models), mode, True)


def test_checks_catch_wrong_answers(client, expected):
    upload = build_image_set()[0]
    plan = dense_plan()
    body = classify(client, upload, plan)
    want = plan.expected(upload, expected.for_upload(upload))
    assert check_classification(body, want) == []

    def problems_after(change, answer=body) -> list[str]:
        wrong = copy.deepcopy(answer)
        change(wrong)
        return check_classification(wrong, want)

    # The structure.
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
    assert problems_after(lambda b: b["heatmap"].update(index=b["predictions"][1]["index"]))
    assert problems_after(lambda b: b.pop("mode"))

    # The numbers, each in a body whose structure is right: only the probabilities can tell.
    def numbers_wrong(change, answer=body) -> bool:
        problems = problems_after(change, answer)
        return bool(problems) and all("probability" in p or "label" in p for p in problems)

    def swap(predictions, key):  # ranks 1 and 2 (rank 0 is the heat map's class)
        predictions[1][key], predictions[2][key] = predictions[2][key], predictions[1][key]

    def swap_class(b):  # ranks 1 and 2 name each other's class, probabilities kept
        swap(b["predictions"], "index")
        swap(b["predictions"], "label")

    assert numbers_wrong(lambda b: swap(b["predictions"], "label"))
    assert numbers_wrong(swap_class)
    assert numbers_wrong(
        lambda b: b["predictions"][0].update(probability=b["predictions"][0]["probability"] + 1e-3)
    )
    assert numbers_wrong(
        lambda b: b["per_model"]["m16"][2].update(
            probability=b["per_model"]["m16"][2]["probability"] - 1e-3
        )
    )
    assert numbers_wrong(
        lambda b: b["per_model"].update(m16=b["per_model"]["m19"], m19=b["per_model"]["m16"])
    )

    def claimed_as_asked(b):  # a server that ran another plan but says it ran the one asked
        b.update(scales=list(plan.scales), flip=plan.flip, mode=plan.mode)
        b["heatmap"]["scale"] = max(plan.scales)

    no_flip = classify(client, upload, dense_plan(flip=False))
    assert numbers_wrong(claimed_as_asked, no_flip)  # the flip left out
    fewer_scales = classify(client, upload, dense_plan(scales=(64, 128)))
    assert numbers_wrong(claimed_as_asked, fewer_scales)  # Q=96 left out
    other_scale = classify(client, upload, dense_plan(scales=(64, 96, 112)))
    assert numbers_wrong(claimed_as_asked, other_scale)  # Q=112 instead of 128
    multicrop = classify(client, upload, dense_plan(mode="multicrop"))
    assert numbers_wrong(claimed_as_asked, multicrop)  # multi-crop answered for dense

    batch = {"results": [{**body, "filename": upload.filename}]}
    assert check_batch(batch, [(upload.filename, want)]) == []
    assert check_batch(batch, [("other.jpg", want)])
    assert check_batch({"results": []}, [(upload.filename, want)])
    failed = {"results": [{"filename": upload.filename, "error": {"status": 422, "message": "x"}}]}
    assert check_batch(failed, [(upload.filename, want)])
    swapped = copy.deepcopy(batch)
    swap_class(swapped["results"][0])
    assert any("probability" in p for p in check_batch(swapped, [(upload.filename, want)]))


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
