"""ONNX Runtime's CPU allocation choices: latency and memory of each, measured in one run.

    .venv/bin/python -m bench.ort_allocation              # full VGG-16, 2 rounds
    .venv/bin/python -m bench.ort_allocation --rounds 3 --runs 11

Each variant runs in a process of its own (glibc's mmap threshold is process-wide), one after
the other, round after round, on full-size VGG-16 with random weights: the median time of one
batch of 2 views at 256x342 (Q = 256 of a 4:3 image with its flip), then resident memory after
10 and after 60 batches of mixed shapes (Q = 256, longer side 256 to 600, seeded). Variants:

- ``server``: what the server runs (``inference.backends.onnxruntime.session_options``: arena
  and memory patterns off) with the server's fixed mmap threshold (``server.heap``): every
  activation is a fresh mapping, page-faulted on every run;
- ``default``: a default ``ort.SessionOptions()`` (arena and memory patterns on);
- ``arena``: the arena on, memory patterns off, with the fixed mmap threshold;
- ``arena-shrink``: the same, the arena shrunk at the end of every run (a run option).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.report import load_average, machine
from testkit import REPOSITORY_ROOT

VARIANTS = ("server", "default", "arena", "arena-shrink")
SHAPE = (2, 3, 256, 342)
MIXED = 60


def resident_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(variant: str, graph: str, runs: int) -> dict:
    """In this process: one variant's median latency and its memory over mixed shapes."""
    import numpy as np

    if variant != "default":
        from server.heap import fix_mmap_threshold

        fix_mmap_threshold()
    import onnxruntime as ort

    from inference.backends.onnxruntime import session_options

    options = session_options()
    run_options = ort.RunOptions()
    if variant == "default":
        options = ort.SessionOptions()
        options.intra_op_num_threads = session_options().intra_op_num_threads
    elif variant == "arena":
        options.enable_cpu_mem_arena = True
    elif variant == "arena-shrink":
        options.enable_cpu_mem_arena = True
        run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    batch = np.random.default_rng(0).integers(0, 255, SHAPE, dtype=np.uint8)
    for _ in range(2):
        session.run(["probs"], {"image": batch}, run_options)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        session.run(["probs"], {"image": batch}, run_options)
        times.append(time.perf_counter() - started)
    rng = random.Random(1)
    shapes = [(256, rng.randint(256, 600)) for _ in range(MIXED)]
    for index, (height, width) in enumerate(shapes):
        session.run(["probs"], {"image": np.zeros((2, 3, height, width), np.uint8)}, run_options)
        if index == 9:
            after_10 = resident_mb()
    return {
        "variant": variant,
        "p50_ms": statistics.median(times) * 1e3,
        "rss_10_mb": after_10,
        "rss_60_mb": resident_mb(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runs", type=int, default=9, help="timed batches per variant")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # the child
    parser.add_argument("--graph", help=argparse.SUPPRESS)
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "vggserve-bench"
    )
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args.graph, args.runs)))
        return
    from testkit.models import export_random_model

    repository = export_random_model(args.workdir / "vgg16" / "repo", "vgg16", "vgg16")
    graph = str(repository / "vgg16" / "1" / "model.onnx")
    print(f"machine: {machine()}; load average at start {load_average()}", flush=True)
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            child = subprocess.run(
                [sys.executable, "-m", "bench.ort_allocation", "--variant", variant]
                + ["--graph", graph, "--runs", str(args.runs)],
                cwd=REPOSITORY_ROOT,
                capture_output=True,
                text=True,
                check=True,
            )
            results[variant].append(json.loads(child.stdout.splitlines()[-1]))
    default_p50 = statistics.median(r["p50_ms"] for r in results["default"])
    print(f"\nVGG-16, batch {SHAPE}, medians over {args.rounds} rounds of {args.runs} runs:\n")
    print("| variant | p50 ms | vs default | RSS after 10 MB | after 60 MB | growth |")
    print("| --- | --- | --- | --- | --- | --- |")
    for variant, rows in results.items():
        p50 = statistics.median(r["p50_ms"] for r in rows)
        rss_10 = statistics.median(r["rss_10_mb"] for r in rows)
        rss_60 = statistics.median(r["rss_60_mb"] for r in rows)
        print(
            f"| {variant} | {p50:.0f} | {p50 / default_p50:.2f} | {rss_10:.0f} | {rss_60:.0f} "
            f"| {100 * (rss_60 / rss_10 - 1):+.1f}% |"
        )
    print(f"\nload average at end {load_average()}")


if __name__ == "__main__":
    main()
