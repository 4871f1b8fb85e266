"""Decoding in Triton's ``classify`` against decoding in the client, one run, one Triton.

    .venv/bin/python -m bench.triton_classify                  # small m16 + m19, 24 images
    .venv/bin/python -m bench.triton_classify --images 8       # quicker
    .venv/bin/python -m bench.triton_classify --models full    # full-size VGG-16, random weights

Against the real local tritonserver (``tritonlocal``), over the same 640x480 JPEGs (quality 90),
Q = 256,384,512 with flips, every served classifier fused:

1. ``clients/grpc_batch.py`` as a subprocess over a folder of the images, ``--decode server``
   (the file's bytes to ``classify``) then ``--decode local`` (decoded and rescaled in the
   client, uint8 views to each classifier): images/s from the client's "to classify" line to
   its exit (the job's wall time, start-up included, beside it). Bytes per image over the same
   window: the payload handed to gRPC (the file, or the views' ``nbytes``); what crossed the
   client's TCP connections each way (the client reaches Triton through a counting relay in
   this process); and loopback traffic (``lo`` in /proc/net/dev: every byte twice through the
   relay, plus every other process on this machine, so only a cross-check).
2. The front end's ``--backend triton``, one image at a time after a warm-up image: before,
   ``Classifier(TritonBackend(...))`` (decode here, one gRPC call per (model, Q)); after,
   ``RemoteClassifier`` (one ``classify`` call); both as ``server/pipeline.py`` calls them,
   minus HTTP; then ``POST /v1/classify`` on ``python -m server --backend triton`` (after).

No two paths run at the same time. Prints one markdown table, the machine and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.report import load_average, machine, percentile
from inference import Classifier, ClassifyOptions, rescaled_size
from inference.backends.triton import TritonBackend
from inference.remote import RemoteClassifier
from inference.repository import ModelEntry
from testkit import REPOSITORY_ROOT
from testkit.images import jpeg
from testkit.models import export_random_model, write_small_repository
from testkit.processes import ServerProcess, local_triton

SCALES = (256, 384, 512)
WIDTH, HEIGHT, QUALITY = 640, 480, 90
# What --models names: the paper's two networks at 1/8 width (testkit.models.SMALL), or one
# full-size VGG-16 with random weights.
MODEL_SETS = ("small", "full")
DEFAULT_IMAGES = {"small": 24, "full": 6}
LINK_BITS_PER_S = 10e9  # the network a multi-machine run would share
BACKGROUND_SAMPLE_S = 3.0


def loopback_bytes() -> int:
    """Bytes sent over ``lo`` since boot (its tx counter; rx counts the same packets again)."""
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, counters = line.partition(":")
            if name.strip() == "lo":
                return int(counters.split()[8])
    raise RuntimeError("no lo interface in /proc/net/dev: loopback traffic cannot be measured")


class CountingRelay:
    """A TCP relay from a free loopback port to ``target`` (``host:port``), counting the bytes
    that cross it each way; it runs its own event loop in a thread. A context manager."""

    def __init__(self, target: str) -> None:
        self.host, port = target.rsplit(":", 1)
        self.port = int(port)
        self.sent = 0  # client -> target
        self.received = 0  # target -> client
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self.url = ""

    def __enter__(self) -> CountingRelay:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._connect, "127.0.0.1", 0), self._loop
        ).result()
        self.url = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    def __exit__(self, *_exc) -> None:
        if self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()

    def counts(self) -> tuple[int, int]:
        """(bytes sent to the target, bytes received from it) so far."""
        return self.sent, self.received

    async def _connect(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        target_in, target_out = await asyncio.open_connection(self.host, self.port)

        async def pump(
            source: asyncio.StreamReader, sink: asyncio.StreamWriter, upstream: bool
        ) -> None:
            while data := await source.read(1 << 18):
                if upstream:
                    self.sent += len(data)
                else:
                    self.received += len(data)
                sink.write(data)
                await sink.drain()
            if sink.can_write_eof():
                sink.write_eof()

        try:
            await asyncio.gather(
                pump(client_in, target_out, True), pump(target_in, client_out, False)
            )
        except ConnectionError:
            pass  # one side went away; the other is closed below
        finally:
            client_out.close()
            target_out.close()


@dataclass
class Row:
    """One path's figures; ``None`` where a figure does not apply to it."""

    path: str
    images: int
    images_per_s: float | None = None
    job_s: float | None = None
    latencies: list[float] = field(default_factory=list)
    payload_bytes: float | None = None  # per image, what the client hands to gRPC
    sent_bytes: float | None = None  # per image, client -> Triton on the client's connections
    received_bytes: float | None = None  # per image, Triton -> client
    loopback_bytes: float | None = None  # per image, lo's tx counter (machine-wide)

    def p(self, q: float) -> float | None:
        """The ``q``-th percentile latency in ms, if latencies were measured."""
        return percentile(self.latencies, q) * 1e3 if self.latencies else None


