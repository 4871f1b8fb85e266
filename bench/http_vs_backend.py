"""HTTP front end vs the raw in-process backend, same model and images, one run.

    .venv/bin/python -m bench.http_vs_backend                 # small VGG-16 and full VGG-16
    .venv/bin/python -m bench.http_vs_backend --models small  # quick

For each model: p50/p95 latency at concurrency 1 and throughput at saturation (several
requests in flight), Q = 256,384,512 with flips, through (a) ``inference.Classifier`` on the
ONNX Runtime backend in this process and (b) ``POST /v1/classify`` on ``python -m server``.
The two never run at the same time. Prints a table of ratios (HTTP / raw).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.report import machine, percentile
from inference import Classifier, ClassifyOptions, decode_image, read_repository
from inference.backends.onnxruntime import OnnxRuntimeBackend
from testkit.images import jpeg
from testkit.models import SMALL, export_random_model
from testkit.processes import ServerProcess

# name: (architecture, vgg.models.build sizes); both served at the paper's Q = 256,384,512.
MODELS = {"small": ("vgg16", SMALL), "vgg16": ("vgg16", None)}
SCALES = (256, 384, 512)


def raw_backend(repo: Path, name: str, images: list[bytes], concurrency: int) -> dict:
    entries = read_repository(repo, [name])
    classifier = Classifier(OnnxRuntimeBackend(entries), entries)

    async def one(data: bytes) -> float:
        start = time.perf_counter()
        image = await asyncio.to_thread(decode_image, data)
        await classifier.classify(image, ClassifyOptions())
        return time.perf_counter() - start

    async def run() -> tuple[list[float], float]:
        await one(images[0])  # warm-up
        latencies = [await one(d) for d in images]
        semaphore = asyncio.Semaphore(concurrency)

        async def bounded(data: bytes) -> None:
            async with semaphore:
                await one(data)

        start = time.perf_counter()
        await asyncio.gather(*(bounded(d) for d in images))
        return latencies, len(images) / (time.perf_counter() - start)

    latencies, throughput = asyncio.run(run())
    asyncio.run(classifier.backend.close())
    return {"latencies": latencies, "throughput": throughput}


def http(repo: Path, name: str, images: list[bytes], concurrency: int) -> dict:
    import requests

    with ServerProcess(
        "--repository", str(repo), "--models", name, health_path="/readyz"
    ) as server:
        session = requests.Session()

        def one(data: bytes) -> float:
            start = time.perf_counter()
            response = session.post(f"{server.url}/v1/classify", files={"file": ("i.jpg", data)})
            response.raise_for_status()
            return time.perf_counter() - start

        one(images[0])
        latencies = [one(d) for d in images]
        with ThreadPoolExecutor(concurrency) as pool:
            sessions = [requests.Session() for _ in range(concurrency)]

            def post(args: tuple[int, bytes]) -> None:
                i, data = args
                sessions[i % concurrency].post(
                    f"{server.url}/v1/classify", files={"file": ("i.jpg", data)}
                ).raise_for_status()

            start = time.perf_counter()
            list(pool.map(post, enumerate(images)))
            throughput = len(images) / (time.perf_counter() - start)
    return {"latencies": latencies, "throughput": throughput}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="small,vgg16", help="small and/or vgg16")
    parser.add_argument("--images", type=int, default=0, help="images per phase (default by model)")
    parser.add_argument(
        "--concurrency", type=int, default=4, help="requests in flight at saturation"
    )
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "vggserve-bench"
    )
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for key in args.models.split(","):
        arch, overrides = MODELS[key]
        repo = export_random_model(args.workdir / key / "repo", arch, key, 0, overrides, SCALES)
        count = args.images or (40 if overrides else 8)
        images = [jpeg(640, 480, seed=i) for i in range(count)]
        raw = raw_backend(repo, key, images, args.concurrency)
        over_http = http(repo, key, images, args.concurrency)
        rows.append((key, raw, over_http))

    print(f"\nmachine: {machine()}; Q = 256,384,512 with flips; 640x480 JPEGs")
    header = f"{'model':8} {'path':6} {'p50 ms':>9} {'p95 ms':>9} {'img/s sat':>10}"
    print(header)
    for key, raw, over_http in rows:
        for label, r in (("raw", raw), ("http", over_http)):
            print(
                f"{key:8} {label:6} {percentile(r['latencies'], 50) * 1e3:9.1f} "
                f"{percentile(r['latencies'], 95) * 1e3:9.1f} {r['throughput']:10.2f}"
            )
    print("\nratios (http / raw): throughput should be >= 0.9, p50 latency <= 1.1")
    for key, raw, over_http in rows:
        tput = over_http["throughput"] / raw["throughput"]
        p50 = percentile(over_http["latencies"], 50) / percentile(raw["latencies"], 50)
        print(f"{key:8} throughput {tput:.3f}   p50 latency {p50:.3f}")


if __name__ == "__main__":
    main()
