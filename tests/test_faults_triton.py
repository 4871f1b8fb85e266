"""Triton killed (SIGKILL, a crash) and restarted under Locust load, behind the same front end.

What a user relies on: requests fail only while Triton is down, and then with a clear 503 (never
a 500, a hang or a dropped connection); the front end keeps running and serves again as soon as
Triton is back, without being restarted.
"""

from __future__ import annotations

import json
import time

import httpx

from loadtest.locust_runner import start_locust
from testkit.processes import ServerProcess, local_triton

# How long after Triton reports ready the front end may still fail (its next call reconnects).
RECOVERY_S = 5.0
LOAD_S = 26
KILL_AT_S = 8.0
DOWN_FOR_S = 4.0


def read_events(path) -> list[dict]:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for record in records:
        record["start"] = record["t"] - record["ms"] / 1000
    return records


def test_triton_killed_and_restarted_under_load(two_model_repository, tmp_path):
    repository, _ = two_model_repository
    triton = local_triton(repository, work_dir=tmp_path / "triton")
    triton.start()
    try:
        args = [
            "--repository",
            str(repository),
            "--scales",
            "64,96,128",
            "--backend",
            "triton",
            "--triton-url",
            triton.grpc_url,
        ]
        with ServerProcess(*args, log_dir=tmp_path) as front:
            events = tmp_path / "events.jsonl"
            locust = start_locust(
                front.url,
                tmp_path / "locust",
                users=4,
                spawn_rate=4,
                duration=f"{LOAD_S}s",
                think_time="0.05,0.3",
                events_file=events,
                log_path=tmp_path / "locust.log",
            )
            time.sleep(KILL_AT_S)
            killed_at = time.time()
            triton.kill()
            time.sleep(DOWN_FOR_S)
            triton.start()
            ready_at = time.time()
            assert locust.wait(timeout=LOAD_S + 90) in (0, 1), (tmp_path / "locust.log").read_text()
            assert front.alive(), front.log_tail()
            assert httpx.get(f"{front.url}/readyz").json()["ready"] is True
            log = front.log_path.read_text()
    finally:
        triton.close()

    records = read_events(events)
    failures = [r for r in records if not r["ok"]]
    before = [r for r in records if r["ok"] and r["t"] < killed_at]
    after = [r for r in records if r["ok"] and r["start"] > ready_at + RECOVERY_S]
    recovered = min((r["t"] for r in records if r["ok"] and r["t"] > ready_at), default=None)
    summary = (
        f"{len(records)} requests, {len(failures)} failed; "
        f"Triton ready again {ready_at - killed_at:.1f} s after the kill, first success "
        f"{(recovered or ready_at) - ready_at:.2f} s after that"
    )
    assert len(before) >= 5 and len(after) >= 5, summary  # served before, and again after
    assert failures, f"the outage was not seen at all: {summary}"
    for failure in failures:
        # A clear 503 from the same front end: no 500, no refused or dropped connection.
        assert failure["status"] == 503, (failure, summary)
        assert "unavailable" in failure["error"], failure
        # Only during the outage: it ended after the kill and began before recovery.
        assert failure["t"] >= killed_at, (failure, summary)
        assert failure["start"] <= ready_at + RECOVERY_S, (failure, summary)
    assert "Traceback" not in log, log[-3000:]
    print(f"{summary}; every failure a 503 during the outage")  # docs/reliability.md (pytest -s)
