"""The Dockerfile (no container engine here): hadolint, its stages, and what the slim image needs."""

from __future__ import annotations

import fnmatch
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

from testkit import REPOSITORY_ROOT as ROOT

DOCKERFILE = ROOT / "Dockerfile"


def hadolint() -> str:
    return str(Path(sys.executable).with_name("hadolint"))


def stages() -> dict[str, list[str]]:
    """Instructions (continuation lines joined) by stage name."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("FROM "):
            current = line.split()[-1]
            found[current] = [line]
        elif current:
            found[current].append(line)
    return found


def instruction(stage: list[str], name: str) -> list[str]:
    return [line[len(name) + 1 :] for line in stage if line.startswith(name + " ")]


def test_hadolint_passes():
    result = subprocess.run(
        [hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_triton_target_serves_the_repository_with_nvidias_image():
    triton = stages()["triton"]
    assert re.fullmatch(
        r"FROM nvcr\.io/nvidia/tritonserver:\$\{TRITON_VERSION\}-py3 AS triton", triton[0]
    )
    version = re.search(r"^ARG TRITON_VERSION=(\d\d)\.(\d\d)$", DOCKERFILE.read_text(), re.M)
    assert version and version.group(1) == "24"
    assert "model_repository/ /models/" in instruction(triton, "COPY")
    (entrypoint,) = instruction(triton, "ENTRYPOINT")
    (cmd,) = instruction(triton, "CMD")
    assert entrypoint == '["tritonserver"]' and "--model-repository=/models" in cmd
    assert instruction(triton, "EXPOSE") == ["8000 8001 8002"]


def test_frontend_target_runs_the_server_against_triton():
    all_stages = stages()
    frontend = all_stages["frontend"]
    assert frontend[0] == "FROM python:${PYTHON_VERSION}-slim AS frontend"
    assert re.search(r"^ARG PYTHON_VERSION=3\.11$", DOCKERFILE.read_text(), re.M)
    command = " ".join(
        shlex.split(instruction(frontend, "ENTRYPOINT")[0].strip("[]").replace(",", " "))
        + shlex.split(instruction(frontend, "CMD")[0].strip("[]").replace(",", " "))
    )
    assert command.startswith("python -m server --backend triton --triton-url triton:8001")
    assert "--host 0.0.0.0" in command and "--repository /models" in command
    assert instruction(frontend, "USER") == ["10001"]  # not root


def copied_sources() -> list[str]:
    sources = []
    for stage in stages().values():
        for args in instruction(stage, "COPY"):
            if args.startswith("--from="):
                continue
            sources += args.split()[:-1]
    return sources


def test_every_copied_path_exists_and_is_not_docker_ignored():
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for source in copied_sources():
        assert (ROOT / source).exists(), source
        top = source.rstrip("/").split("/")[0]
        assert not any(fnmatch.fnmatch(top, pattern) for pattern in ignored), source
    assert ".venv" in ignored and ".git" in ignored  # gigabytes that must not be sent


def test_frontend_requirements_are_pyprojects_and_enough_to_serve(two_model_repository):
    """The slim image installs a subset of pyproject's dependencies, with the same ranges, and
    that subset is enough to start the front end with --backend triton."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = {re.split(r"[\[<>=]", d)[0]: d for d in pyproject["project"]["dependencies"]}
    (install,) = [i for i in instruction(stages()["frontend"], "RUN") if "pip install" in i]
    required = re.findall(r'"([^"]+)"', install)
    assert required
    names = set()
    for requirement in required:
        name = re.split(r"[\[<>=]", requirement)[0]
        names.add(name)
        extras_free = re.sub(r"\[[^]]*\]", "", requirement)
        assert re.sub(r"\[[^]]*\]", "", declared[name]) == extras_free, requirement

    # Import the front end and the Triton backend with everything else made unimportable.
    missing = sorted(set(declared) - names)
    assert {"torch", "torchvision", "onnx", "matplotlib"} <= set(missing)
    modules = {n.replace("-", "_").lower() for n in missing} | {"torch", "torchvision", "onnx"}
    probe = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {sorted(modules)!r}:
            raise ImportError(f"{{name}} is not in the frontend image")
sys.meta_path.insert(0, Block())
from server.main import create_app
from server.settings import Settings
from inference.backends.triton import TritonBackend
create_app(Settings(repository={str(two_model_repository[0])!r}, backend="triton"))
print("app created")
"""
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "app created" in result.stdout, result.stderr
