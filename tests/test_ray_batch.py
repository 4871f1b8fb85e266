"""``python -m clients.ray_batch`` on a local Ray with 2 CPUs: grpc_batch's results, exactly once.

Each job is a process of its own that starts its own local Ray, as a user runs it. Its lines
must equal grpc_batch's (Triton's classify, the same graphs) within 1e-6: one fp32 run of the
same graphs on the same views against another differs by a few 1e-8 in a posterior here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from testkit import REPOSITORY_ROOT
from testkit.images import jpeg, smooth_image, truncated

SAME = 1e-6
IMAGES = 24
UNREADABLE = {"empty.png": "the file is empty", "cut.jpg": "truncated", "text.png": "not an image"}
KEYS = {"path", "predictions", "per_model", "scales", "models"}
# Small blocks, so a job writes many part files and a kill lands between them; the small
# models' own training-size scales keep each job to seconds.
SMALL_BATCHES = ["--cpus", "2", "--batch-size", "3", "--no-progress", "--scales", "64,96,128"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ray-images")
    rng = np.random.default_rng(1409)
    for i in range(IMAGES):
        width, height = (int(v) for v in rng.integers(64, 220, 2))
        image = smooth_image(width, height, seed=1409 + i, mode="L" if i % 5 == 2 else "RGB")
        image.save(folder / f"img{i:03d}{('.jpg', '.png')[i % 2]}")
    (folder / "empty.png").write_bytes(b"")
    (folder / "cut.jpg").write_bytes(truncated(jpeg(300, 200, seed=1), 0.3))
    (folder / "text.png").write_text("not a picture")
    return folder


def ray_batch(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "clients.ray_batch", *args],
        cwd=REPOSITORY_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def lines(folder: Path) -> dict[str, dict]:
    """Every line of every part file, by path; each path must appear once."""
    records = [
        json.loads(line)
        for part in sorted(folder.glob("*.jsonl"))
        for line in part.read_text().splitlines()
    ]
    counts = Counter(record["path"] for record in records)
    assert max(counts.values()) == 1, [p for p, n in counts.items() if n > 1]
    return {record["path"]: record for record in records}


@pytest.fixture(scope="module")
def grpc_batch_lines(triton_server, image_folder, tmp_path_factory) -> dict[str, dict]:
    """The folder through clients/grpc_batch.py and Triton's classify: the reference."""
    out = tmp_path_factory.mktemp("grpc") / "results.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "clients.grpc_batch", str(image_folder)]
        + ["--url", triton_server.grpc_url, "--out", str(out), "--scales", "64,96,128"],
        cwd=REPOSITORY_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    errors = out.with_name("results.errors.jsonl").read_text().splitlines()
    return {r["path"]: r for r in records + [json.loads(line) for line in errors]}


def assert_same_as(got: dict[str, dict], expected: dict[str, dict], atol: float = SAME) -> None:
    assert sorted(got) == sorted(expected)
    for path, record in expected.items():
        mine = got[path]
        assert set(mine) == set(record), path
        if "error" in record:
            assert mine["error"] == record["error"]
            continue
        assert set(mine) == KEYS
        assert (mine["scales"], mine["models"]) == (record["scales"], record["models"])
        pairs = [(mine["predictions"], record["predictions"])]
        pairs += [(mine["per_model"][m], record["per_model"][m]) for m in record["models"]]
        for a, b in pairs:
            assert [(p["index"], p["label"]) for p in a] == [(p["index"], p["label"]) for p in b]
            np.testing.assert_allclose(
                [p["probability"] for p in a], [p["probability"] for p in b], rtol=0, atol=atol
            )


@pytest.fixture(scope="module")
def uninterrupted(two_model_repository, image_folder, tmp_path_factory) -> dict[str, dict]:
    """One whole job on ONNX Runtime actors."""
    repository, _ = two_model_repository
    out = tmp_path_factory.mktemp("ray") / "out"
    done = ray_batch(
        str(image_folder), "--repository", str(repository), "--out", str(out), *SMALL_BATCHES
    )
    assert done.returncode == 0, done.stderr
    assert f"{IMAGES + len(UNREADABLE)} files, 0 already done" in done.stderr
    assert len(list(out.glob("*.jsonl"))) > 1  # several blocks, several part files
    return lines(out)


def test_onnxruntime_actors_give_grpc_batch_results(uninterrupted, grpc_batch_lines):
    assert len(uninterrupted) == IMAGES + len(UNREADABLE)
    for name, needle in UNREADABLE.items():
        path = next(p for p in uninterrupted if p.endswith(name))
        assert needle in uninterrupted[path]["error"]
    assert_same_as(uninterrupted, grpc_batch_lines)


