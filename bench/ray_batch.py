"""Ray Data batch inference against the gRPC batch client, one run, the same images and models.

    .venv/bin/python -m bench.ray_batch                   # small m16 + m19, 48 images: 2-3 minutes
    .venv/bin/python -m bench.ray_batch --images 16       # quicker

The small models m16 and m19 (``testkit.models``, VGG-16 and VGG-19 at 1/8 width) are exported
with serving scales Q = 256,384,512 and served, with ``classify``, by the real local tritonserver
(``tritonlocal``). Over one folder of 640x480 JPEGs (quality 90), both models fused at those Q
with flips, each job runs as a subprocess, one after the other, never two at once:

1. ``clients/grpc_batch.py`` (its defaults: each file's bytes to Triton's ``classify``, 8 images
   in flight);
2. ``python -m clients.ray_batch --engine triton``: a local Ray, one actor sending each batch's
   files to the same Triton's ``classify``;
3. ``python -m clients.ray_batch --engine onnxruntime --actors 1``: a local Ray, ONNX Runtime in
   the actor, decoding in Ray's CPU tasks (fused into the actor's process by Ray); Triton is
   stopped first, so that its idle processes take nothing from the job.

Each job's wall time is from launch to exit; its classifying time from its "to classify" stderr
line (inputs listed, models read) to its exit. A Ray job starts its local Ray after that line, so
Ray's start-up is also measured alone: ``import ray``, ``ray.init`` as the job calls it, and the
exit that shuts it down, in a process of its own. Also measured, in this process on one core:
decoding and rescaling one JPEG into the views a job ships to its engine (``Classifier.prepare``,
the three Q with flips, shared by both models), and the size of those views pickled.

The three outputs must agree (same paths, same top-5 indices, probabilities within 1e-6, fused
and per model); the largest difference is printed. Prints one markdown table, the machine and the
ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.report import load_average, machine
from bench.triton_classify import HEIGHT, QUALITY, SCALES, WIDTH, cell, write_images
from inference import Classifier, ClassifyOptions, decode_image, read_repository
from inference.backends.triton import TritonBackend
from inference.remote import RemoteClassifier
from inference.repository import ModelEntry
from testkit import REPOSITORY_ROOT
from testkit.models import write_small_repository
from testkit.processes import local_triton

DEFAULT_IMAGES = 48
SAME = 1e-6  # two fp32 runs of the same graphs on the same views differ by a few 1e-8 here
STARTUP_RUNS = 3
TO_CLASSIFY = " to classify with "  # in both clients' line before they start classifying
# Ray Data logs this (INFO, whatever the job's logging level) when its pipeline ends; its time
# runs from the executor's start, after ray.init, and includes starting the actors.
RAY_DATA_FINISHED = re.compile(r"execution finished in ([0-9.]+) seconds")
# What ray_batch does before and around its pipeline, alone: import, start a local Ray, exit.
RAY_STARTUP = """
import sys
print("Ray alone: 0 to classify with nothing", file=sys.stderr, flush=True)
import ray
import ray.data
ray.init(include_dashboard=False, logging_level="WARNING")
"""


@dataclass
class JobRun:
    """One subprocess: seconds from launch to exit, from its "to classify" line to exit, and
    of Ray Data's execution as Ray logs it (``None`` for a job without Ray)."""

    name: str
    job_s: float
    classifying_s: float
    execution_s: float | None = None


def run_job(name: str, command: list[str]) -> JobRun:
    """Run ``command`` from the repository root; fail with its last lines if it fails."""
    log: list[str] = []
    launched = time.perf_counter()
    started, execution = None, None
    with subprocess.Popen(
        command,
        cwd=REPOSITORY_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    ) as job:
        assert job.stderr is not None
        for line in job.stderr:
            log.append(line)
            if started is None and TO_CLASSIFY in line:
                started = time.perf_counter()
            if found := RAY_DATA_FINISHED.search(line):
                execution = float(found.group(1))
        code = job.wait()
    finished = time.perf_counter()
    if code != 0 or started is None:
        raise RuntimeError(f"{name} failed (exit {code}):\n{''.join(log[-30:])}")
    return JobRun(name, finished - launched, finished - started, execution)


def grpc_batch(folder: Path, url: str, out: Path) -> list[str]:
    """``clients/grpc_batch.py`` with its defaults (the file's bytes to ``classify``)."""
    return [sys.executable, str(REPOSITORY_ROOT / "clients" / "grpc_batch.py"), str(folder)] + [
        "--url",
        url,
        "--out",
        str(out),
        "--overwrite",
        "--no-progress",
    ]