def write_repository(kind: str, workdir: Path) -> Path:
    """The model repository to serve: exported afresh (small), or kept between runs (full)."""
    if kind == "small":
        repo = workdir / "small" / "repo"
        write_small_repository(repo, scales=SCALES)
        return repo
    return export_random_model(workdir / "full" / "repo", "vgg16", "vgg16", 0, None, SCALES)


def view_bytes(models: Sequence[str], flip: bool = True) -> int:
    """The uint8 views one image sends with local decoding: per model, every Q's rescaled image
    (and its flip), 3 bytes a pixel, as ``inference.protocol.dense_batch`` makes them."""
    per_model = 0
    for q in SCALES:
        width, height = rescaled_size(WIDTH, HEIGHT, q)
        per_model += 3 * width * height * (2 if flip else 1)
    return per_model * len(models)


# --- the batch client ------------------------------------------------------------------------


@dataclass
class BatchRun:
    """What one run of the batch client measured (bytes over the classifying window)."""

    classifying_s: float
    job_s: float
    sent: int
    received: int
    loopback: int


def run_batch_client(
    folder: Path,
    relay: CountingRelay,
    decode: str,
    models: Sequence[str],
    out: Path,
    concurrency: int,
) -> BatchRun:
    """Run ``clients/grpc_batch.py`` over ``folder`` through ``relay`` to Triton.

    Classifying time and bytes run from the client's "to classify" line (models read from
    Triton, options checked) to its exit; the job's time from launch to exit.
    """
    command = [
        sys.executable,
        str(REPOSITORY_ROOT / "clients" / "grpc_batch.py"),
        str(folder),
        "--url",
        relay.url,
        "--decode",
        decode,
        "--models",
        ",".join(models),
        "--scales",
        ",".join(map(str, SCALES)),
        "--concurrency",
        str(concurrency),
        "--out",
        str(out),
        "--overwrite",
        "--no-progress",
    ]
    log: list[str] = []
    launched = time.perf_counter()
    start = None  # (time, relay counts, lo counter) at the "to classify" line
    with subprocess.Popen(
        command,
        cwd=REPOSITORY_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    ) as client:
        assert client.stderr is not None
        for line in client.stderr:
            log.append(line)
            if " to classify with " in line:
                start = (time.perf_counter(), relay.counts(), loopback_bytes())
        code = client.wait()
    finished, (sent, received), loopback = time.perf_counter(), relay.counts(), loopback_bytes()
    errors = out.with_name(out.name.removesuffix(".jsonl") + ".errors.jsonl")
    failed = errors.read_text().strip() if errors.exists() else ""
    if code != 0 or start is None or failed:
        raise RuntimeError(
            f"grpc_batch --decode {decode} failed (exit {code}):\n{''.join(log[-20:])}{failed}"
        )
    started, (sent_before, received_before), loopback_before = start
    return BatchRun(
        classifying_s=finished - started,
        job_s=finished - launched,
        sent=sent - sent_before,
        received=received - received_before,
        loopback=loopback - loopback_before,
    )


def largest_difference(first: Path, second: Path) -> float:
    """The largest difference of a fused top-k probability between two result files, or inf
    where an image's top-k classes differ."""

    def read(path: Path) -> dict[str, list[dict]]:
        lines = path.read_text().splitlines()
        return {r["path"]: r["predictions"] for r in map(json.loads, lines)}

    a, b = read(first), read(second)
    if a.keys() != b.keys():
        return float("inf")
    largest = 0.0
    for key, mine in a.items():
        theirs = b[key]
        if [p["index"] for p in mine] != [p["index"] for p in theirs]:
            return float("inf")
        for x, y in zip(mine, theirs, strict=True):
            largest = max(largest, abs(x["probability"] - y["probability"]))
    return largest


