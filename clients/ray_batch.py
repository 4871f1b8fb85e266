"""Offline batch inference on Ray Data: files or object storage in, JSON Lines part files out.

    python -m clients.ray_batch photos/ --out results/                      # a local Ray, ONNX Runtime
    python -m clients.ray_batch s3://bucket/images/ --out results/ --engine triton \\
        --url triton.vggserve.svc:8001 --address auto                       # an existing cluster

Files are read as bytes by Ray (local paths or any pyarrow filesystem URI: s3://, gs://,
hdfs://). With an in-process engine (``onnxruntime``, ``torch``) each file is decoded and
rescaled in CPU tasks and the views go to a pool of actors (``--actors``), each holding the
models once; with ``triton`` an actor pool sends each file's bytes to Triton's ``classify``
model. Either way the protocol is :mod:`inference`'s, so each line is ``clients/grpc_batch.py``'s
record (``path``, ``predictions``, ``per_model``, ``scales``, ``models``), or ``{"path",
"error"}`` for a file that cannot be classified, in part files under ``--out``. ``--resume``
skips every path already in a complete part file, so a job killed at any point and run again
ends with every input exactly once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pickle
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from clients.grpc_batch import UsageError, discover, named_inputs, result_record
from inference import Classifier, ClassifyOptions, ImageError, OptionError, decode_image
from inference.backends.base import BackendUnavailable
from inference.images import IMAGE_SUFFIXES
from inference.protocol import parse_scales
from inference.repository import ModelEntry, RepositoryError, parse_model_names, read_repository

ENGINES = ("onnxruntime", "openvino", "torch", "triton")
PART_SUFFIX = ".jsonl"
TRITON_ACTOR_CPUS = 0.25
EXIT_OK, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 2, 75  # as grpc_batch


# --- inputs and outputs ------------------------------------------------------------------------


def is_uri(name: str) -> bool:
    """Whether ``name`` is a filesystem URI (s3://, gs://, hdfs://, file://) for pyarrow."""
    return "://" in name


def list_inputs(inputs: Iterable[str], list_file: Path | None = None) -> list[str]:
    """Every input file, sorted, each once: local names as ``grpc_batch.discover`` gives them
    (``file://`` URIs are local names), other URIs walked with pyarrow's filesystem for their
    scheme. One job reads from one filesystem: Ray reads its files with one."""
    names = [name.removeprefix("file://") for name in named_inputs(inputs, list_file)]
    filesystems = {uri_prefix(name) if is_uri(name) else "local files" for name in names}
    if len(filesystems) > 1:
        raise UsageError(
            f"the inputs are on several filesystems ({', '.join(sorted(filesystems))}); run one "
            "job per filesystem"
        )
    local = [name for name in names if not is_uri(name)]
    found = set(discover(local))
    for uri in (name for name in names if is_uri(name)):
        found.update(_walk_uri(uri))
    return sorted(found)


# Filesystems whose paths start at the root, without the URI's host (the name node).
ROOTED_SCHEMES = ("hdfs", "viewfs")


def uri_prefix(uri: str) -> str:
    """What a URI's filesystem leaves out of its paths, read from the URI alone: ``s3://``
    (paths start with the bucket), ``hdfs://namenode:8020`` (paths start at the root)."""
    parts = urlsplit(uri)
    return f"{parts.scheme}://{parts.netloc if parts.scheme in ROOTED_SCHEMES else ''}"


def _walk_uri(uri: str) -> list[str]:
    from pyarrow import fs

    try:
        filesystem, root = fs.FileSystem.from_uri(uri)
        info = filesystem.get_file_info(root)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot open {uri}: {exc}") from exc
    if info.type == fs.FileType.File:
        return [uri]
    if info.type != fs.FileType.Directory:
        raise UsageError(f"{uri} does not exist")
    prefix = uri_prefix(uri)
    selector = fs.FileSelector(root, recursive=True)
    return [
        f"{prefix}{entry.path}"
        for entry in filesystem.get_file_info(selector)
        if entry.type == fs.FileType.File and Path(entry.path).suffix.lower() in IMAGE_SUFFIXES
    ]


class Output:
    """The output folder: part files of JSON lines, each written whole by one Ray write task."""

    def __init__(self, folder: str) -> None:
        from pyarrow import fs

        self.uri = folder if is_uri(folder) else str(Path(folder).resolve())
        self.filesystem, self.root = fs.FileSystem.from_uri(self.uri)

    def parts(self) -> list[str]:
        from pyarrow import fs

        info = self.filesystem.get_file_info(self.root)
        if info.type == fs.FileType.NotFound:
            return []
        selector = fs.FileSelector(self.root, recursive=False)
        return sorted(
            entry.path
            for entry in self.filesystem.get_file_info(selector)
            if entry.type == fs.FileType.File and entry.path.endswith(PART_SUFFIX)
        )

    def done(self) -> set[str]:
        """Paths in complete part files. A part file cut short by a kill is removed: its images
        are classified again, so each ends up in exactly one file."""
        done: set[str] = set()
        for part in self.parts():
            with self.filesystem.open_input_stream(part) as stream:
                data = stream.read()
            try:
                if data and not data.endswith(b"\n"):
                    raise ValueError("no newline at the end")
                paths = [json.loads(line)["path"] for line in data.splitlines()]
            except (ValueError, KeyError, TypeError):
                self.filesystem.delete_file(part)
                continue
            overlap = done.intersection(paths)
            if overlap:
                raise UsageError(
                    f"{part} repeats {len(overlap)} path(s) of another part file, e.g. "
                    f"{sorted(overlap)[0]}; {self.uri} holds more than one job's output"
                )
            done.update(paths)
        return done

    def write_lines(self, lines: Sequence[str]) -> None:
        """One more part file holding ``lines`` (written by the driver, e.g. missing files)."""
        self.filesystem.create_dir(self.root, recursive=True)
        path = f"{self.root}/driver-{uuid.uuid4().hex}{PART_SUFFIX}"
        with self.filesystem.open_output_stream(path) as stream:
            stream.write("".join(f"{line}\n" for line in lines).encode())


def error_line(path: str, message: str) -> str:
    return json.dumps({"path": path, "error": message}, ensure_ascii=False)


# --- the job's stages (run by Ray's workers) -----------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What every task and actor of the job needs: shipped to them by Ray."""

    models: dict[str, ModelEntry]
    options: ClassifyOptions  # resolved on the driver
    engine: str
    url: str | None = None
    threads: int | None = None
    device: str = "auto"
    precision: str = "auto"  # openvino: auto, fp32 or bf16
    retries: int = 6
    prefix: str = ""  # what the inputs' URIs have before Ray's paths (``s3://``)

    def record_path(self, path: object) -> str:
        """An input's name in the output lines, as it was given (``s3://bucket/key``)."""
        return f"{self.prefix}{path}"


def prepare_views(batch: dict[str, np.ndarray], plan: Plan) -> dict[str, np.ndarray]:
    """CPU task: decode and rescale each file; the views travel pickled, errors as lines."""
    planner = Classifier(None, plan.models)
    views, errors = [], []
    paths = [plan.record_path(path) for path in batch["path"]]
    for path, data in zip(paths, batch["bytes"], strict=True):
        try:
            image = decode_image(bytes(data))
            planner.check_image(image.size, plan.options.scales)
            views.append(pickle.dumps(planner.prepare(image, plan.options), protocol=5))
            errors.append("")
        except ImageError as exc:
            views.append(b"")
            errors.append(error_line(path, str(exc)))
    return {"path": paths, "views": np.array(views, dtype=object), "error": errors}


class _Actor:
    """An event loop of its own: the classifiers are asynchronous, Ray calls batches in turn."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def gather(self, coroutines) -> list:
        """Every coroutine's result, run together in this actor's loop."""

        async def together() -> list:
            return list(await asyncio.gather(*coroutines))

        return self.loop.run_until_complete(together())


class EngineActor(_Actor):
    """Holds the models once (ONNX Runtime, OpenVINO or PyTorch) and classifies prepared views."""

    def __init__(self, plan: Plan) -> None:
        super().__init__()
        self.plan = plan
        if plan.engine == "torch":
            from inference.backends.torch import TorchBackend, load_modules

            backend = TorchBackend(load_modules(plan.models), device=plan.device)
        elif plan.engine == "openvino":
            from inference.backends.openvino import OpenVinoBackend

            backend = OpenVinoBackend(plan.models, plan.threads, plan.precision)
        else:
            from inference.backends.onnxruntime import OnnxRuntimeBackend

            backend = OnnxRuntimeBackend(plan.models, plan.threads)
        self.classifier = Classifier(backend, plan.models)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        async def line(path: str, views: bytes, error: str) -> str:
            if error:
                return error
            result = await self.classifier.classify_views(pickle.loads(views), self.plan.options)
            return json.dumps(result_record(path, result), ensure_ascii=False)

        items = zip(batch["path"], batch["views"], batch["error"], strict=True)
        lines = self.gather([line(str(p), v, e) for p, v, e in items])
        return {"path": batch["path"], "line": np.array(lines, dtype=object)}


class TritonActor(_Actor):
    """Sends each file's bytes to Triton's ``classify`` model at ``plan.url``."""

    def __init__(self, plan: Plan) -> None:
        super().__init__()
        from inference.backends.triton import TritonBackend
        from inference.remote import RemoteClassifier

        self.plan = plan
        backend = TritonBackend(plan.url, plan.models, pipeline=True)
        self.classifier = RemoteClassifier(backend, plan.models)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from inference.backends.triton import TritonError

        async def line(path: str, data: bytes) -> str:
            for attempt in range(self.plan.retries + 1):
                try:
                    result = await self.classifier.classify_file(data, self.plan.options)
                    return json.dumps(result_record(path, result), ensure_ascii=False)
                except (ImageError, TritonError) as exc:
                    return error_line(path, str(exc))
                except BackendUnavailable:
                    if attempt == self.plan.retries:
                        raise  # the job stops; --resume finishes it
                    await asyncio.sleep(min(30.0, 0.5 * 2**attempt))
            raise AssertionError("unreachable")

        items = zip(batch["path"], batch["bytes"], strict=True)
        lines = self.gather([line(self.plan.record_path(p), bytes(d)) for p, d in items])
        return {"path": batch["path"], "line": np.array(lines, dtype=object)}


def _json_lines_datasink(folder: str):
    """A Ray datasink writing each block's ``line`` column as one JSON Lines part file."""
    from ray.data.datasource import BlockBasedFileDatasink

    class JsonLinesDatasink(BlockBasedFileDatasink):
        def __init__(self) -> None:
            super().__init__(folder, file_format=PART_SUFFIX.lstrip("."))

        def write_block_to_file(self, block, file) -> None:
            lines = block.to_arrow().column("line").to_pylist()
            file.write("".join(f"{line}\n" for line in lines).encode())

    return JsonLinesDatasink()


# --- the driver -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m clients.ray_batch",
        description="Dense multi-scale classification of many files on Ray Data: JSON Lines "
        "part files, one line per file, resumable.",
    )
    parser.add_argument(
        "inputs", nargs="*", help="image files, folders (walked), or URIs (s3://, gs://, ...)"
    )
    parser.add_argument("--list", type=Path, dest="list_file", help="file of paths or URIs")
    parser.add_argument("--out", required=True, help="folder (or URI) for the part files")
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="onnxruntime",
        help="onnxruntime, openvino or torch in the actors, or triton: the files to Triton's "
        "classify (default: onnxruntime)",
    )
    parser.add_argument(
        "--url", default="127.0.0.1:8001", help="Triton's gRPC host:port (default: %(default)s)"
    )
    parser.add_argument(
        "--repository",
        type=Path,
        default=Path("model_repository"),
        help="model repository of the in-process engines, a path every node sees (default: "
        "%(default)s; triton reads the models from Triton)",
    )
    parser.add_argument("--models", help="comma-separated models to fuse (default: all)")
    parser.add_argument(
        "--scales", help="comma-separated scales Q (default: each model's serving scales)"
    )
    parser.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the horizontal flips (default: on)",
    )
    parser.add_argument(
        "--top-k", type=int, default=5, help="classes per answer (default: %(default)s)"
    )
    parser.add_argument(
        "--actors", type=int, default=1, help="engine actors, one model load each (default: 1)"
    )
    parser.add_argument(
        "--gpus-per-actor", type=float, default=0, help="GPUs each actor holds (default: 0)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=16, help="files per task and actor call (default: 16)"
    )
    parser.add_argument(
        "--threads", type=int, help="ONNX Runtime threads per actor (default: the actor's cores)"
    )
    parser.add_argument(
        "--device", default="auto", help="torch engine: auto, cpu, cuda or cuda:N (default: auto)"
    )
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="openvino engine: auto is bf16 where the CPU computes it natively (default: auto)",
    )
    parser.add_argument(
        "--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)"
    )
    parser.add_argument("--cpus", type=int, help="CPUs of a local Ray (default: all)")
    parser.add_argument("--resume", action="store_true", help="skip files already written")
    parser.add_argument("--overwrite", action="store_true", help="empty --out first")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Ray's progress bars (default: when stderr is a terminal)",
    )
    return parser.parse_args(argv)


