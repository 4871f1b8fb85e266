"""Triton killed (SIGKILL, a crash) and restarted under Locust load, behind the same front end.

What a user relies on: requests fail only while Triton is down, and then with a clear 503 (never
a 500, a hang or a dropped connection); the front end keeps running and serves again, with the
right numbers, as soon as Triton is back, without being restarted.

The run is driven by events, not by a clock: Triton is killed once the load has had
``SERVED_BEFORE`` successes, restarted once the front end has answered a request with 503, and
the load stops once ``SERVED_AFTER`` requests started after the restart have succeeded.
"""

from __future__ import annotations

import time

import httpx

from loadtest.locust_runner import RequestEvents, start_locust
from loadtest.run import SMALL_SCALES
from testkit.expected_posteriors import cached
from testkit.processes import ServerProcess, local_triton

SERVED_BEFORE = 8
SERVED_AFTER = 8
# Only a bound on a hang: every wait below ends on an event.
HANG_BOUND_S = 300


def test_triton_killed_and_restarted_under_load(two_model_repository, tmp_path):
    repository, _ = two_model_repository
    expected = cached(repository, {"m16": SMALL_SCALES, "m19": SMALL_SCALES})
    triton = local_triton(repository, work_dir=tmp_path / "triton")
    triton.start()
    try:
        args = [
            *("--repository", str(repository), "--scales", ",".join(map(str, SMALL_SCALES))),
            *("--backend", "triton", "--triton-url", triton.grpc_url),
        ]
        with ServerProcess(*args, log_dir=tmp_path) as front:
            locust = start_locust(
                front.url,
                tmp_path / "locust",
                users=4,
                spawn_rate=4,
                duration=f"{HANG_BOUND_S}s",
                think_time="0.05,0.3",
                events_file=tmp_path / "events.jsonl",
                log_path=tmp_path / "locust.log",
                expected_posteriors=expected,
            )
            events = RequestEvents(tmp_path / "events.jsonl", locust)
            try:
                events.wait_until(
                    lambda rs: sum(r.ok for r in rs) >= SERVED_BEFORE, "successes before the kill"
                )
                killed_at = time.time()
                triton.kill()
                events.wait_until(
                    lambda rs: any(not r.ok and r.t >= killed_at for r in rs),
                    "failed request while Triton is down",
                )
                triton.start()
                ready_at = time.time()
                events.wait_until(
                    lambda rs: sum(r.ok and r.start > ready_at for r in rs) >= SERVED_AFTER,
                    "successes after the restart",
                )
            finally:
                locust.terminate()  # Locust lets the requests in flight finish, then exits
                code = locust.wait(timeout=120)
            records = events.read()
            assert code in (0, 1), (tmp_path / "locust.log").read_text()[-3000:]
            assert front.alive(), front.log_tail()
            assert httpx.get(f"{front.url}/readyz").json()["ready"] is True
            log = front.log_path.read_text()
    finally:
        triton.close()

    failures = [r for r in records if not r.ok]
    # The front end is back once a request it began after Triton's restart has succeeded.
    recovered = min(r.t for r in records if r.ok and r.start > ready_at)
    summary = (
        f"{len(records)} requests, {len(failures)} failed; Triton ready again "
        f"{ready_at - killed_at:.1f} s after the kill, the first request begun after that "
        f"succeeded {recovered - ready_at:.2f} s after it"
    )
    assert sum(r.ok and r.t < killed_at for r in records) >= SERVED_BEFORE, summary
    assert failures, f"the outage was not seen at all: {summary}"
    for failure in failures:
        # A clear 503 from the same front end: no 500, no refused or dropped connection, and no
        # answer with wrong numbers (the checks compare every 200's probabilities).
        assert failure.status == 503, (failure, summary)
        assert "unavailable" in (failure.error or ""), failure
        # Only during the outage: ended after the kill, begun before the front end was back.
        assert failure.t >= killed_at, (failure, summary)
        assert failure.start <= recovered, (failure, summary)
    assert "Traceback" not in log, log[-3000:]
    print(f"{summary}; every failure a 503 during the outage")  # docs/reliability.md (pytest -s)