# --- the front end, in process and over HTTP -------------------------------------------------


async def one_at_a_time(
    call: Callable[[bytes], Awaitable[object]], images: list[bytes]
) -> list[float]:
    """Latencies of ``call`` on each image in turn, after a warm-up image."""

    async def timed(data: bytes) -> float:
        start = time.perf_counter()
        await call(data)
        return time.perf_counter() - start

    await timed(images[0])  # first-run allocations, the channel's connection
    return [await timed(data) for data in images]


def in_process(
    url: str, models: dict[str, ModelEntry], images: list[bytes], remote: bool
) -> list[float]:
    """The front end's classifier without HTTP: before (decode here) or after (``classify``)."""
    options = ClassifyOptions(scales=SCALES, models=tuple(models))

    async def run() -> list[float]:
        backend = TritonBackend(url, models, pipeline=remote)
        kind = RemoteClassifier if remote else Classifier
        classifier = kind(backend, models)
        try:
            return await one_at_a_time(lambda data: classifier.classify_file(data, options), images)
        finally:
            await backend.close()

    return asyncio.run(run())


def over_http(url: str, models: Sequence[str], images: list[bytes]) -> list[float]:
    """``POST /v1/classify`` on ``python -m server --backend triton``, one request at a time."""
    params = {"scales": ",".join(map(str, SCALES)), "models": ",".join(models)}

    async def run(front_url: str) -> list[float]:
        async with httpx.AsyncClient(base_url=front_url, timeout=300, trust_env=False) as http:

            async def call(data: bytes) -> None:
                files = {"file": ("photo.jpg", data, "image/jpeg")}
                response = await http.post("/v1/classify", params=params, files=files)
                response.raise_for_status()

            return await one_at_a_time(call, images)

    with ServerProcess("--backend", "triton", "--triton-url", url, health_path="/readyz") as front:
        return asyncio.run(run(front.url))


# --- the run ---------------------------------------------------------------------------------


