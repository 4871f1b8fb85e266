"""The benchmark scripts' contracts that hold on any machine (their figures are in the README).

The GPU benchmark cannot run here; what can be checked is that it stops at once, saying what to
do, instead of failing late or measuring the CPU by mistake.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from testkit import REPOSITORY_ROOT as ROOT


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the benchmark would run")
def test_gpu_benchmark_stops_at_once_without_cuda(tmp_path):
    out = tmp_path / "gpu"
    result = subprocess.run(
        ["bash", "bench/gpu.sh", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHON": sys.executable},  # this venv, wherever it lies
    )
    assert result.returncode == 2
    assert "no CUDA device is visible" in result.stderr
    assert "--dry-run" in result.stderr  # says how to check the script here
    assert not any(out.glob("*.json"))  # nothing that looks like results


@pytest.mark.parametrize("script", ["bench/gpu.sh", "bench/cpu.sh"])
def test_benchmark_scripts_are_executable_bash_with_strict_mode(script):
    path = ROOT / script
    assert path.stat().st_mode & 0o111, f"{script} is not executable"
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash")
    assert "set -euo pipefail" in text
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0  # parses


def test_gpu_benchmark_usage_error_names_the_forms():
    result = subprocess.run(["bash", "bench/gpu.sh"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert "usage: bench/gpu.sh OUT_DIR" in result.stderr
