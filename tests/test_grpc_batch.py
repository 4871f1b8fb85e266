"""clients/grpc_batch.py end to end against the real tritonserver: results, errors, kills, resume."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from clients.grpc_batch import UsageError, in_shard, read_done
from clients.grpc_batch import main as grpc_batch_main
from inference import Classifier, ClassifyOptions, decode_image, read_repository
from inference.backends.onnxruntime import OnnxRuntimeBackend
from inference.images import ImageError
from inference.protocol import dense_batch
from testkit import REPOSITORY_ROOT as ROOT
from testkit.images import smooth_image
from testkit.ports import free_ports
from testkit.processes import start_triton
from testkit.tolerances import largest_score, posterior_bound

SCALES = "64,96,128"
IMAGES = 40
UNREADABLE = {
    "empty.png": "the file is empty",
    "truncated.jpg": "truncated",
    "text.png": "not an image",
}
KEYS = {"path", "predictions", "per_model", "scales", "models"}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """40 generated images of assorted sizes, modes and formats, 3 unreadable ones, a text file."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(2014)
    for i in range(IMAGES):
        width, height = (int(v) for v in rng.integers(64, 200, 2))
        image = smooth_image(width, height, seed=2014 + i)
        if i % 7 == 3:
            image = image.convert("L")
        elif i % 7 == 5:
            image = image.convert("RGBA")
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        suffix = (".jpg", ".png", ".webp")[i % 3] if image.mode != "RGBA" else ".png"
        image.save(sub / f"img{i:03d}{suffix}")
    (folder / "empty.png").write_bytes(b"")
    jpeg = (folder / "b" / "img000.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (folder / "text.png").write_text("this is not a picture")
    (folder / "notes.txt").write_text("not an image suffix: not an input")
    return folder


# The client runs where no model repository is in sight: all it needs is Triton's address.
ELSEWHERE = tempfile.gettempdir()


def run_client(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "clients" / "grpc_batch.py"), *args],
        cwd=ELSEWHERE,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_here(*args: str) -> subprocess.CompletedProcess:
    """The client's main() in this process, where killing it is not the point: its exit code
    and what it wrote to stderr."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = grpc_batch_main(list(args))
    return subprocess.CompletedProcess(["grpc_batch", *args], code, "", stderr.getvalue())


def start_client(*args: str, stderr: Path | None = None) -> subprocess.Popen:
    """The client as a process; its stderr piped, or written to the file ``stderr``."""
    with contextlib.ExitStack() as stack:
        error = stack.enter_context(open(stderr, "w")) if stderr else subprocess.PIPE
        return subprocess.Popen(
            [sys.executable, str(ROOT / "clients" / "grpc_batch.py"), *args],
            cwd=ELSEWHERE,
            stdout=subprocess.PIPE,
            stderr=error,
            text=True,
        )


# Waits below are for an event (lines written, an outage seen); their deadline only bounds a hang.
DEADLINE_S = 300


def wait_until(condition, client: subprocess.Popen, what: str) -> None:
    """Poll until ``condition()`` holds while ``client`` runs."""
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert client.poll() is None, f"the client finished before {what}"
        assert time.monotonic() < deadline, f"no {what} after {DEADLINE_S} s"
        time.sleep(0.01)


def load(path: Path) -> dict[str, dict]:
    """Records by path; fails on a duplicate or a torn line."""
    records: dict[str, dict] = {}
    if not path.exists():
        return records
    for line in path.read_text().splitlines():
        record = json.loads(line)
        assert record["path"] not in records, f"{record['path']} written twice"
        records[record["path"]] = record
    return records


def count_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.fixture(scope="module")
def tolerance(two_model_repository, image_folder) -> float:
    """How far two fp32 runs of the served graphs may differ in a posterior of these images
    (the same graphs, possibly batched otherwise by Triton: testkit.tolerances)."""
    repository, torch_models = two_model_repository
    views = []
    for path in sorted(image_folder.rglob("*")):
        try:
            image = decode_image(path.read_bytes())
        except (ImageError, OSError):
            continue  # the unreadable ones and the folders
        views += [dense_batch(image, int(q)) for q in SCALES.split(",")]
    graphs = [repository / name / "1" / "model.onnx" for name in torch_models]
    return posterior_bound(torch_models.values(), largest_score(graphs, views))


def assert_same_results(
    actual: dict[str, dict], expected: dict[str, dict], tolerance: float
) -> None:
    assert sorted(actual) == sorted(expected)
    for path, record in expected.items():
        got = actual[path]
        assert set(got) == KEYS
        assert (got["scales"], got["models"]) == (record["scales"], record["models"])
        pairs = [(got["predictions"], record["predictions"])]
        pairs += [(got["per_model"][m], record["per_model"][m]) for m in record["models"]]
        for mine, theirs in pairs:
            assert [p["index"] for p in mine] == [p["index"] for p in theirs], path
            assert [p["label"] for p in mine] == [p["label"] for p in theirs], path
            np.testing.assert_allclose(
                [p["probability"] for p in mine],
                [p["probability"] for p in theirs],
                rtol=0,
                atol=tolerance,
            )


def job_args(folder: Path, url: str, out: Path, *extra: str) -> list[str]:
    """The job's command line: Triton's address and no repository."""
    return [
        str(folder),
        "--url",
        url,
        "--models",
        "m16,m19",
        "--scales",
        SCALES,
        "--out",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="module")
def uninterrupted(triton_server, two_model_repository, image_folder, tmp_path_factory):
    """One plain run over the folder: (results, errors, stderr)."""
    repository, _ = two_model_repository
    out = tmp_path_factory.mktemp("full") / "results.jsonl"
    result = run_client(*job_args(image_folder, triton_server.grpc_url, out))
    assert result.returncode == 0, result.stderr
    return load(out), load(out.with_name("results.errors.jsonl")), result.stderr


def test_every_image_once_with_the_in_process_results(
    uninterrupted, image_folder, two_model_repository, tolerance
):
    results, errors, stderr = uninterrupted
    images = sorted(str(p) for p in image_folder.rglob("*") if p.suffix != ".txt" and p.is_file())
    assert len(images) == IMAGES + len(UNREADABLE)
    assert sorted([*results, *errors]) == images  # each exactly once (load() checks duplicates)
    assert sorted(Path(p).name for p in errors) == sorted(UNREADABLE)
    for path, record in errors.items():
        assert set(record) == {"path", "error"}
        assert UNREADABLE[Path(path).name] in record["error"]
    assert f"classified {IMAGES}, errors {len(UNREADABLE)}" in stderr

    # The same images through the in-process backend: the HTTP API's numbers.
    repository, _ = two_model_repository
    models = read_repository(repository)
    backend = OnnxRuntimeBackend(models, threads=1)
    classifier = Classifier(backend, models)
    options = ClassifyOptions(scales=tuple(int(q) for q in SCALES.split(",")))

    async def reference() -> dict[str, dict]:
        expected = {}
        for path in results:
            result = await classifier.classify(decode_image(Path(path).read_bytes()), options)
            expected[path] = {
                "path": path,
                "predictions": [vars(p) for p in result.predictions],
                "per_model": {m: [vars(p) for p in ps] for m, ps in result.per_model.items()},
                "scales": list(result.scales),
                "models": list(result.models),
            }
        await backend.close()
        return expected

    assert_same_results(results, asyncio.run(reference()), tolerance)


def test_killed_halfway_and_resumed_gives_the_uninterrupted_result_set(
    triton_server, two_model_repository, image_folder, uninterrupted, tolerance, tmp_path
):
    repository, _ = two_model_repository
    out = tmp_path / "results.jsonl"
    args = job_args(image_folder, triton_server.grpc_url, out, "--concurrency", "2")
    client = start_client(*args)
    half = (IMAGES + len(UNREADABLE)) // 2
    wait_until(lambda: count_lines(out) >= half, client, "half of the results")
    client.send_signal(signal.SIGKILL)
    client.wait()
    partial = count_lines(out) + count_lines(tmp_path / "results.errors.jsonl")
    assert partial < IMAGES + len(UNREADABLE)
    with open(out, "a") as f:  # as if killed in the middle of a write
        f.write('{"path": "' + str(image_folder / "b" / "img0"))

    resumed = run_client(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"{partial} already done" in resumed.stderr
    results, errors, _ = uninterrupted
    assert load(tmp_path / "results.errors.jsonl") == errors
    assert_same_results(load(out), results, tolerance)


def test_triton_killed_mid_run_the_job_still_completes(
    two_model_repository, image_folder, uninterrupted, tolerance, tmp_path
):
    repository, _ = two_model_repository
    server = start_triton(repository)
    out = tmp_path / "results.jsonl"
    stderr = tmp_path / "client.err"
    try:
        client = start_client(
            *job_args(image_folder, server.grpc_url, out, "--concurrency", "8"), stderr=stderr
        )
        wait_until(lambda: count_lines(out) >= 10, client, "10 results before the outage")
        server.kill()
        # Triton comes back once the client has seen the outage (and is retrying).
        wait_until(lambda: "retrying in" in stderr.read_text(), client, "retry during the outage")
        server.start()
        assert client.wait(timeout=DEADLINE_S) == 0, stderr.read_text()
    finally:
        server.kill()
        server.close()
    results, errors, _ = uninterrupted
    assert load(tmp_path / "results.errors.jsonl") == errors
    assert_same_results(load(out), results, tolerance)


def test_triton_down_stops_early_then_resume_finishes(
    triton_server, two_model_repository, image_folder, uninterrupted, tolerance, tmp_path
):
    repository, _ = two_model_repository
    out = tmp_path / "results.jsonl"
    (port,) = free_ports(1)
    down = run_here(*job_args(image_folder, f"127.0.0.1:{port}", out, "--retries", "1"))
    assert down.returncode == 75, down.stderr
    assert f"Triton at 127.0.0.1:{port} is unreachable" in down.stderr
    assert "--resume" in down.stderr
    assert count_lines(out) == 0

    done = run_here(*job_args(image_folder, triton_server.grpc_url, out, "--resume"))
    assert done.returncode == 0, done.stderr
    results, errors, _ = uninterrupted
    assert_same_results(load(out), results, tolerance)
    assert load(tmp_path / "results.errors.jsonl") == errors


def test_shards_split_the_job_without_overlap(
    triton_server, two_model_repository, image_folder, uninterrupted, tolerance, tmp_path
):
    repository, _ = two_model_repository
    parts = []
    for index in range(2):
        out = tmp_path / f"part{index}.jsonl"
        result = run_here(
            *job_args(image_folder, triton_server.grpc_url, out, "--shard", f"{index}/2")
        )
        assert result.returncode == 0, result.stderr
        parts.append({**load(out), **load(tmp_path / f"part{index}.errors.jsonl")})
    assert parts[0] and parts[1] and not set(parts[0]) & set(parts[1])
    assert all(in_shard(p, i, 2) for i, part in enumerate(parts) for p in part)
    results, errors, _ = uninterrupted
    assert sorted([*parts[0], *parts[1]]) == sorted([*results, *errors])
    merged = {p: r for part in parts for p, r in part.items() if p in results}
    assert_same_results(merged, results, tolerance)


def test_decoding_here_gives_the_same_results(
    triton_server, image_folder, uninterrupted, tolerance, tmp_path
):
    results, errors, _ = uninterrupted
    out = tmp_path / "results.jsonl"
    args = job_args(image_folder, triton_server.grpc_url, out, "--decode", "local")
    result = run_client(*args)
    assert result.returncode == 0, result.stderr
    assert "decoding here" in result.stderr
    assert_same_results(load(out), results, tolerance)
    assert sorted(load(out.with_name("results.errors.jsonl"))) == sorted(errors)


def test_shared_memory_gives_the_same_results(
    triton_server, two_model_repository, image_folder, uninterrupted, tolerance, tmp_path
):
    repository, _ = two_model_repository
    results, _, _ = uninterrupted
    chosen = sorted(results)[:10]
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p}\n" for p in chosen))
    out = tmp_path / "results.jsonl"
    result = run_here(
        "--list",
        str(listing),
        "--url",
        triton_server.grpc_url,
        "--repository",
        str(repository),
        "--scales",
        SCALES,
        "--out",
        str(out),
        "--decode",
        "local",
        "--shm",
    )
    assert result.returncode == 0, result.stderr
    assert_same_results(load(out), {p: results[p] for p in chosen}, tolerance)


def test_existing_output_needs_resume_or_overwrite(
    two_model_repository, image_folder, tmp_path, capsys
):
    # Usage errors: the command's main() in this process (no Triton is contacted).
    repository, _ = two_model_repository
    out = tmp_path / "results.jsonl"
    out.write_text('{"path": "x", "predictions": []}\n')
    (port,) = free_ports(1)
    assert grpc_batch_main(job_args(image_folder, f"127.0.0.1:{port}", out)) == 2
    stderr = capsys.readouterr().err
    assert "already exist; pass --resume" in stderr and "--overwrite" in stderr
    args = job_args(image_folder, f"127.0.0.1:{port}", out, "--shard", "2/2")
    assert grpc_batch_main(args) == 2 and "0 <= i < n" in capsys.readouterr().err
    args = job_args(image_folder, "10.1.2.3:8001", out, "--shm")
    assert grpc_batch_main(args) == 2
    assert "--shm needs Triton on this machine" in capsys.readouterr().err
    args = job_args(image_folder, f"127.0.0.1:{port}", out, "--shm")
    assert grpc_batch_main(args) == 2
    assert "use it with --decode local" in capsys.readouterr().err


def test_read_done_cuts_a_torn_tail_and_refuses_a_corrupt_middle(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"path": "a"}\n{"path": "b"}\n{"path": "c", "pre')
    assert read_done(path) == {"a", "b"}
    assert path.read_text() == '{"path": "a"}\n{"path": "b"}\n'  # ready for appending
    path.write_text('{"path": "a"}\ngarbage\n{"path": "c"}\n')
    with pytest.raises(UsageError, match="corrupt line in the middle"):
        read_done(path)
