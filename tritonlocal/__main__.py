"""``python -m tritonlocal``: serve a model repository from the real tritonserver, foreground."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from inference.repository import RepositoryError, parse_model_names
from tritonlocal.install import TritonNotInstalled
from tritonlocal.launcher import DEFAULT_HOST, DEFAULT_PORTS, LocalTriton, TritonStartError


def model_names_argument(text: str) -> tuple[str, ...]:
    """``--models`` for argparse: the names, or argparse's error saying what to give."""
    try:
        return parse_model_names(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tritonlocal",
        description="Serve a model repository from the tritonserver bundled in nvidia-pytriton "
        "(CPU, Python-backend twin running the same model.onnx with ONNX Runtime).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--host", default=DEFAULT_HOST, help="address of all three endpoints")
    parser.add_argument("--http-port", type=int, default=DEFAULT_PORTS["http"])
    parser.add_argument("--grpc-port", type=int, default=DEFAULT_PORTS["grpc"])
    parser.add_argument("--metrics-port", type=int, default=DEFAULT_PORTS["metrics"])
    parser.add_argument(
        "--models", type=model_names_argument, help="comma-separated model names (default: all)"
    )
    parser.add_argument("--instances", type=int, help="instances per model (default: config's)")
    parser.add_argument("--work-dir", type=Path, help="twin + log folder (default: temporary)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to become ready")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    server = LocalTriton(
        args.repository,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        host=args.host,
        models=list(args.models) if args.models else None,
        instance_count=args.instances,
        work_dir=args.work_dir,
        log_to_console=True,
    )

    stopping: list[str] = []

    def shut_down(signum, _frame) -> None:
        # Only note it: stopping (which waits on the process) must not run inside a handler
        # that interrupted another wait on the same process.
        stopping.append(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, shut_down)
    signal.signal(signal.SIGTERM, shut_down)
    try:
        server.start(args.timeout)
    except (RepositoryError, TritonNotInstalled, TritonStartError) as exc:
        print(f"tritonlocal: {exc}", file=sys.stderr)
        return 1
    print(
        f"tritonlocal: ready, serving {args.repository} (gRPC {server.grpc_url}, HTTP "
        f"{server.http_url}, metrics {args.host}:{args.metrics_port}); Ctrl-C stops it",
        file=sys.stderr,
        flush=True,
    )
    while server.running() and not stopping:
        time.sleep(0.2)
    if stopping:
        print(f"tritonlocal: {stopping[0]}, stopping Triton", file=sys.stderr, flush=True)
    code = server.stop()
    server.close()
    return 0 if stopping else code or 0


if __name__ == "__main__":
    sys.exit(main())
