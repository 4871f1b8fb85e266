"""The server's latency over a default ONNX Runtime session on the same views, and its memory.

    .venv/bin/python -m bench.latency_tax                  # full VGG-16, then 500 requests
    .venv/bin/python -m bench.latency_tax --rounds 3 --requests 7 --memory-requests 0

One table from one run. Latency: a 640x480 JPEG classified one request at a time by
``POST /v1/classify`` (``python -m server``, its ONNX Runtime defaults, the CPU arena kept between
runs) and by ``--onnxruntime-arena-mb 0`` (no arena: every activation page-faulted afresh),
against a default ``ort.InferenceSession`` in this process running the very views the server
runs (one 2-view batch per Q, in turn): VGG-16 with random weights at Q = 256 with its flip and
at Q = 256,384,512. HTTP includes decoding, rescaling and the protocol's arithmetic; the session
only the networks. The three alternate in rounds, never at once, and each cell is the median of
its rounds' medians. Memory: ``bench.memory``'s mixed-size requests against the server's
defaults (small VGG-16, Q = 256,384,512): RSS growth after the first 50.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import requests

from bench.memory import measure_memory
from bench.report import load_average, machine
from inference.images import decode_image
from inference.protocol import dense_batch
from testkit.images import jpeg
from testkit.models import export_random_model
from testkit.processes import ServerProcess

CASES = {"Q = 256 with flip": (256,), "Q = 256,384,512 with flips": (256, 384, 512)}
SERVERS = {"HTTP": (), "HTTP, --onnxruntime-arena-mb 0": ("--onnxruntime-arena-mb", "0")}
TARGET_LATENCY, TARGET_GROWTH = 1.05, 0.05


def default_session(graph: Path, image: bytes):
    """A default session (ONNX Runtime's arena and memory patterns on, every core) and a
    function timing one request's worth of runs on each case's views."""
    import onnxruntime as ort

    from inference.cores import available_cores

    options = ort.SessionOptions()
    options.intra_op_num_threads = available_cores()
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    decoded = decode_image(image)
    views = {q: dense_batch(decoded, q) for scales in CASES.values() for q in scales}

    def one(scales: tuple[int, ...]) -> float:
        started = time.perf_counter()
        for q in scales:
            session.run(["probs"], {"image": views[q]})
        return time.perf_counter() - started

    return one


def over_http(server: ServerProcess, image: bytes):
    """A function timing one ``POST /v1/classify`` of ``image`` at the given scales."""
    session = requests.Session()

    def one(scales: tuple[int, ...]) -> float:
        started = time.perf_counter()
        response = session.post(
            f"{server.url}/v1/classify",
            params={"scales": ",".join(map(str, scales))},
            files={"file": ("photo.jpg", image, "image/jpeg")},
        )
        response.raise_for_status()
        return time.perf_counter() - started

    return one


def median_of(one, scales: tuple[int, ...], requests_per_round: int) -> float:
    one(scales)  # the first run of a shape pays its one-off costs
    return statistics.median(one(scales) for _ in range(requests_per_round))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=5, help="timed requests per round")
    parser.add_argument("--memory-requests", type=int, default=500, help="0: no memory run")
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "vggserve-bench"
    )
    args = parser.parse_args()
    print(f"machine: {machine()}; load average at start {load_average()}", flush=True)
    repo = export_random_model(args.workdir / "vgg16" / "repo", "vgg16", "vgg16")
    image = jpeg(640, 480, seed=3)
    raw = default_session(repo / "vgg16" / "1" / "model.onnx", image)
    timings: dict[tuple[str, str], list[float]] = {}
    servers = {
        label: ServerProcess("--repository", str(repo), *flags, health_path="/readyz").start()
        for label, flags in SERVERS.items()
    }
    try:
        for round_index in range(args.rounds):
            for case, scales in CASES.items():
                runners = {"default session": raw}
                runners |= {label: over_http(server, image) for label, server in servers.items()}
                for label, one in runners.items():
                    seconds = median_of(one, scales, args.requests)
                    timings.setdefault((case, label), []).append(seconds)
            print(f"round {round_index + 1} of {args.rounds} done", flush=True)
    finally:
        for server in servers.values():
            server.stop()

    print(f"\nVGG-16, 640x480 JPEG, one request at a time, medians of {args.rounds} rounds of")
    print(f"{args.requests} requests:\n")
    print("| case | path | ms | vs default session | target |")
    print("| --- | --- | --- | --- | --- |")
    for case in CASES:
        base = statistics.median(timings[(case, "default session")])
        for label in ("default session", *SERVERS):
            ms = statistics.median(timings[(case, label)])
            target = f"<= {TARGET_LATENCY}" if label == "HTTP" else ""
            print(f"| {case} | {label} | {ms * 1e3:.0f} | {ms / base:.3f} | {target} |")
    if args.memory_requests:
        memory = measure_memory(args.memory_requests, "small", "256,384,512", args.workdir)
        growth = memory["growth"]
        print(
            f"| {args.memory_requests} mixed-size requests (small VGG-16, Q = 256,384,512) | "
            f"HTTP | RSS {memory['first_mib']:.0f} -> {memory['last_mib']:.0f} MiB | "
            f"{growth:+.1%} | <= +{TARGET_GROWTH:.0%} |"
        )
    print(f"\nload average at end {load_average()}")


if __name__ == "__main__":
    main()
