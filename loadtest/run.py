"""Start a server, load it with Locust (headless, bounded time), report latency, failures, memory.

    loadtest/run.sh                                    # 30 s, small models, embedded ONNX Runtime
    loadtest/run.sh --backend triton --duration 2m     # through the real tritonserver (CPU)
    loadtest/run.sh --repository model_repository --users 4 --duration 5m    # full-size models
    loadtest/run.sh --soak                             # 10 min; RSS and open files must stay flat
    loadtest/run.sh --host http://127.0.0.1:8080       # a server that is already running
    loadtest/run.sh --stop-after-classify 200 --stop-after-batch 50 --duration 10m  # by counts

Before the load starts, the expected posteriors of the image set are computed in this process
from the served repository (``testkit.expected_posteriors``), so Locust checks every answer's
probabilities, not only its structure (``--check-probabilities``; with ``--host``, give the
server's ``--repository`` too).

Writes into ``--out`` (default ``loadtest/results/<time>-<backend>``): Locust's CSV statistics
(``locust_stats.csv``, ``locust_stats_history.csv``, ``locust_failures.csv``), the sampled
resources (``resources.csv``), the expected posteriors, the logs and ``summary.json``; prints
p50/p95/p99 latency, requests/s and failures. Exit code 0 when no request failed (and, with
``--soak``, RSS and open files grew less than ``--max-growth`` after warm-up), 1 otherwise, 2
when it could not start.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
import time
from pathlib import Path

from loadtest.locust_runner import (
    format_summary,
    read_failures,
    read_history,
    read_stats,
    start_locust,
)
from loadtest.monitor import ResourceMonitor, Sample, growth
from testkit import REPOSITORY_ROOT
from testkit.expected_posteriors import MODES, compute_for_server
from testkit.models import write_small_repository
from testkit.processes import ServerProcess, start_triton

HERE = Path(__file__).resolve().parent
SMALL_REPOSITORY = HERE / ".models"
# The small models' scales: at least the crop (64), small enough that a request takes ~10-50 ms
# on one core, so a load test measures the server rather than the convolutions.
SMALL_SCALES = (64, 96, 128)
SOAK = {"duration": "10m", "users": 6, "think_time": "0.1,1.0", "warmup_s": 120.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="loadtest/run.sh",
        description="Load the vggserve HTTP API with Locust (headless) and report the figures.",
    )
    parser.add_argument(
        "--backend",
        choices=("onnxruntime", "triton"),
        default="onnxruntime",
        help="embedded ONNX Runtime, or the real tritonserver started here on CPU",
    )
    parser.add_argument(
        "--repository",
        type=Path,
        default=None,
        help="model repository to serve (default: two small VGGs exported into "
        f"{SMALL_REPOSITORY.relative_to(REPOSITORY_ROOT)} on first use); with --host, the "
        "repository that server serves (to compute the expected probabilities)",
    )
    parser.add_argument(
        "--scales",
        default=None,
        help="the server's --scales (default: 64,96,128 for the small models, "
        "the server's default otherwise)",
    )
    parser.add_argument("--users", type=int, default=None, help="concurrent Locust users (8)")
    parser.add_argument("--spawn-rate", type=float, default=4.0, help="users started per second")
    parser.add_argument(
        "--duration",
        default=None,
        help="Locust --run-time: 30s, 5m, ... (30s); with --stop-after-*, only a bound on a hang",
    )
    parser.add_argument(
        "--stop-after-classify",
        type=int,
        default=0,
        metavar="N",
        help="stop once N POST /v1/classify requests have completed (and the batch count, if "
        "given, is reached too)",
    )
    parser.add_argument(
        "--stop-after-batch",
        type=int,
        default=0,
        metavar="M",
        help="stop once M POST /v1/classify/batch requests have completed",
    )
    parser.add_argument(
        "--check-probabilities",
        choices=("all", "dense", "off"),
        default="all",
        help="compare every answer's probabilities with the ones computed here for its image "
        "and query (dense: skip multi-crop answers, whose views take minutes to compute for "
        "full-size models; off: the structure only)",
    )
    parser.add_argument(
        "--expected-posteriors",
        type=Path,
        default=None,
        help="use these precomputed posteriors (python -m testkit.expected_posteriors) instead "
        "of computing them",
    )
    parser.add_argument(
        "--think-time", default=None, help="MIN,MAX seconds between a user's requests (0.05,0.5)"
    )
    parser.add_argument(
        "--soak",
        action="store_true",
        help=f"{SOAK['duration']} with {SOAK['users']} users; fail if RSS or open "
        "files grow after warm-up",
    )
    parser.add_argument(
        "--warmup-s",
        type=float,
        default=None,
        help=f"seconds before growth is measured (soak: {SOAK['warmup_s']:.0f})",
    )
    parser.add_argument(
        "--max-growth",
        type=float,
        default=0.10,
        help="largest allowed RSS / open-file growth after warm-up (0.10 = 10%%)",
    )
    parser.add_argument(
        "--sample-every", type=float, default=5.0, help="seconds between resource samples"
    )
    parser.add_argument(
        "--host",
        default=None,
        help="load this running server instead of starting one (no resources)",
    )
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra flag for python -m server (repeat: --server-arg=--threads=1)",
    )
    parser.add_argument(
        "--events-file", action="store_true", help="also write events.jsonl: one line per request"
    )
    parser.add_argument("--out", type=Path, default=None, help="where the results go")
    args = parser.parse_args(argv)
    args.duration = args.duration or (SOAK["duration"] if args.soak else "30s")
    args.users = args.users or (SOAK["users"] if args.soak else 8)
    args.think_time = args.think_time or (SOAK["think_time"] if args.soak else "0.05,0.5")
    if args.warmup_s is None:
        args.warmup_s = SOAK["warmup_s"] if args.soak else 0.0
    if args.users < 1:
        parser.error("--users must be at least 1")
    if args.stop_after_classify < 0 or args.stop_after_batch < 0:
        parser.error("--stop-after-classify and --stop-after-batch must be 0 or more")
    return args


def expected_posteriors(
    args: argparse.Namespace, host: str, repository: Path | None, out: Path
) -> Path | None:
    """The expected posteriors file for this run, or None when probabilities are not checked."""
    if args.expected_posteriors is not None:
        return args.expected_posteriors
    if args.check_probabilities == "off":
        return None
    if repository is None:
        print("probabilities not checked: give --repository, the one the server serves")
        return None
    modes = MODES if args.check_probabilities == "all" else ("dense",)
    started = time.monotonic()
    path = compute_for_server(host, repository, modes).save(out / "expected_posteriors.json")
    print(
        f"expected posteriors ({', '.join(modes)}) of the image set computed in "
        f"{time.monotonic() - started:.1f} s: {path}",
        flush=True,
    )
    return path


def timeline(
    samples: list[Sample], history: list[tuple[float, int, int]], started: float, every_s: float
) -> str:
    """A row per ``every_s``: requests/s and failures in that interval, RSS and open files."""
    names = list(dict.fromkeys(s.process for s in samples))
    header = f"{'time':>6} {'req/s':>6} {'failed':>6} " + " ".join(
        f"{name + ' MB':>16} {'files':>5}" for name in names
    )
    lines = [header]
    end = max([s.elapsed_s for s in samples] + [t - started for t, _, _ in history] + [0.0])
    mark, previous = every_s, (0, 0)
    while mark <= end + 1e-6:
        done = [(n, f) for t, n, f in history if t - started <= mark] or [(0, 0)]
        requests, failures = done[-1]
        cells = []
        for name in names:
            near = [s for s in samples if s.process == name and s.elapsed_s <= mark]
            cells.append(f"{near[-1].rss_mb:>16.0f} {near[-1].open_fds:>5}" if near else " " * 22)
        lines.append(
            f"{mark / 60:>5.0f}m {(requests - previous[0]) / every_s:>6.2f} "
            f"{failures - previous[1]:>6} " + " ".join(cells)
        )
        previous = (requests, failures)
        mark += every_s
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run one load test; see the module docstring."""
    args = parse_args(argv)
    out = args.out or HERE / "results" / f"{time.strftime('%Y%m%d-%H%M%S')}-{args.backend}"
    out.mkdir(parents=True, exist_ok=True)
    command = "loadtest/run.sh " + shlex.join(argv if argv is not None else sys.argv[1:])
    print(f"load test: {command}\nresults: {out}", flush=True)

    with contextlib.ExitStack() as stack:
        watched: dict[str, tuple[int, bool]] = {}
        front = None
        repository = args.repository
        if args.host:
            host = args.host.rstrip("/")
        else:
            scales = args.scales
            if repository is None:
                repository = SMALL_REPOSITORY
                write_small_repository(repository, keep_existing=True)
                scales = scales or ",".join(map(str, SMALL_SCALES))
            server_args = ["--repository", str(repository), "--log-level", "warning"]
            server_args += ["--scales", scales] if scales else []
            if args.backend == "triton":
                triton = start_triton(repository, work_dir=out / "triton")
                stack.callback(triton.close)
                watched["tritonserver"] = (triton.process.pid, True)  # with its Python stubs
                server_args += ["--backend", "triton", "--triton-url", triton.grpc_url]
            front = stack.enter_context(ServerProcess(*server_args, *args.server_arg, log_dir=out))
            watched["frontend"] = (front.pid, False)
            host = front.url
            print(f"server: {shlex.join(front.command)}", flush=True)

        expected = expected_posteriors(args, host, repository, out)
        csv_prefix = out / "locust"
        events = out / "events.jsonl" if args.events_file else None
        started = time.time()
        with ResourceMonitor(watched, args.sample_every) as monitor:
            locust = start_locust(
                host,
                csv_prefix,
                args.users,
                args.spawn_rate,
                args.duration,
                args.think_time,
                events,
                out / "locust.log",
                expected,
                (args.stop_after_classify, args.stop_after_batch),
            )
            locust_code = locust.wait()
        elapsed = time.time() - started
        monitor.write_csv(out / "resources.csv")
        if front is not None and not front.alive():
            print(f"FAILED: the server died during the run:\n{front.log_tail()}")
            return 1

    try:
        summary = read_stats(csv_prefix)
    except (OSError, ValueError) as exc:
        print(f"FAILED: Locust wrote no statistics ({exc}); see {out / 'locust.log'}")
        return 2
    print(format_summary(summary))
    failures = read_failures(csv_prefix)
    for row in failures[:10]:
        print(f"  {row['Occurrences']} x {row['Method']} {row['Name']}: {row['Error'][:300]}")

    report = {
        "command": command,
        "host": host,
        "backend": args.backend,
        "users": args.users,
        "duration": args.duration,
        "stop_after": {"classify": args.stop_after_classify, "batch": args.stop_after_batch},
        "probabilities_checked": expected is not None,
        "elapsed_s": round(elapsed, 1),
        "locust_exit_code": locust_code,
        **summary.as_dict(),
    }
    ok = summary.total.failures == 0 and locust_code == 0 and summary.total.requests > 0
    by_process: dict[str, list] = {}
    for s in monitor.samples:
        by_process.setdefault(s.process, []).append(s)
    for name, samples in by_process.items():
        print(
            f"{name}: RSS {samples[0].rss_mb:.0f} -> {samples[-1].rss_mb:.0f} MB "
            f"(peak {max(s.rss_mb for s in samples):.0f}), open files {samples[0].open_fds} -> "
            f"{samples[-1].open_fds} (peak {max(s.open_fds for s in samples)})"
        )
    if args.soak:
        every = 60.0
        table = timeline(monitor.samples, read_history(csv_prefix), started, every)
        (out / "timeline.txt").write_text(table + "\n")
        print(table)
    if args.soak or args.warmup_s:
        try:
            growths = growth(monitor.samples, args.warmup_s)
        except ValueError as exc:
            print(f"FAILED: {exc}")
            return 1
        report["growth"] = []
        for g in growths:
            flat = g.ratio < args.max_growth
            ok = ok and flat
            report["growth"].append({**g.__dict__, "ratio": round(g.ratio, 4), "flat": flat})
            print(
                f"{g.process} {g.measure}: {g.baseline:.1f} after warm-up -> {g.after:.1f} at "
                f"the end ({g.ratio:+.1%}, peak {g.peak:.1f}): "
                f"{'flat' if flat else 'GREW'}"
            )
    (out / "summary.json").write_text(json.dumps(report, indent=2) + "\n")
    print("PASSED" if ok else "FAILED", f"({summary.total.failures} failed requests)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