def test_triton_engine_sends_files_to_classify(
    triton_server, image_folder, grpc_batch_lines, tmp_path
):
    out = tmp_path / "out"
    done = ray_batch(
        str(image_folder),
        "--engine",
        "triton",
        "--url",
        triton_server.grpc_url,
        "--out",
        str(out),
        "--actors",
        "2",
        *SMALL_BATCHES,
    )
    assert done.returncode == 0, done.stderr
    assert_same_as(lines(out), grpc_batch_lines)


def test_openvino_actors_give_the_same_results(
    two_model_repository, image_folder, uninterrupted, tmp_path
):
    repository, _ = two_model_repository
    out = tmp_path / "out"
    done = ray_batch(
        str(image_folder),
        "--engine",
        "openvino",
        "--precision",
        "fp32",
        "--repository",
        str(repository),
        "--out",
        str(out),
        *SMALL_BATCHES,
    )
    assert done.returncode == 0, done.stderr
    # OpenVINO fp32 against ONNX Runtime fp32 on the same graphs: within testkit.tolerances'
    # fp32 bound (about 1e-5 for these models; measured 1.2e-7 by the OpenVINO backend's tests).
    assert_same_as(lines(out), uninterrupted, atol=1e-5)


def test_killed_at_any_point_and_resumed_gives_every_file_once(
    two_model_repository, image_folder, uninterrupted, tmp_path
):
    repository, _ = two_model_repository
    args = [str(image_folder), "--repository", str(repository), "--out", str(tmp_path / "out")]
    args += SMALL_BATCHES
    for written in (1, 3):  # a kill after the first part file, then after three more
        job = subprocess.Popen(
            [sys.executable, "-m", "clients.ray_batch", *args, "--resume"],
            cwd=REPOSITORY_ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its local Ray too: SIGKILL to the whole group
        )
        before = len(list((tmp_path / "out").glob("*.jsonl")))
        deadline = time.monotonic() + 300  # bounds a hang only
        while len(list((tmp_path / "out").glob("*.jsonl"))) < before + written:
            assert job.poll() is None, "the job ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    partial = lines(tmp_path / "out") if list((tmp_path / "out").glob("*.jsonl")) else {}
    assert 0 < len(partial) < IMAGES + len(UNREADABLE)
    resumed = ray_batch(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(partial)} already done" in resumed.stderr
    finished = lines(tmp_path / "out")  # asserts every path once
    assert sorted(finished) == sorted(uninterrupted)
    assert_same_as(finished, uninterrupted)


def test_a_torn_part_file_is_redone_not_half_counted(two_model_repository, image_folder, tmp_path):
    repository, _ = two_model_repository
    out = tmp_path / "out"
    args = [str(image_folder), "--repository", str(repository), "--out", str(out), *SMALL_BATCHES]
    assert ray_batch(*args).returncode == 0
    part = sorted(out.glob("*.jsonl"))[0]
    torn = part.read_bytes()[:-10]  # as a kill mid-write leaves it
    part.write_bytes(torn)
    resumed = ray_batch(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert torn.count(b"\n") >= 1 and not part.exists()
    assert len(lines(out)) == IMAGES + len(UNREADABLE)


def test_uri_inputs_and_listed_files(two_model_repository, image_folder, uninterrupted, tmp_path):
    repository, _ = two_model_repository
    listing = tmp_path / "files.txt"
    chosen = sorted(uninterrupted)[:4]
    listing.write_text("".join(f"{p}\n" for p in chosen) + f"{tmp_path / 'gone.jpg'}\n")
    out = tmp_path / "out"
    done = ray_batch(
        f"file://{image_folder}",  # the folder as a URI, walked by pyarrow's filesystem
        "--list",
        str(listing),
        "--repository",
        str(repository),
        "--out",
        str(out),
        *SMALL_BATCHES,
    )
    assert done.returncode == 0, done.stderr
    got = lines(out)  # the listed files are in the folder too: each still once
    gone = str(tmp_path / "gone.jpg")
    assert got.pop(gone)["error"] == "cannot read the file: No such file or directory"
    assert_same_as(got, uninterrupted)
    several = ray_batch(
        f"file://{image_folder}", "s3://bucket/images/", "--out", str(tmp_path / "x")
    )
    assert several.returncode == 2 and "several filesystems" in several.stderr


def test_existing_output_needs_resume_or_overwrite(two_model_repository, image_folder, tmp_path):
    repository, _ = two_model_repository
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.jsonl").write_text('{"path": "x", "error": "e"}\n')
    args = [str(image_folder), "--repository", str(repository), "--out", str(out)]
    refused = ray_batch(*args)
    assert refused.returncode == 2
    assert "pass --resume" in refused.stderr and "--overwrite" in refused.stderr
    assert ray_batch(*args, "--resume", "--overwrite").returncode == 2
    unknown = ray_batch(*args, "--models", "m16,vgg99", "--overwrite")
    assert unknown.returncode == 2 and "no model vgg99" in unknown.stderr
