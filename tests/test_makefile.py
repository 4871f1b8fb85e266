"""``make serve``, the main job: the command it runs for what the repository holds (dry runs)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")


def served_command(repository) -> str:
    result = subprocess.run(
        ["make", "-n", "serve", f"MODEL_REPOSITORY={repository}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    lines = result.stdout.replace("\\\n", " ").splitlines()
    (command,) = [line for line in lines if "-m server" in line]
    return " ".join(command.split())


def test_demo_models_alone_are_served_at_their_scales(tmp_path):
    repository = tmp_path / "repo"
    for name in ("demo-vgg16", "demo-vgg19"):
        (repository / name).mkdir(parents=True)
    (repository / "README.md").write_text("not a model\n")  # as in a fresh clone
    command = served_command(repository)
    assert command.endswith("--scales 64,96,128"), command
    assert f"--repository {repository}" in command and "--host 127.0.0.1" in command


def test_imagenet_models_are_served_at_the_papers_scales(tmp_path):
    repository = tmp_path / "repo"
    for name in ("demo-vgg16", "vgg16"):
        (repository / name).mkdir(parents=True)
    assert "--scales" not in served_command(repository)  # the server's default, 256,384,512