def ray_batch(folder: Path, out: Path, *engine: str) -> list[str]:
    """``python -m clients.ray_batch`` on a local Ray with its defaults and ``engine``'s flags."""
    command = [sys.executable, "-m", "clients.ray_batch", str(folder), "--out", str(out)]
    return command + ["--overwrite", "--no-progress", *engine]


def read_lines(output: Path) -> dict[str, dict]:
    """Every record of a JSON Lines file or of a folder of part files, by path, each path once."""
    parts = sorted(output.glob("*.jsonl")) if output.is_dir() else [output]
    records = [json.loads(line) for part in parts for line in part.read_text().splitlines()]
    by_path = {record["path"]: record for record in records}
    if len(by_path) != len(records):
        raise RuntimeError(f"{output} holds a path more than once")
    errors = [record for record in records if "error" in record]
    if errors:
        raise RuntimeError(f"{output} has error lines, e.g. {errors[0]}")
    return by_path


def largest_difference(reference: dict[str, dict], other: dict[str, dict]) -> tuple[float, str]:
    """(largest difference of a top-k probability, fused or per model; "" or what disagrees)."""
    if reference.keys() != other.keys():
        return float("inf"), f"different paths: {sorted(reference.keys() ^ other.keys())[:3]}"
    largest = 0.0
    for path, mine in reference.items():
        theirs = other[path]
        pairs = [(mine["predictions"], theirs["predictions"])]
        pairs += [(mine["per_model"][m], theirs["per_model"].get(m, [])) for m in mine["models"]]
        for a, b in pairs:
            if [p["index"] for p in a] != [p["index"] for p in b]:
                return float("inf"), f"{path}: top-k classes differ"
            for x, y in zip(a, b, strict=True):
                largest = max(largest, abs(x["probability"] - y["probability"]))
    return largest, ""


def prepare_cost(images: list[bytes], models: dict[str, ModelEntry]) -> tuple[float, float, int]:
    """(median CPU ms, median wall ms, median pickled bytes) to decode one image and make its
    views at SCALES with flips for ``models``, here, on one core, after one warm-up image."""
    planner = Classifier(None, models)
    options = planner.resolve(ClassifyOptions(scales=SCALES, flip=True))
    cpu, wall, sizes = [], [], []
    for index, data in enumerate([images[0], *images]):
        started, started_cpu = time.perf_counter(), time.thread_time()
        views = planner.prepare(decode_image(data), options)
        elapsed, elapsed_cpu = time.perf_counter() - started, time.thread_time() - started_cpu
        if index:
            cpu.append(elapsed_cpu * 1e3)
            wall.append(elapsed * 1e3)
            sizes.append(len(pickle.dumps(views, protocol=5)))
    return statistics.median(cpu), statistics.median(wall), int(statistics.median(sizes))


async def warm_classify(url: str, data: bytes) -> None:
    """One image through ``classify``: first runs of each model at these shapes, before timing."""
    backend = TritonBackend(url, pipeline=True)
    try:
        models = await backend.served_models()
        options = ClassifyOptions(scales=SCALES)
        await RemoteClassifier(backend, models).classify_file(data, options)
    finally:
        await backend.close()


def measure(args: argparse.Namespace) -> tuple[list[JobRun], dict]:
    """Every job in turn; the runs and what the notes below the table say."""
    repo = args.workdir / "repo"
    write_small_repository(repo, scales=SCALES)
    folder = args.workdir / "images"
    images = write_images(folder, args.images)
    notes: dict = {"file_bytes": sum(map(len, images)) / len(images), "load": [load_average()]}
    models = read_repository(repo)
    notes["models"] = tuple(models)
    notes["prepare"] = prepare_cost(images, models)

    startups = [
        run_job("Ray start-up", [sys.executable, "-c", RAY_STARTUP]).classifying_s
        for _ in range(STARTUP_RUNS)
    ]
    notes["startup"] = startups
    outputs = {
        "grpc": args.workdir / "grpc-results.jsonl",
        "triton": args.workdir / "ray-triton",
        "onnxruntime": args.workdir / "ray-onnxruntime",
    }
    runs = []
    with local_triton(repo) as triton:
        url = triton.grpc_url
        asyncio.run(warm_classify(url, images[0]))
        runs.append(run_job("grpc_batch", grpc_batch(folder, url, outputs["grpc"])))
        notes["load"].append(load_average())
        engine = ("--engine", "triton", "--url", url)
        runs.append(
            run_job("ray_batch --engine triton", ray_batch(folder, outputs["triton"], *engine))
        )
        notes["load"].append(load_average())
    engine = ("--engine", "onnxruntime", "--repository", str(repo), "--actors", "1")
    runs.append(
        run_job(
            "ray_batch --engine onnxruntime", ray_batch(folder, outputs["onnxruntime"], *engine)
        )
    )
    notes["load"].append(load_average())

    reference = read_lines(outputs["grpc"])
    notes["agreement"] = {
        name: largest_difference(reference, read_lines(outputs[name]))
        for name in ("triton", "onnxruntime")
    }
    return runs, notes


