"""``python -m server``: the HTTP front end under uvicorn.

python -m server                                  # every model in model_repository/
python -m server --models vgg16 --scales 256,384 --port 9000
python -m server --backend triton --triton-url 127.0.0.1:8001
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from inference import OptionError, RepositoryError
from server.engine import StartupError
from server.heap import fix_mmap_threshold
from server.settings import (
    BACKENDS,
    TORCH_COMPILE_MODES,
    TORCH_DTYPES,
    Settings,
    parse_int_list,
    parse_name_list,
    parse_size_list,
)

# Request line + headers of one request; browsers send a few KB, cookies included.
MAX_HEADER_BYTES = 64 * 1024


def _list_of(parse, what: str):
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = what  # argparse names the type in its error message
    return convert


def _positive(kind):
    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    convert.__name__ = kind.__name__
    return convert


def parse_args(argv: list[str] | None = None) -> tuple[Settings, str, float]:
    """Command-line flags to :class:`~server.settings.Settings`, the log level and the grace
    period (seconds)."""
    defaults = Settings()
    parser = argparse.ArgumentParser(
        prog="python -m server",
        description="HTTP front end: dense multi-scale VGG classification (FastAPI + uvicorn).",
    )
    parser.add_argument(
        "--repository",
        type=Path,
        default=defaults.repository,
        help="Triton model repository written by python export/to_onnx.py (default: %(default)s)",
    )
    parser.add_argument(
        "--models",
        type=_list_of(parse_name_list, "model list"),
        default=None,
        help="comma-separated models to serve and fuse (default: every model in the repository)",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default=defaults.backend,
        help="onnxruntime: in this process (default); triton: a Triton server "
        "over gRPC; torch: PyTorch in this process (for GPUs)",
    )
    parser.add_argument(
        "--triton-url",
        default=defaults.triton_url,
        help="Triton gRPC address, with --backend triton (default: %(default)s)",
    )
    parser.add_argument(
        "--torch-device",
        default=defaults.torch_device,
        help="with --backend torch: auto (the first CUDA device, else the CPU), "
        "cpu, cuda or cuda:N (default: %(default)s)",
    )
    parser.add_argument(
        "--torch-dtype",
        choices=TORCH_DTYPES,
        default=defaults.torch_dtype,
        help="with --backend torch: precision of the convolutions; auto is bf16 "
        "on CUDA and fp32 on the CPU; pre- and post-processing stay fp32 "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--torch-compile",
        choices=TORCH_COMPILE_MODES,
        default=defaults.torch_compile,
        help="with --backend torch: torch.compile mode (dynamic shapes, one "
        "compile per model); auto is reduce-overhead (CUDA graphs for shapes "
        "that recur) on CUDA and off (eager) on the CPU (default: %(default)s)",
    )
    parser.add_argument(
        "--torch-warmup",
        type=_list_of(parse_size_list, "size list"),
        default=(),
        help="with --backend torch: image sizes WIDTHxHEIGHT (e.g. 640x480,"
        "480x640) run at every --scales Q with flips before the server answers, "
        "so the first requests of those shapes pay no compile or graph capture "
        "(default: none)",
    )
    parser.add_argument(
        "--host", default=defaults.host, help="address to bind (default: %(default)s)"
    )
    parser.add_argument(
        "--port", type=int, default=defaults.port, help="TCP port (default: %(default)s)"
    )
    parser.add_argument(
        "--scales",
        type=_list_of(parse_int_list, "scale list"),
        default=None,
        help="scales Q (shorter side) of a request that gives none, "
        "comma-separated, for every model (default: each model's serving "
        "scales, written into its config.pbtxt by the exporter)",
    )
    parser.add_argument(
        "--max-upload-mb",
        type=_positive(float),
        default=defaults.max_upload_mb,
        help="largest request body in MB, refused with 413 while it streams in "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--max-pixels",
        type=_positive(int),
        default=defaults.max_pixels,
        help="largest image in pixels (width x height), checked from the header "
        "before decoding, else 413 (default: %(default)s)",
    )
    parser.add_argument(
        "--max-concurrency",
        type=_positive(int),
        default=defaults.max_concurrency,
        help="requests being decoded and classified at once (default: %(default)s)",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=defaults.max_queue,
        help="requests waiting for a slot; beyond them: 429 with Retry-After "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=_positive(int),
        default=None,
        help="ONNX Runtime threads per inference (default: every core)",
    )
    parser.add_argument(
        "--shape-multiple",
        type=_positive(int),
        default=None,
        help="round the longer rescaled side to a multiple of this (e.g. 32) so "
        "photos of many aspect ratios make few input shapes; slightly stretches "
        "the image (default: exact rescaling, as the paper)",
    )
    parser.add_argument(
        "--batch-delay-ms",
        type=float,
        default=None,
        help="micro-batching: how long the first same-shape view batch waits for "
        "other requests' views to run with it; 0 turns it off (default: 2 on a "
        "GPU, off on CPU)",
    )
    parser.add_argument(
        "--max-batch",
        type=_positive(int),
        default=defaults.max_batch,
        help="most views in one micro-batch (default: %(default)s)",
    )
    parser.add_argument(
        "--jpeg-draft",
        action="store_true",
        help="decode JPEGs much larger than the largest Q at 1/2, 1/4 or 1/8 size "
        "(libjpeg's scaled IDCT), keeping the shorter side at least twice that Q: "
        "faster decoding, probabilities within 1e-3 of full decoding "
        "(default: off, exact decoding)",
    )
    parser.add_argument(
        "--grace-period",
        type=_positive(float),
        default=30.0,
        help="seconds in-flight requests get to finish after SIGTERM before the "
        "server exits anyway (default: %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=("critical", "error", "warning", "info", "debug"),
        help="uvicorn and server log level (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.max_queue < 0:
        parser.error("--max-queue must be 0 or more")
    if args.batch_delay_ms is not None and not 0 <= args.batch_delay_ms <= 1000:
        parser.error(f"--batch-delay-ms must be between 0 and 1000, got {args.batch_delay_ms}")
    if not 0 < args.port < 65536:
        parser.error(f"--port must be between 1 and 65535, got {args.port}")
    settings = Settings(
        repository=args.repository,
        models=args.models,
        backend=args.backend,
        triton_url=args.triton_url,
        host=args.host,
        port=args.port,
        scales=tuple(args.scales) if args.scales else None,
        max_upload_mb=args.max_upload_mb,
        max_pixels=args.max_pixels,
        max_concurrency=args.max_concurrency,
        max_queue=args.max_queue,
        threads=args.threads,
        torch_device=args.torch_device,
        torch_dtype=args.torch_dtype,
        torch_compile=args.torch_compile,
        torch_warmup=tuple(args.torch_warmup),
        shape_multiple=args.shape_multiple,
        batch_delay_ms=args.batch_delay_ms,
        max_batch=args.max_batch,
        jpeg_draft=args.jpeg_draft,
    )
    return settings, args.log_level, args.grace_period


def main(argv: list[str] | None = None) -> int:
    """Start the server; a start that cannot work exits non-zero with one line on stderr."""
    settings, log_level, grace_period = parse_args(argv)
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(message)s")
    fix_mmap_threshold()  # before any image buffer is allocated
    try:
        from server.main import create_app

        app = create_app(settings)
    except RepositoryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OptionError as exc:
        print(f"error: --{exc}", file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    import uvicorn

    # On SIGTERM uvicorn stops accepting at once and waits for in-flight requests; after the
    # grace period it cancels what is left and exits. h11, not httptools: httptools buffers
    # request headers without any limit (300 MB of one header took 300 MB of RSS), h11 answers
    # 400 beyond MAX_HEADER_BYTES.
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        timeout_graceful_shutdown=grace_period,
        http="h11",
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