def write_images(folder: Path, count: int) -> list[bytes]:
    """``count`` photo-like JPEGs, also written into ``folder`` (emptied of older ones)."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.jpg"):
        old.unlink()
    images = [jpeg(WIDTH, HEIGHT, seed=i, quality=QUALITY) for i in range(count)]
    for index, data in enumerate(images):
        (folder / f"photo-{index:03d}.jpg").write_bytes(data)
    return images


def measure(args: argparse.Namespace) -> tuple[list[Row], dict]:
    """Every path in turn against one Triton; the rows and what the notes below the table say."""
    repo = write_repository(args.models, args.workdir)
    folder = args.workdir / "images"
    images = write_images(folder, args.images)
    count = len(images)
    file_bytes = sum(map(len, images)) / count
    notes: dict = {"file_bytes": file_bytes, "load_before": load_average()}
    rows = []
    with local_triton(repo) as triton:
        url = triton.grpc_url
        models = asyncio.run(served(url))
        names = tuple(models)
        notes["models"] = names

        sent_before = loopback_bytes()
        time.sleep(BACKGROUND_SAMPLE_S)
        notes["background_bytes_per_s"] = (loopback_bytes() - sent_before) / BACKGROUND_SAMPLE_S

        # Warm Triton's side of both paths (first runs of each model at these shapes).
        for remote in (False, True):
            in_process(url, models, images[:1], remote)

        results = {}
        with CountingRelay(url) as relay:
            for decode, payload in (("server", file_bytes), ("local", view_bytes(names))):
                results[decode] = args.workdir / f"results-{decode}.jsonl"
                run = run_batch_client(
                    folder, relay, decode, names, results[decode], args.concurrency
                )
                rows.append(
                    Row(
                        f"grpc_batch --decode {decode}",
                        count,
                        images_per_s=count / run.classifying_s,
                        job_s=run.job_s,
                        payload_bytes=payload,
                        sent_bytes=run.sent / count,
                        received_bytes=run.received / count,
                        loopback_bytes=run.loopback / count,
                    )
                )
        notes["difference"] = largest_difference(results["server"], results["local"])

        before = in_process(url, models, images, remote=False)
        rows.append(
            Row(
                "front end before (Classifier: decode here, a call per model and Q)",
                count,
                latencies=before,
                payload_bytes=view_bytes(names),
            )
        )
        after = in_process(url, models, images, remote=True)
        rows.append(
            Row(
                "front end after (RemoteClassifier: one classify call)",
                count,
                latencies=after,
                payload_bytes=file_bytes,
            )
        )
        rows.append(
            Row(
                "front end after, over HTTP",
                count,
                latencies=over_http(url, names, images),
                payload_bytes=file_bytes,
            )
        )
    notes["load_after"] = load_average()
    return rows, notes


async def served(url: str) -> dict[str, ModelEntry]:
    """The classifiers Triton serves, read from it as the clients read them."""
    backend = TritonBackend(url)
    try:
        await backend.check(pipeline=True)
        return await backend.served_models()
    finally:
        await backend.close()


def cell(value: float | None, form: str) -> str:
    """``value`` formatted, or ``-`` where it was not measured."""
    return "-" if value is None else format(value, form)


def report(rows: list[Row], notes: dict, args: argparse.Namespace) -> str:
    """The markdown table, then the machine and the ratios."""
    lines = [
        "| path | images | images/s | job s | p50 ms | p95 ms | payload to gRPC / image "
        "| client to Triton / image | Triton to client / image |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row.path} | {row.images} | {cell(row.images_per_s, '.2f')} "
            f"| {cell(row.job_s, '.1f')} | {cell(row.p(50), '.0f')} | {cell(row.p(95), '.0f')} "
            f"| {cell(row.payload_bytes, ',.0f')} | {cell(row.sent_bytes, ',.0f')} "
            f"| {cell(row.received_bytes, ',.0f')} |"
        )
    server, local, before, after, http = rows
    link = LINK_BITS_PER_S / 8
    lines += [
        "",
        f"machine: {machine()}; load {notes['load_before']} before, {notes['load_after']} after",
        f"models {','.join(notes['models'])} ({args.models}) fused, Q = "
        f"{','.join(map(str, SCALES))} with flips; {WIDTH}x{HEIGHT} JPEGs at quality "
        f"{QUALITY}, {notes['file_bytes']:,.0f} bytes on average; grpc_batch with "
        f"{args.concurrency} images in flight",
        "bytes are per image, over grpc_batch's classifying window; loopback (lo) over the same "
        f"window: server decoding {server.loopback_bytes:,.0f}, local "
        f"{local.loopback_bytes:,.0f} bytes per image (each byte crosses lo twice through the "
        "relay, and other processes count too: "
        f"{notes['background_bytes_per_s']:,.0f} bytes/s over {BACKGROUND_SAMPLE_S:g} s idle "
        "before the runs)",
        f"server vs local decoding, largest difference of a fused top-5 probability: "
        f"{notes['difference']:.2e}",
        "",
        "ratios",
        f"- batch client images/s, server / local decoding: "
        f"{server.images_per_s / local.images_per_s:.2f}",
        f"- bytes per image, local / server decoding: payload "
        f"{local.payload_bytes / server.payload_bytes:.1f}, client to Triton "
        f"{local.sent_bytes / server.sent_bytes:.1f}",
        f"- images/s one client's {LINK_BITS_PER_S / 1e9:g} Gb/s link carries (client to Triton "
        f"bytes): server decoding {link / server.sent_bytes:,.0f}, local "
        f"{link / local.sent_bytes:,.0f}",
        f"- front end latency, after / before: p50 {after.p(50) / before.p(50):.2f}, "
        f"p95 {after.p(95) / before.p(95):.2f}",
        f"- front end p50, HTTP / in process (after): {http.p(50) / after.p(50):.2f}",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        choices=MODEL_SETS,
        default="small",
        help="small: m16 + m19 at 1/8 width; full: full-size VGG-16 with random weights",
    )
    parser.add_argument("--images", type=int, default=0, help="JPEGs (default: 24 small, 6 full)")
    parser.add_argument(
        "--concurrency", type=int, default=8, help="grpc_batch's images in flight (its default)"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "vggserve-bench-triton-classify",
    )
    args = parser.parse_args()
    args.images = args.images or DEFAULT_IMAGES[args.models]
    if args.images < 1:
        parser.error("--images must be at least 1")
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows, notes = measure(args)
    print()
    print(report(rows, notes, args))


if __name__ == "__main__":
    main()