def report(runs: list[JobRun], notes: dict, count: int) -> str:
    """The markdown table, then the machine, the agreement and the ratios."""
    startup = statistics.median(notes["startup"])
    grpc, triton, onnxruntime = runs
    lines = [
        "| job | images | job s | classifying s | of which Ray Data's execution s "
        "| images/s (classifying) | images/s (Ray Data's execution) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        over_execution = count / run.execution_s if run.execution_s else None
        lines.append(
            f"| {run.name} | {count} | {run.job_s:.1f} | {run.classifying_s:.1f} "
            f"| {cell(run.execution_s, '.1f')} | {count / run.classifying_s:.2f} "
            f"| {cell(over_execution, '.2f')} |"
        )
    lines.append(
        f"| Ray start-up alone (import, ray.init, exit; median of {len(notes['startup'])}) "
        f"| - | {startup:.1f} | - | - | - | - |"
    )
    cpu_ms, wall_ms, view_bytes = notes["prepare"]
    agreement = "; ".join(
        f"{name}: {difference:.2e}"
        + (f" ({problem})" if problem else "")
        + ("" if difference <= SAME else f" - over {SAME:g}, the outputs DISAGREE")
        for name, (difference, problem) in notes["agreement"].items()
    )
    lines += [
        "",
        f"machine: {machine()}; load average {' -> '.join(notes['load'])} (before, then after "
        "each job)",
        f"models {','.join(notes['models'])} (small) fused, Q = {','.join(map(str, SCALES))} "
        f"with flips; {count} JPEGs of {WIDTH}x{HEIGHT} at quality {QUALITY}, "
        f"{notes['file_bytes']:,.0f} bytes on average",
        "Ray start-up alone, each run: " + ", ".join(f"{s:.1f}" for s in notes["startup"]) + " s",
        f"decode + views (3 Q with flips) of one image, one core: {cpu_ms:.1f} ms CPU "
        f"({wall_ms:.1f} ms wall), {1e3 / cpu_ms:.0f} images/s per core; pickled views "
        f"{view_bytes:,} bytes per image",
        f"largest difference of a top-5 probability (fused and per model) against grpc_batch: "
        f"{agreement}",
        "",
        "ratios and overheads",
    ]
    for run in (triton, onnxruntime):
        line = f"- images/s, {run.name} / grpc_batch: {grpc.classifying_s / run.classifying_s:.2f}"
        if run.execution_s:
            line += f" (Ray Data's execution alone: {grpc.classifying_s / run.execution_s:.2f})"
        lines.append(line)
    overhead = (triton.classifying_s - grpc.classifying_s) / count
    lines.append(
        f"- Ray's overhead per image, (Ray triton - grpc_batch classifying s) / {count}: "
        f"{overhead * 1e3:.0f} ms; without Ray's start-up alone: "
        f"{(overhead - startup / count) * 1e3:.0f} ms"
    )
    if triton.execution_s:
        lines.append(
            f"- Ray Data's execution (actors' start included) against grpc_batch, per image: "
            f"{(triton.execution_s - grpc.classifying_s) / count * 1e3:.0f} ms; outside it "
            f"(import, ray.init, planning, shut-down): "
            f"{triton.classifying_s - triton.execution_s:.1f} s of the Ray triton job"
        )
    lines.append(
        f"- Ray's fixed start-up cost: {startup:.1f} s alone, the time of "
        f"{startup * count / grpc.classifying_s:.0f} images through grpc_batch here"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=DEFAULT_IMAGES, help="JPEGs to classify")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "vggserve-bench-ray-batch",
        help="scratch folder: the models, the images and the jobs' outputs",
    )
    args = parser.parse_args()
    if args.images < 1:
        parser.error("--images must be at least 1")
    args.workdir.mkdir(parents=True, exist_ok=True)
    runs, notes = measure(args)
    print()
    print(report(runs, notes, args.images))
    if any(difference > SAME for difference, _ in notes["agreement"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
