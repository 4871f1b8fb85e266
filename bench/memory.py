"""Server RSS and open files over many requests of mixed image sizes (ONNX Runtime arenas).

    .venv/bin/python bench/memory.py                    # 500 requests, small VGG-16 + VGG-19
    .venv/bin/python bench/memory.py --requests 2000 --model vgg16

Prints RSS after the first 50 requests and after all of them; the target is growth < 10%.
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

import numpy as np
import requests
from common import ServerProcess, export_random, machine
from PIL import Image


def mixed_images(count: int, seed: int = 0) -> list[bytes]:
    """JPEG and PNG images of many sizes and aspect ratios (portrait, landscape, square, odd)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        width, height = (int(v) for v in rng.integers(80, 900, size=2))
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, "PNG" if i % 3 == 0 else "JPEG")
        out.append(buffer.getvalue())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--model", default="small", choices=("small", "vgg16"))
    parser.add_argument("--scales", default="256,384,512", help="Q set of every request")
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "vggserve-bench"
    )
    args = parser.parse_args()
    small = args.model == "small"
    repo = export_random(args.workdir / args.model, "vgg16", args.model, small)
    distinct = mixed_images(100)
    with ServerProcess("--repository", str(repo)) as server:
        session = requests.Session()
        samples = {}
        failures = 0
        for i in range(args.requests):
            response = session.post(
                f"{server.url}/v1/classify",
                params={"scales": args.scales},
                files={"file": ("x", distinct[i % len(distinct)])},
            )
            failures += response.status_code != 200
            if i + 1 in (50, args.requests) or (i + 1) % 100 == 0:
                samples[i + 1] = (server.rss_bytes(), server.open_files())
                print(
                    f"after {i + 1:5d} requests: RSS {samples[i + 1][0] / 2**20:7.1f} MiB, "
                    f"open files {samples[i + 1][1]}",
                    flush=True,
                )
    first, last = samples[50], samples[args.requests]
    print(f"\nmachine: {machine()}; model {args.model}; scales {args.scales}; failures {failures}")
    print(
        f"RSS growth after warm-up (50 -> {args.requests}): {last[0] / first[0] - 1:+.1%} "
        f"(target < 10%); open files {first[1]} -> {last[1]}"
    )


if __name__ == "__main__":
    main()
