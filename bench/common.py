"""Shared pieces of the benchmarks: generated models and images, a server process, statistics."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from export import to_onnx  # noqa: E402
from vgg.models import build  # noqa: E402

SMALL_FLAGS = ["--width", "0.125", "--fc-width", "128", "--crop", "64"]


def export_random(workdir: Path, arch: str, name: str, small: bool) -> Path:
    """Export ``arch`` with seeded random weights (full size or the small test variant)."""
    repo = workdir / "repo"
    workdir.mkdir(parents=True, exist_ok=True)
    if (repo / name / "1" / "model.onnx").is_file():
        return repo
    torch.manual_seed(0)
    flags = SMALL_FLAGS if small else []
    overrides = {"width": 0.125, "fc_width": 128, "crop": 64, "num_classes": 10} if small else {}
    weights = workdir / f"{name}.pth"
    torch.save(build(arch, **overrides).state_dict(), weights)
    args = ["--arch", arch, "--weights", str(weights), "--name", name, "--repository", str(repo)]
    if to_onnx.main([*args, *flags]) != 0:
        raise SystemExit(f"export of {name} failed")
    weights.unlink()
    return repo


def jpeg_images(count: int, seed: int = 0) -> list[bytes]:
    """JPEGs of 4:3 (640x480) photographs' size: smooth random colour fields."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        small = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((640, 480), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m server`` on a free loopback port, stopped on exit."""

    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "server", "--port", str(self.port), *args]

    def __enter__(self) -> ServerProcess:
        import requests

        self.process = subprocess.Popen(self.args, cwd=ROOT, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"server exited with {self.process.returncode}")
            try:
                if requests.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise SystemExit("server did not become ready in 120 s")

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.process.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def open_files(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def __exit__(self, *exc) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def machine() -> str:
    """A short description of the CPU this ran on."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores"
