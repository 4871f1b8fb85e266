"""An export SIGKILLed while it writes leaves the model repository loadable.

Every file-system step of writing a model (each file written, half-written, fsynced, renamed
into place, the staging folder removed) is a kill point, for a new model, a new version of a
model and the same version written again (``export/to_onnx.py``'s default). After each kill the
repository must still be read by the server, every model's graph must load in ONNX Runtime, and
the model must be either the old one or the new one, never a mix or nothing. Then a real
``python export/to_onnx.py`` is SIGKILLed the moment it starts writing, and the app starts on
what it left and classifies.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient

from inference import read_repository
from server.main import create_app
from server.settings import Settings
from testkit import REPOSITORY_ROOT as ROOT
from testkit.images import build_image_set
from testkit.models import SMALL

# name, version: a new model, a new version of m16, and version 1 of m16 written again.
CASES = {"new model": ("m16b", 1), "new version": ("m16", 2), "same version": ("m16", 1)}


def served_bytes(repository: Path) -> dict[str, bytes]:
    """What the server would serve: the latest version's graph of each model."""
    return {
        name: entry.onnx_path.read_bytes() for name, entry in read_repository(repository).items()
    }


def assert_loadable(repository: Path) -> dict[str, bytes]:
    """The server can read the repository and ONNX Runtime can load every served graph."""
    served = served_bytes(repository)
    for name, data in served.items():
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["image"], name
    hidden = [p.name for p in repository.iterdir() if p.name.startswith(".")]
    assert not hidden, f"staging left inside the repository: {hidden}"
    return served


def kill_at_every_step(pristine: Path, work: Path, name: str, version: int, source: Path):
    """``python -m testkit.killed_export --every-step``: the export run to the end, then killed
    at each of its file-system steps, each on a fresh copy of ``pristine`` under ``work``."""
    result = subprocess.run(
        [
            *(sys.executable, "-m", "testkit.killed_export", "--every-step"),
            *(str(pristine), str(work), name, str(version), str(source)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("case", list(CASES))
def test_export_killed_at_every_step_leaves_the_repository_loadable(
    two_model_repository, tmp_path, case
):
    pristine, _ = two_model_repository
    name, version = CASES[case]
    source = pristine / "m19"  # the new graph: m19's, so old and new are told apart
    before = served_bytes(pristine)
    new = (source / "1" / "model.onnx").read_bytes()

    result = kill_at_every_step(pristine, tmp_path, name, version, source)
    steps = result["steps"]
    assert served_bytes(tmp_path / "finished" / "repo")[name] == new
    assert steps >= 8  # writes, fsyncs, renames: every one of them is a kill point below
    assert result["exit_codes"] == [-signal.SIGKILL] * steps, result

    outcomes = []
    for step in range(steps):
        repository = tmp_path / f"step-{step}" / "repo"
        served = assert_loadable(repository)
        if name in before:
            assert served[name] in (before[name], new), f"step {step}: neither old nor new"
        else:
            assert name not in served or served[name] == new, f"step {step}: a partial model"
        assert served["m19"] == before["m19"]  # the other models are untouched
        outcomes.append("new" if served.get(name) == new else "old")
    # Old until the one atomic step that publishes the new graph, new from then on.
    assert outcomes == sorted(outcomes, key=lambda o: o == "new"), outcomes
    assert outcomes[0] == "old"


def kill_when_writing(command: list[str], repository: Path) -> int:
    """Run an export; SIGKILL it the instant its staging folder appears. Its exit code."""
    export = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    staging_prefix = f".{repository.name}-"
    deadline = time.monotonic() + 120
    try:
        while export.poll() is None and time.monotonic() < deadline:
            # The staging folder appears the instant writing begins: kill it right there.
            if any(e.name.startswith(staging_prefix) for e in os.scandir(repository.parent)):
                export.send_signal(signal.SIGKILL)
                break
            time.sleep(0.001)
    finally:
        if export.poll() is None and time.monotonic() >= deadline:
            export.kill()
    return export.wait()


def test_real_export_killed_while_writing_leaves_a_servable_repository(
    two_model_repository, tmp_path
):
    pristine, _ = two_model_repository
    repository = tmp_path / "repo"
    shutil.copytree(pristine, repository)
    weights = pristine.parent / "m16.pth"  # the fixture's own weights file
    command = [
        sys.executable,
        "export/to_onnx.py",
        "--arch",
        "vgg16",
        "--weights",
        str(weights),
        "--name",
        "m16",
        "--repository",
        str(repository),
        "--crop",
        str(SMALL["crop"]),
        "--width",
        str(SMALL["width"]),
        "--fc-width",
        str(SMALL["fc_width"]),
    ]
    for _attempt in range(3):  # on a fast disk the write can finish between two polls
        for stale in [repository, *tmp_path.glob(f".{repository.name}-*")]:
            shutil.rmtree(stale)
        shutil.copytree(pristine, repository)
        if kill_when_writing(command, repository) == -signal.SIGKILL:
            break
    else:
        pytest.fail("the export finished every time before it could be killed while writing")
    assert_loadable(repository)

    upload = build_image_set()[0]
    with TestClient(create_app(Settings(repository=repository, scales=(64,)))) as client:
        files = {"file": (upload.filename, upload.data, upload.content_type)}
        response = client.post("/v1/classify", files=files)
    assert response.status_code == 200, response.text
    assert response.json()["models"] == ["m16", "m19"]
