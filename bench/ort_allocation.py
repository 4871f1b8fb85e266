"""ONNX Runtime's CPU allocation choices: latency and memory of each, measured in one run.

    .venv/bin/python -m bench.ort_allocation              # full VGG-16, 2 rounds
    .venv/bin/python -m bench.ort_allocation --rounds 3 --runs 11

Each variant runs in a process of its own (glibc's mmap threshold and ONNX Runtime's shared
arena are process-wide), one after the other, round after round, on full-size VGG-16 with random
weights: the median time of one batch of 2 views at 256x342 (Q = 256 of a 4:3 image with its
flip), then resident memory after 10 and after 60 batches of mixed shapes (Q = 256, longer side
256 to 600, seeded). Variants:

- ``server``: what the server runs (``OnnxRuntimeBackend``): the shared CPU arena of
  ``register_cpu_arena``, its first region sized for two 4:3 views at Q = 512 and kept, every
  other region freed at the end of each run, with the server's fixed mmap threshold
  (``server.heap``);
- ``no-arena``: no arena, no memory patterns (``session_options()`` as it is): every activation
  is a fresh mapping, page-faulted on every run;
- ``default``: a default ``ort.SessionOptions()`` (ONNX Runtime's arena and memory patterns);
- ``arena``: ONNX Runtime's arena, patterns off: regions grown by doubling, kept for good;
- ``arena-shrink``: the same, every region but the first freed at the end of every run;
- ``arena-same``: an arena whose regions are exactly as large as requested, kept for good.
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

VARIANTS = ("server", "no-arena", "default", "arena", "arena-shrink", "arena-same")
SHAPE = (2, 3, 256, 342)
MIXED = 60


def resident_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


def session_for(variant: str, graph: str):
    """The session of ``variant`` and the run options its runs take."""
    import onnxruntime as ort

    from inference.backends import onnxruntime as engine
    from inference.repository import read_repository

    if variant == "server":  # the backend itself: its kept arena, sized for VGG-16's Q set
        repository = Path(graph).parents[2]
        backend = engine.OnnxRuntimeBackend(read_repository(repository, ["vgg16"]))
        return backend.sessions["vgg16"], backend.run_options["vgg16"]
    options = engine.session_options()
    run_options = ort.RunOptions()
    if variant == "default":
        options = ort.SessionOptions()
        options.intra_op_num_threads = engine.session_options().intra_op_num_threads
    elif variant in ("arena", "arena-shrink"):
        options.enable_cpu_mem_arena = True
        if variant == "arena-shrink":
            run_options.add_run_config_entry(*engine.SHRINK_ARENA)
    elif variant == "arena-same":  # regions exactly as large as requested, never shrunk
        info = ort.OrtMemoryInfo(
            "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
        )
        ort.create_and_register_allocator(info, ort.OrtArenaCfg({"arena_extend_strategy": 1}))
        options.enable_cpu_mem_arena = True
        options.add_session_config_entry("session.use_env_allocators", "1")
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    return session, run_options


def measure(variant: str, graph: str, runs: int) -> dict:
    """In this process: one variant's median latency and its memory over mixed shapes."""
    import numpy as np

    if variant != "default":
        from server.heap import fix_mmap_threshold

        fix_mmap_threshold()
    session, run_options = session_for(variant, graph)
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
    parser.add_argument("--variants", default=",".join(VARIANTS))
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
    results: dict[str, list[dict]] = {v: [] for v in args.variants.split(",")}
    for _ in range(args.rounds):
        for variant in results:
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
