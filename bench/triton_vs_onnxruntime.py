"""Triton over gRPC vs in-process ONNX Runtime, same model and images, one run.

    .venv/bin/python -m bench.triton_vs_onnxruntime                 # small VGG-16 and full VGG-16
    .venv/bin/python -m bench.triton_vs_onnxruntime --models small  # quick

For each model: p50/p95 latency at concurrency 1 and throughput with several images in flight,
Q = 256,384,512 with flips, through ``inference.Classifier`` on (a) the ONNX Runtime backend in
this process and (b) ``TritonBackend`` against the real tritonserver (``tritonlocal``: the
Python-backend twin running the same model.onnx). The two never run at the same time. Prints a
table and the ratios Triton / ONNX Runtime.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from bench.report import machine, percentile
from inference import Classifier, ClassifyOptions, decode_image, read_repository
from inference.backends.onnxruntime import OnnxRuntimeBackend
from inference.backends.triton import TritonBackend
from testkit.images import jpeg
from testkit.models import SMALL, export_random_model
from testkit.processes import local_triton

# name: (architecture, vgg.models.build sizes); both served at the paper's Q = 256,384,512.
MODELS = {"small": ("vgg16", SMALL), "vgg16": ("vgg16", None)}
SCALES = (256, 384, 512)


def measure(classifier: Classifier, images: list[bytes], concurrency: int) -> dict:
    """Latency of each image alone, then throughput with ``concurrency`` images in flight."""

    async def one(data: bytes) -> float:
        start = time.perf_counter()
        image = await asyncio.to_thread(decode_image, data)
        await classifier.classify(image, ClassifyOptions())
        return time.perf_counter() - start

    async def run() -> dict:
        await one(images[0])  # warm-up: first-run allocations, connection set-up
        latencies = [await one(d) for d in images]
        semaphore = asyncio.Semaphore(concurrency)

        async def bounded(data: bytes) -> None:
            async with semaphore:
                await one(data)

        start = time.perf_counter()
        await asyncio.gather(*(bounded(d) for d in images))
        throughput = len(images) / (time.perf_counter() - start)
        await classifier.backend.close()
        return {"latencies": latencies, "throughput": throughput}

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="small,vgg16", help="small and/or vgg16")
    parser.add_argument("--images", type=int, default=0, help="images per phase (default by model)")
    parser.add_argument("--concurrency", type=int, default=4, help="images in flight")
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "vggserve-bench-triton"
    )
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for key in args.models.split(","):
        arch, overrides = MODELS[key]
        repo = export_random_model(args.workdir / key / "repo", arch, key, 0, overrides, SCALES)
        entries = read_repository(repo, [key])
        images = [jpeg(640, 480, seed=i) for i in range(args.images or (40 if overrides else 6))]

        in_process = measure(
            Classifier(OnnxRuntimeBackend(entries), entries), images, args.concurrency
        )
        with local_triton(repo, models=[key]) as triton:
            backend = TritonBackend(triton.grpc_url, entries)
            via_triton = measure(Classifier(backend, entries), images, args.concurrency)
        rows.append((key, len(images), in_process, via_triton))

    print(
        f"\nmachine: {machine()}; Q = 256,384,512 with flips; 640x480 JPEGs; "
        f"throughput with {args.concurrency} images in flight"
    )
    print(f"{'model':7} {'images':>6} {'path':12} {'p50 ms':>9} {'p95 ms':>9} {'img/s':>8}")
    for key, count, in_process, via_triton in rows:
        for label, r in (("onnxruntime", in_process), ("triton grpc", via_triton)):
            print(
                f"{key:7} {count:6d} {label:12} {percentile(r['latencies'], 50) * 1e3:9.1f} "
                f"{percentile(r['latencies'], 95) * 1e3:9.1f} {r['throughput']:8.2f}"
            )
    print("\nratios (triton / onnxruntime)")
    for key, _count, in_process, via_triton in rows:
        tput = via_triton["throughput"] / in_process["throughput"]
        p50 = percentile(via_triton["latencies"], 50) / percentile(in_process["latencies"], 50)
        print(f"{key:7} throughput {tput:.3f}   p50 latency {p50:.3f}")


if __name__ == "__main__":
    main()
