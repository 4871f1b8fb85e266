"""``make serve``, the main job: the command it runs for what the repository holds (dry runs)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from testkit import REPOSITORY_ROOT as ROOT

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


def test_serve_leaves_the_scales_to_each_models_config(tmp_path):
    repository = tmp_path / "repo"
    (repository / "demo-vgg16").mkdir(parents=True)
    # A model the repository holds. Without one, the models recipe would run even under -n (its
    # line names $(MAKE)): an ImageNet export, or a download where there is a network.
    (repository / "demo-vgg16" / "config.pbtxt").write_text('name: "demo-vgg16"\n')
    command = served_command(repository)
    # Each model's config.pbtxt names its serving scales (demo models 64,96,128): no flag here.
    assert "--scales" not in command, command
    assert f"--repository {repository}" in command and "--host 127.0.0.1" in command
