"""Locust users of the vggserve HTTP API: uploads of mixed images with a realistic mix of options.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8080            # web UI
    loadtest/run.sh --duration 60s --users 8                                 # headless, see run.py

Each user discovers the served models (``GET /v1/models``), then mostly classifies one image
(``POST /v1/classify``) and sometimes a batch of 2-4 (``POST /v1/classify/batch``). Every
response is checked against the request (see :mod:`testkit.checks`): a 200 with a wrong body is
a failure too. Extra flags: ``--think-time MIN,MAX`` (seconds between a user's requests) and
``--events-file PATH`` (one JSON line per request, for fault tests: time, name, status, error).
"""

from __future__ import annotations

import json
import random
import time

from locust import HttpUser, events, task

# Locust loads this file by path: it imports only installed packages (the toolkit among them).
from testkit.checks import check_batch, check_classification
from testkit.images import build_image_set
from testkit.request_mix import BATCH_SIZES, choose_plan, choose_uploads, server_info

IMAGES = build_image_set()
REQUEST_TIMEOUT_S = 120


@events.init_command_line_parser.add_listener
def _add_flags(parser) -> None:
    parser.add_argument(
        "--think-time",
        default="0.05,0.5",
        help="MIN,MAX seconds a user waits between requests (default %(default)s)",
    )
    parser.add_argument(
        "--events-file",
        default="",
        help="write one JSON line per request here (time, name, status, error)",
    )


_events_log = None


@events.test_start.add_listener
def _open_events_file(environment, **_kwargs) -> None:
    global _events_log
    path = getattr(environment.parsed_options, "events_file", "")
    if path:
        _events_log = open(path, "a", buffering=1)  # noqa: SIM115 (closed at test_stop)


@events.test_stop.add_listener
def _close_events_file(**_kwargs) -> None:
    global _events_log
    if _events_log is not None:
        _events_log.close()
        _events_log = None


@events.request.add_listener
def _log_request(name, response, exception, response_time, **_kwargs) -> None:
    if _events_log is None:
        return
    status = getattr(response, "status_code", 0) or 0
    record = {
        "t": time.time(),
        "name": name,
        "status": status,
        "ok": exception is None,
        "ms": round(response_time or 0.0, 1),
        "error": None if exception is None else str(exception)[:300],
    }
    _events_log.write(json.dumps(record) + "\n")


def _parse_think_time(text: str) -> tuple[float, float]:
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise ValueError(
            f"--think-time {text!r}: expected MIN,MAX seconds, e.g. 0.05,0.5"
        ) from None
    return low, max(low, high)


def _detail(response) -> str:
    """The server's own explanation of an error response, for the failure message."""
    try:
        return str(response.json().get("detail"))[:300]
    except Exception:  # not JSON: show the start of the text
        return (response.text or "")[:300]


class ClassifyUser(HttpUser):
    """A client of the classify API."""

    def on_start(self) -> None:
        self.rng = random.Random()
        self.think = _parse_think_time(self.environment.parsed_options.think_time)
        self.info = None
        with self.client.get("/v1/models", catch_response=True, timeout=30) as response:
            if response.status_code != 200:
                response.failure(f"GET /v1/models: {response.status_code} {_detail(response)}")
                return
            try:
                self.info = server_info(response.json())
            except ValueError as exc:
                response.failure(str(exc))

    def wait_time(self) -> float:
        return self.rng.uniform(*self.think)

    @task(8)
    def classify_one(self) -> None:
        if self.info is None:
            return self.on_start()
        upload = self.rng.choice(IMAGES)
        plan = choose_plan(self.rng, self.info)
        files = {"file": (upload.filename, upload.data, upload.content_type)}
        with self.client.post(
            "/v1/classify",
            params=plan.params,
            files=files,
            name="/v1/classify",
            catch_response=True,
            timeout=REQUEST_TIMEOUT_S,
        ) as response:
            if response.status_code != 200:
                response.failure(f"{response.status_code}: {_detail(response)}")
                return
            problems = check_classification(response.json(), plan.expected(upload))
            if problems:
                response.failure(f"wrong body for {upload.filename} {plan.params}: {problems[:3]}")

    @task(2)
    def classify_batch(self) -> None:
        if self.info is None:
            return self.on_start()
        uploads = choose_uploads(self.rng, IMAGES, self.rng.choice(BATCH_SIZES))
        plan = choose_plan(self.rng, self.info)
        files = [("files", (u.filename, u.data, u.content_type)) for u in uploads]
        with self.client.post(
            "/v1/classify/batch",
            params=plan.params,
            files=files,
            name="/v1/classify/batch",
            catch_response=True,
            timeout=REQUEST_TIMEOUT_S,
        ) as response:
            if response.status_code != 200:
                response.failure(f"{response.status_code}: {_detail(response)}")
                return
            expected = [(u.filename, plan.expected(u)) for u in uploads]
            problems = check_batch(response.json(), expected)
            if problems:
                response.failure(f"wrong batch body for {plan.params}: {problems[:3]}")
