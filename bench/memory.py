"""Server RSS and open files over many requests of mixed image sizes (ONNX Runtime arenas).

    .venv/bin/python -m bench.memory                    # 500 requests, small VGG-16
    .venv/bin/python -m bench.memory --requests 2000 --model vgg16

Prints RSS after the first 50 requests and after all of them; the target is growth < 5%.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import requests

from bench.report import machine
from testkit.images import mixed_sizes
from testkit.models import SMALL, export_random_model
from testkit.processes import ServerProcess


def measure_memory(requests_count: int, model: str, scales: str, workdir: Path) -> dict:
    """The server's RSS and open files after 50 and after ``requests_count`` requests."""
    overrides = SMALL if model == "small" else None
    repo = export_random_model(workdir / model / "repo", "vgg16", model, 0, overrides)
    distinct = mixed_sizes(100)
    with ServerProcess("--repository", str(repo), health_path="/readyz") as server:
        session = requests.Session()
        samples = {}
        failures = 0
        for i in range(requests_count):
            response = session.post(
                f"{server.url}/v1/classify",
                params={"scales": scales},
                files={"file": ("x", distinct[i % len(distinct)])},
            )
            failures += response.status_code != 200
            if i + 1 in (50, requests_count) or (i + 1) % 100 == 0:
                used = server.resources()
                samples[i + 1] = (used.rss_bytes, used.open_fds)
                print(
                    f"after {i + 1:5d} requests: RSS {samples[i + 1][0] / 2**20:7.1f} MiB, "
                    f"open files {samples[i + 1][1]}",
                    flush=True,
                )
    first, last = samples[50], samples[requests_count]
    return {
        "first_mib": first[0] / 2**20,
        "last_mib": last[0] / 2**20,
        "growth": last[0] / first[0] - 1,
        "open_files": (first[1], last[1]),
        "failures": failures,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--model", default="small", choices=("small", "vgg16"))
    parser.add_argument("--scales", default="256,384,512", help="Q set of every request")
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "vggserve-bench"
    )
    args = parser.parse_args()
    result = measure_memory(args.requests, args.model, args.scales, args.workdir)
    print(
        f"\nmachine: {machine()}; model {args.model}; scales {args.scales}; "
        f"failures {result['failures']}"
    )
    print(
        f"RSS growth after warm-up (50 -> {args.requests}): {result['growth']:+.1%} "
        f"(target < 5%); open files {result['open_files'][0]} -> {result['open_files'][1]}"
    )


if __name__ == "__main__":
    main()