def plan_job(args: argparse.Namespace, paths: Sequence[str]) -> Plan:
    """The models and the resolved options, checked before Ray starts."""
    if args.actors < 1 or args.batch_size < 1:
        raise UsageError("--actors and --batch-size must be at least 1")
    try:
        scales = parse_scales(args.scales) if args.scales else None
        names = list(parse_model_names(args.models)) if args.models else None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.engine == "triton":
        models = asyncio.run(_triton_models(args.url, names))
    else:
        # Absolute: the actors open the graphs from their own working directories.
        models = read_repository(args.repository.resolve(), names)
    options = Classifier(None, models).resolve(
        ClassifyOptions(scales=scales, flip=args.flip, top_k=args.top_k)
    )
    prefix = uri_prefix(paths[0]) if paths and is_uri(paths[0]) else ""
    return Plan(
        models,
        options,
        args.engine,
        args.url,
        args.threads,
        args.device,
        precision=args.precision,
        prefix=prefix,
    )


async def _triton_models(url: str, names: list[str] | None) -> dict[str, ModelEntry]:
    from inference.backends.triton import TritonBackend

    backend = TritonBackend(url)
    try:
        return await backend.served_models(names)
    finally:
        await backend.close()


def run_job(args: argparse.Namespace, plan: Plan, todo: list[str], output: Output) -> None:
    """The Ray Data pipeline: read, (prepare,) classify, write part files."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address=args.address,
            num_cpus=args.cpus if not (args.address or os.environ.get("RAY_ADDRESS")) else None,
            include_dashboard=False,
            logging_level="WARNING",
        )
    print(f"Ray ready: {ray.cluster_resources().get('CPU', 0):g} CPUs", file=sys.stderr, flush=True)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = (
        sys.stderr.isatty() if args.progress is None else bool(args.progress)
    )
    cpus = ray.cluster_resources().get("CPU", 0)
    if plan.engine != "triton" and args.actors >= cpus:
        raise UsageError(
            f"--actors {args.actors} would hold all {cpus:g} CPUs of the Ray cluster, leaving "
            "none to read files and decode them; use fewer actors or more CPUs (--cpus)"
        )
    pool = ray.data.ActorPoolStrategy(size=args.actors)
    files = ray.data.read_binary_files(todo, include_paths=True)
    if plan.engine == "triton":
        lines = files.map_batches(
            TritonActor,
            fn_constructor_kwargs={"plan": plan},
            batch_size=args.batch_size,
            compute=pool,
            # They wait on Triton: a whole CPU each would starve the read and write tasks.
            num_cpus=TRITON_ACTOR_CPUS,
        )
    else:
        views = files.map_batches(
            prepare_views, fn_kwargs={"plan": plan}, batch_size=args.batch_size
        )
        lines = views.map_batches(
            EngineActor,
            fn_constructor_kwargs={"plan": plan},
            batch_size=args.batch_size,
            compute=pool,
            num_gpus=args.gpus_per_actor or None,
        )
    lines.write_datasink(_json_lines_datasink(output.uri))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.inputs and args.list_file is None:
        print("error: name image files, folders or URIs, or pass --list FILE", file=sys.stderr)
        return EXIT_USAGE
    started = time.perf_counter()
    try:
        if args.resume and args.overwrite:
            raise UsageError("--resume and --overwrite contradict each other; choose one")
        paths = list_inputs(args.inputs, args.list_file)
        output = Output(args.out)
        if args.overwrite:
            for part in output.parts():
                output.filesystem.delete_file(part)
        done = output.done() if args.resume else set()
        if output.parts() and not args.resume:
            raise UsageError(
                f"{args.out} already holds part files; pass --resume to finish that job, or "
                "--overwrite to start again"
            )
        plan = plan_job(args, paths)
    except (UsageError, OptionError, RepositoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BackendUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    todo = [p for p in paths if p not in done]
    missing = [p for p in todo if not is_uri(p) and not os.path.isfile(p)]
    if missing:  # Ray would fail the whole read on them: an error line each, as grpc_batch writes
        output.write_lines(
            [error_line(p, "cannot read the file: No such file or directory") for p in missing]
        )
        todo = [p for p in todo if p not in set(missing)]
    print(
        f"{len(paths)} files, {len(paths) - len(todo) - len(missing)} already done, "
        f"{len(todo)} to classify with {', '.join(plan.options.models)} at "
        f"Q={list(plan.options.scales)} on {plan.engine} ({args.actors} actor(s)) into {output.uri}",
        file=sys.stderr,
        flush=True,
    )
    if todo:
        try:
            run_job(args, plan, todo, output)
        except UsageError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
    print(
        f"done in {time.perf_counter() - started:.1f} s: {len(output.done())} files in "
        f"{len(output.parts())} part files under {output.uri}",
        file=sys.stderr,
    )
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
