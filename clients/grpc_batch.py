"""Classify a large set of images through Triton over gRPC, resumably, one JSON line per image.

    python clients/grpc_batch.py photos/ --url 127.0.0.1:8001 --models vgg16,vgg19 \\
        --scales 256,384,512 --out results.jsonl
    python clients/grpc_batch.py --list files.txt --out results.jsonl --resume --shard 0/4

Only Triton's address is needed: the models' labels, input limits and serving scales are read
from Triton. Each file's bytes go to Triton's ``classify`` model, which decodes, rescales and
fuses with ``inference/`` (the HTTP front end's code); ``--decode local`` decodes and rescales
here instead and calls each classifier (megabytes of views per image instead of the file).
Each line has the HTTP API's format: ``{"path", "predictions": [{"index", "label",
"probability"}], "per_model", "scales", "models"}``. Unreadable images go to the errors file
(``<out>.errors.jsonl``: ``{"path", "error"}``). Every line is flushed and fsynced before the
next, so ``--resume`` after a crash, a kill or a Triton outage finishes the job with every input
in exactly one of the two files.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import os
import random
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from inference import (
    Classification,
    Classifier,
    ClassifyOptions,
    ImageError,
    OptionError,
    RepositoryError,
    read_repository,
)
from inference.backends.base import BackendUnavailable
from inference.backends.triton import LOOPBACK, TritonBackend, TritonError
from inference.images import IMAGE_SUFFIXES
from inference.protocol import parse_scales
from inference.remote import RemoteClassifier
from inference.repository import parse_model_names

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 75  # 75: EX_TEMPFAIL, rerun later


class UsageError(ValueError):
    """A command line that cannot work; the message says how to fix it."""


# --- the input list --------------------------------------------------------------------------


def named_inputs(inputs: Iterable[str], list_file: Path | None = None) -> list[str]:
    """The inputs named on the command line, then those of ``list_file`` (one a line; blank
    lines and ``#`` comments skipped)."""
    names = list(inputs)
    if list_file is not None:
        try:
            lines = Path(list_file).read_text().splitlines()
        except OSError as exc:
            raise UsageError(f"cannot read --list {list_file}: {exc.strerror or exc}") from exc
        names += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    return names


def discover(inputs: Iterable[str], list_file: Path | None = None) -> list[str]:
    """Every image path named on the command line, sorted, each once.

    Folders are walked recursively for files with an image suffix; files named explicitly (or
    in ``list_file``, one a line) are taken whatever their suffix, so a bad one is reported.
    """
    found: set[str] = set()
    for name in named_inputs(inputs, list_file):
        path = Path(name)
        if path.is_dir():
            for root, _dirs, files in os.walk(path):
                found.update(
                    str(Path(root) / f) for f in files if Path(f).suffix.lower() in IMAGE_SUFFIXES
                )
        else:
            found.add(name)  # missing or unreadable: it will be reported in the errors file
    return sorted(found)


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` with ``0 <= i < n``."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise UsageError(f"--shard {text}: need 0 <= i < n (shards are numbered from 0)")
    return index, count


def in_shard(path: str, index: int, count: int) -> bool:
    """Whether ``path`` belongs to shard ``index`` of ``count`` (a stable hash of the path).

    A hash, not a position in the list, so a file added to the folder does not move the others
    to another machine's shard.
    """
    digest = hashlib.sha1(path.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % count == index


# --- durable JSON lines ----------------------------------------------------------------------


def read_done(path: Path) -> set[str]:
    """Paths recorded in a JSON-lines file; a torn last line (a crash mid-write) is cut off.

    The file is truncated to its last complete line, so appending continues cleanly.
    """
    if not path.exists():
        return set()
    data = path.read_bytes()
    done: set[str] = set()
    good = 0  # bytes of complete, valid lines
    for line in data.splitlines(keepends=True):
        try:
            if not line.endswith(b"\n"):
                raise ValueError("no newline")
            done.add(json.loads(line)["path"])
        except (ValueError, KeyError, TypeError):
            if good + len(line) < len(data):
                raise UsageError(
                    f"{path} has a corrupt line in the middle (byte {good}); it was not written "
                    "by this client, or was edited; fix or remove it"
                ) from None
            break  # the torn tail
        good += len(line)
    if good < len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
            os.fsync(f.fileno())
    return done


class JsonLines:
    """Appends JSON lines, each one flushed and fsynced before ``write`` returns."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def result_record(path: str, result: Classification) -> dict:
    """One output line, in the HTTP API's format."""

    def predictions(items) -> list[dict]:
        return [dataclasses.asdict(p) for p in items]

    return {
        "path": path,
        "predictions": predictions(result.predictions),
        "per_model": {name: predictions(p) for name, p in result.per_model.items()},
        "scales": list(result.scales),
        "models": list(result.models),
    }


# --- the job ---------------------------------------------------------------------------------


@dataclass
class Retry:
    """How long to keep trying while Triton is unavailable: backoff doubles up to a cap."""

    retries: int = 6
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0


@dataclass
class Job:
    classifier: Classifier  # a RemoteClassifier sends the files to Triton's classify
    options: ClassifyOptions
    results: JsonLines
    errors: JsonLines
    concurrency: int = 8
    retry: Retry = dataclasses.field(default_factory=Retry)
    progress: bool | None = None  # None: only on a terminal


@dataclass
class Summary:
    classified: int = 0
    failed: int = 0
    unavailable: str | None = None  # why the job stopped early, if it did


async def with_retries(retry: Retry, call, what: str):
    """``await call()``, retried with exponential backoff (and jitter) while Triton is unavailable."""
    for attempt in range(retry.retries + 1):
        try:
            return await call()
        except BackendUnavailable as exc:
            if attempt == retry.retries:
                raise
            delay = min(retry.max_backoff_s, retry.backoff_s * 2**attempt)
            delay *= random.uniform(0.8, 1.2)
            tqdm.write(f"{what}: {exc}; retrying in {delay:.1f} s", file=sys.stderr)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


async def classify_path(job: Job, path: str) -> tuple[bool, dict]:
    """(True, result line) or (False, error line) for one image; raises if Triton stays down."""
    try:
        data = await asyncio.to_thread(Path(path).read_bytes)
        result = await with_retries(
            job.retry, lambda: job.classifier.classify_file(data, job.options), path
        )
    except OSError as exc:
        return False, {"path": path, "error": f"cannot read the file: {exc.strerror or exc}"}
    except (ImageError, TritonError) as exc:
        return False, {"path": path, "error": str(exc)}
    return True, result_record(path, result)


async def run(job: Job, paths: list[str]) -> Summary:
    """Classify ``paths`` with ``job.concurrency`` images in flight; stop early if Triton is down."""
    summary = Summary()
    pending = iter(paths)
    quiet = job.progress is False or (job.progress is None and not sys.stderr.isatty())
    bar = tqdm(total=len(paths), unit="img", disable=quiet)

    async def worker() -> None:
        for path in pending:  # a shared iterator: each path goes to exactly one worker
            if summary.unavailable:
                return
            try:
                ok, record = await classify_path(job, path)
            except BackendUnavailable as exc:
                summary.unavailable = str(exc)
                return
            (job.results if ok else job.errors).write(record)
            if ok:
                summary.classified += 1
            else:
                summary.failed += 1
            bar.update()

    try:
        await asyncio.gather(*(worker() for _ in range(job.concurrency)))
    finally:
        bar.close()
    return summary


# --- command line ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python clients/grpc_batch.py",
        description="Dense multi-scale classification of many images through Triton (gRPC), "
        "one JSON line per image, resumable.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("inputs", nargs="*", help="image files and folders (walked recursively)")
    parser.add_argument("--list", type=Path, dest="list_file", help="file of image paths")
    parser.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC host:port")
    parser.add_argument(
        "--repository",
        type=Path,
        help="read labels, input limits and serving scales from this copy of the repository "
        "Triton serves (default: from Triton itself)",
    )
    parser.add_argument(
        "--decode",
        choices=("server", "local"),
        default="server",
        help="server: send each file's bytes to Triton's classify model; local: decode and "
        "rescale here, send the uint8 views to each classifier",
    )
    parser.add_argument("--models", help="comma-separated models to fuse (default: all)")
    parser.add_argument(
        "--scales",
        default=None,
        help="comma-separated scales Q (shorter side) for every model (default: each model's "
        "serving scales, from its config.pbtxt)",
    )
    parser.add_argument("--no-flip", action="store_true", help="skip the horizontal flips")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True, help="results, JSON lines")
    parser.add_argument("--errors", type=Path, help="errors file (default: <out>.errors.jsonl)")
    parser.add_argument(
        "--resume", action="store_true", help="skip images already in the results or errors file"
    )
    parser.add_argument("--overwrite", action="store_true", help="start both files afresh")
    parser.add_argument("--shard", default="0/1", help="i/n: only this job's part (0 <= i < n)")
    parser.add_argument("--concurrency", type=int, default=8, help="images in flight")
    parser.add_argument(
        "--retries",
        type=int,
        default=6,
        help="retries of an image while Triton is unavailable (backoff doubles from 0.5 s)",
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per gRPC call")
    parser.add_argument(
        "--shm",
        action="store_true",
        help="with --decode local: send the views through system shared memory (Triton on "
        "this host)",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: when stderr is a terminal)",
    )
    return parser.parse_args(argv)


def errors_path(out: Path, errors: Path | None) -> Path:
    return errors or out.with_name(out.name.removesuffix(".jsonl") + ".errors.jsonl")


def prepare_files(out: Path, errors: Path, resume: bool, overwrite: bool) -> set[str]:
    """Paths already done (with ``--resume``); refuses to mix a new job into old files."""
    if resume and overwrite:
        raise UsageError("--resume and --overwrite contradict each other; choose one")
    existing = [p for p in (out, errors) if p.exists() and p.stat().st_size > 0]
    if overwrite:
        for path in existing:
            path.unlink()
        return set()
    if existing and not resume:
        raise UsageError(
            f"{' and '.join(map(str, existing))} already exist; pass --resume to finish that "
            "job, or --overwrite to start again"
        )
    return read_done(out) | read_done(errors) if resume else set()


async def main_async(args: argparse.Namespace) -> int:
    if args.concurrency < 1:
        raise UsageError("--concurrency must be at least 1")
    shard_index, shard_count = parse_shard(args.shard)
    try:
        scales = parse_scales(args.scales) if args.scales else None
    except ValueError as exc:
        raise UsageError(f"--scales: {exc}") from None
    try:
        names = list(parse_model_names(args.models)) if args.models else None
    except ValueError as exc:
        raise UsageError(f"--models: {exc}") from None
    if args.shm and args.url.rsplit(":", 1)[0] not in LOOPBACK:
        raise UsageError(f"--shm needs Triton on this machine, but --url is {args.url}")
    server_decode = args.decode == "server"
    if args.shm and server_decode:
        raise UsageError("--shm sends decoded views: use it with --decode local")
    paths = [
        p for p in discover(args.inputs, args.list_file) if in_shard(p, shard_index, shard_count)
    ]
    errors_file = errors_path(args.out, args.errors)
    done = prepare_files(args.out, errors_file, args.resume, args.overwrite)
    todo = [p for p in paths if p not in done]

    retry = Retry(retries=args.retries)
    models = read_repository(args.repository, names) if args.repository else None
    backend = TritonBackend(
        args.url, models, timeout_s=args.timeout, shared_memory=args.shm, pipeline=server_decode
    )
    try:
        if models is None:
            models = await with_retries(
                retry, lambda: backend.served_models(names), "reading the models from Triton"
            )
        kind = RemoteClassifier if server_decode else Classifier
        classifier = kind(backend, models)
        options = classifier.resolve(
            ClassifyOptions(scales=scales, flip=not args.no_flip, top_k=args.top_k)
        )
    except BackendUnavailable as exc:
        await backend.close()
        print(
            f"stopped early: {exc}\nrerun the same command with --resume once Triton is up; "
            "nothing done so far is lost",
            file=sys.stderr,
        )
        return EXIT_UNAVAILABLE
    except BaseException:
        await backend.close()
        raise
    print(
        f"{len(paths)} images in shard {args.shard}, {len(paths) - len(todo)} already done, "
        f"{len(todo)} to classify with {', '.join(options.models)} at Q={list(options.scales)} via "
        f"Triton {args.url} ({'its classify model' if server_decode else 'decoding here'})",
        file=sys.stderr,
        flush=True,
    )
    results, errors = JsonLines(args.out), JsonLines(errors_file)
    job = Job(classifier, options, results, errors, args.concurrency, retry, args.progress)
    try:
        if todo:
            await with_retries(
                retry,
                lambda: backend.check(options.models, pipeline=server_decode),
                "waiting for Triton",
            )
        summary = await run(job, todo)
    except BackendUnavailable as exc:
        summary = Summary(unavailable=str(exc))
    finally:
        results.close()
        errors.close()
        await backend.close()
    print(
        f"classified {summary.classified}, errors {summary.failed}; results in {args.out}, "
        f"errors in {errors_file}",
        file=sys.stderr,
    )
    if summary.unavailable:
        print(
            f"stopped early: {summary.unavailable}\nrerun the same command with --resume to "
            "finish; nothing done so far is lost",
            file=sys.stderr,
        )
        return EXIT_UNAVAILABLE
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.inputs and args.list_file is None:
        print("error: name image files or folders, or pass --list FILE", file=sys.stderr)
        return EXIT_USAGE
    try:
        return asyncio.run(main_async(args))
    except (UsageError, OptionError, RepositoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted; rerun with --resume to finish", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
