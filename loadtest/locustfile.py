"""Locust users of the vggserve HTTP API: uploads of mixed images with a realistic mix of options.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8080            # web UI
    loadtest/run.sh --duration 60s --users 8                                 # headless, see run.py

Each user discovers the served models (``GET /v1/models``), then mostly classifies one image
(``POST /v1/classify``) and sometimes a batch of 2-4 (``POST /v1/classify/batch``). Every
response is checked against the request (see :mod:`testkit.checks`): a 200 with a wrong body is
a failure too. Extra flags:

- ``--expected-posteriors PATH``: the image set's per-view posteriors
  (``python -m testkit.expected_posteriors``); every answer's probabilities are then compared
  with the ones expected for its image and query, not only its structure.
- ``--stop-after-classify N`` and ``--stop-after-batch M``: quit once N classify and M batch
  requests have completed (``--run-time`` then only bounds a hang).
- ``--think-time MIN,MAX``: seconds between a user's requests.
- ``--events-file PATH``: one JSON line per request, for fault tests (time, name, status, error).
"""

from __future__ import annotations

import csv
import json
import logging
import random
import time
from collections import Counter

import gevent
from locust import HttpUser, events, task
from locust.stats import PERCENTILES_TO_REPORT, StatsCSV

# Locust loads this file by path: it imports only installed packages (the toolkit among them).
from testkit.checks import check_batch, check_classification
from testkit.expected_posteriors import ExpectedPosteriors
from testkit.images import build_image_set
from testkit.request_mix import BATCH_SIZES, choose_plan, choose_uploads, server_info

IMAGES = build_image_set()
REQUEST_TIMEOUT_S = 120
CLASSIFY, BATCH = "/v1/classify", "/v1/classify/batch"
log = logging.getLogger("locustfile")


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
    parser.add_argument(
        "--expected-posteriors",
        default="",
        help="the image set's per-view posteriors (python -m testkit.expected_posteriors): "
        "check every answer's probabilities, not only its structure",
    )
    parser.add_argument(
        "--stop-after-classify",
        type=int,
        default=0,
        help="quit once this many POST /v1/classify requests have completed (with "
        "--stop-after-batch: both counts reached; 0: no count)",
    )
    parser.add_argument(
        "--stop-after-batch",
        type=int,
        default=0,
        help="quit once this many POST /v1/classify/batch requests have completed",
    )


_events_log = None
# The image set's posteriors (--expected-posteriors), loaded when Locust starts.
_expected: ExpectedPosteriors | None = None
_completed: Counter[str] = Counter()
_targets: dict[str, int] = {}
_environment = None


@events.init.add_listener
def _load_expected_and_targets(environment, **_kwargs) -> None:
    global _expected, _environment
    _environment = environment
    options = environment.parsed_options
    if options is None:  # Locust used as a library: nothing was parsed
        return
    path = getattr(options, "expected_posteriors", "")
    if path:
        _expected = ExpectedPosteriors.load(path)
        _expected.check_uploads(IMAGES)  # raises: Locust does not start
    targets = {CLASSIFY: options.stop_after_classify, BATCH: options.stop_after_batch}
    _targets.update({name: count for name, count in targets.items() if count > 0})


@events.quitting.add_listener
def _write_final_statistics(environment, **_kwargs) -> None:
    """Rewrite ``--csv``'s statistics and failures with the final counts: Locust refreshes them
    once a second, so a run that stops on request counts would leave the last second out."""
    prefix = getattr(environment.parsed_options, "csv_prefix", None)
    if not prefix:
        return
    statistics = StatsCSV(environment, PERCENTILES_TO_REPORT)
    with open(f"{prefix}_stats.csv", "w", newline="") as f:
        statistics.requests_csv(csv.writer(f))
    with open(f"{prefix}_failures.csv", "w", newline="") as f:
        statistics.failures_csv(csv.writer(f))


@events.request.add_listener
def _stop_when_enough_completed(name, **_kwargs) -> None:
    if not _targets or name not in _targets or _environment is None:
        return
    _completed[name] += 1
    if _completed[name] == _targets[name] and all(
        _completed[n] >= count for n, count in _targets.items()
    ):
        log.info(
            "stopping: %s requests completed", ", ".join(f"{_completed[n]} {n}" for n in _targets)
        )
        # From a greenlet of its own: quitting stops the users, this one among them; requests in
        # flight are let finish (--stop-timeout).
        gevent.spawn(_environment.runner.quit)


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


def _posteriors(upload):
    """The upload's expected per-view posteriors, or None (only the structure is checked)."""
    return _expected.for_upload(upload) if _expected is not None else None


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
            problems = check_classification(
                response.json(), plan.expected(upload, _posteriors(upload))
            )
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
            expected = [(u.filename, plan.expected(u, _posteriors(u))) for u in uploads]
            problems = check_batch(response.json(), expected)
            if problems:
                response.failure(f"wrong batch body for {plan.params}: {problems[:3]}")
