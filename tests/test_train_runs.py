"""Real training runs of a tiny VGG: exact resume after SIGKILL and SIGTERM, DDP on two CPU
processes equal to one process, and a trained checkpoint that exports and serves."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from export.to_onnx import main as export_main
from inference.backends.onnxruntime import OnnxRuntimeBackend
from inference.classifier import Classifier, ClassifyOptions
from inference.repository import read_repository
from testkit import REPOSITORY_ROOT as ROOT
from testkit.tolerances import UNIT_ROUNDOFF, posterior_bound
from train.data import load_rgb, scan_folder
from train.recipe import main as train_main
from train.synthetic import SyntheticConfig, generate
from vgg.checkpoint import load_weights

from .reference import protocol

# VGG-A with batch-norm at 1/16 width: every part of the recipe (batch-norm, dropout, scale
# jittering, colour shift) in a net that takes milliseconds per step.
TINY = [
    "--arch",
    "vgg11_bn",
    "--width",
    "0.0625",
    "--fc-width",
    "32",
    "--crop",
    "32",
    "--scale",
    "32:48",
    "--batch-size",
    "8",
    "--lr",
    "0.02",
    "--lr-scheduler",
    "cosine",
    "--warmup-epochs",
    "0.5",
    "--init",
    "kaiming",
    "--normalize",
    "mean-std",
    "--stats-images",
    "16",
    "--val-images",
    "6",
    "--threads",
    "1",
    "--no-progress",
]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    config = SyntheticConfig(classes=3, train=32, val=6, seed=5)  # 4 steps of 8 per epoch
    return generate(
        tmp_path_factory.mktemp("tiny") / "data", config, workers=1, log=lambda _m: None
    )


def train_command(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "train",
        "--data",
        str(data),
        "--output-dir",
        str(out),
        *TINY,
        "--epochs",
        "2",
        "--save-every-steps",
        "1",
        *extra,
    ]


def run(command: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def without_timings(history: list[dict]) -> list[dict]:
    return [
        {k: v for k, v in row.items() if k not in ("images_per_s", "epoch_s", "val_s")}
        for row in history
    ]


def assert_same_state(a: dict, b: dict) -> None:
    """Bitwise-equal weights, optimiser state, schedule and learning-curve history."""
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for index, state in a["optimizer"]["state"].items():
        assert torch.equal(
            state["momentum_buffer"], b["optimizer"]["state"][index]["momentum_buffer"]
        )
    assert a["scheduler"] == b["scheduler"]
    assert without_timings(a["history"]) == without_timings(b["history"])


def start(command: list[str]) -> subprocess.Popen:
    # Its own session: the signal goes to the trainer and its loader workers, as Ctrl-C would.
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for_checkpoints(process: subprocess.Popen, path: Path, count: int) -> None:
    """Return once ``path`` has been (re)written ``count`` times while ``process`` runs."""
    seen, last = 0, path.stat().st_mtime_ns if path.exists() else None
    deadline = time.monotonic() + 240
    while seen < count:
        assert process.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        try:
            stamp = path.stat().st_mtime_ns
        except FileNotFoundError:
            stamp = None
        if stamp is not None and stamp != last:
            seen, last = seen + 1, stamp
        time.sleep(0.002)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "straight"
    run(train_command(data, out, "--workers", "1"))
    return out


def test_sigterm_then_sigkill_and_the_same_command_ends_with_the_same_weights(
    data, uninterrupted, tmp_path
):
    out = tmp_path / "interrupted"
    command = train_command(data, out, "--workers", "1")

    process = start(command)
    wait_for_checkpoints(process, out / "last.pth", 2)
    os.killpg(process.pid, signal.SIGTERM)  # trainer and loader worker, as Ctrl-C or `timeout`
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "run the same command to continue" in stderr and "Traceback" not in stderr
    saved = checkpoint(out / "last.pth")

    process = start(command)
    wait_for_checkpoints(process, out / "last.pth", 2)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    killed = checkpoint(out / "last.pth")
    assert (saved["epoch"], saved["step"]) < (killed["epoch"], killed["step"]) < (2, 0)

    resumed = run(command)
    assert f"resuming {out} at epoch {killed['epoch'] + 1}, step {killed['step']}" in resumed.stderr
    assert_same_state(checkpoint(uninterrupted / "last.pth"), checkpoint(out / "last.pth"))
    best, best_again = checkpoint(uninterrupted / "best.pth"), checkpoint(out / "best.pth")
    assert best["epoch"] == best_again["epoch"]
    assert all(torch.equal(best["model"][k], best_again["model"][k]) for k in best["model"])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert without_timings(metrics) == without_timings(checkpoint(out / "last.pth")["history"])
    assert [row["epoch"] for row in metrics] == [1, 2]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Finished: the same command has nothing left to do (in this process: no signal involved).
    threads = torch.get_num_threads()
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            assert train_main(command[3:]) == 0
    finally:
        torch.set_num_threads(threads)  # the command sets its own
    assert "already finished" in stderr.getvalue()
    assert_same_state(checkpoint(uninterrupted / "last.pth"), checkpoint(out / "last.pth"))


def test_two_cpu_processes_equal_one_at_the_same_global_batch(data, uninterrupted, tmp_path):
    two = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "train",
        *train_command(data, tmp_path / "two", "--workers", "0")[3:],
    ]
    result = run(two)
    assert "2 process(es) on cpu" in result.stderr
    one, both = checkpoint(uninterrupted / "last.pth"), checkpoint(tmp_path / "two" / "last.pth")
    assert both["world_size"] == 2 and one["world_size"] == 1
    # The same arithmetic, except that each gradient and batch-norm statistic is summed over
    # the global batch in another grouping (two half batches, added by the all-reduce): a
    # reordering, about sqrt(n) * 2**-24 of the sum (testkit.tolerances), n = 8 images x 32 x 32
    # positions at most. Each of the 8 steps' updates is off by that much relative, and momentum
    # 0.9 carries an update on for at most 1 / (1 - 0.9) = 10 steps; with an update never larger
    # than the tensor itself (here at most 2% of it per step), the weights differ by at most
    # 8 * 10 * sqrt(8192) * 2**-24 = 4.3e-4 of the largest magnitude in the layer (measured
    # 3e-7; a layer's bias is scaled with its weights: before batch-norm it is mere rounding
    # noise). Summed instead of averaged gradients, unsynchronised statistics or another split
    # of the data move a layer by a whole update (over 1.6e-3 of it for every layer in epoch 2).
    steps, images, positions, momentum = 8, 8, 32 * 32, 0.9
    relative = steps / (1 - momentum) * math.sqrt(images * positions) * UNIT_ROUNDOFF["fp32"]
    largest: dict[str, float] = {}
    for key, tensor in one["model"].items():
        if tensor.is_floating_point():
            layer = key.rpartition(".")[0]
            largest[layer] = max(largest.get(layer, 0.0), tensor.abs().max().item())
    for key, tensor in one["model"].items():
        if tensor.is_floating_point():
            difference = (tensor.double() - both["model"][key].double()).abs().max().item()
            assert difference <= relative * largest[key.rpartition(".")[0]], key
    # The loss of the same images through weights that far apart: a relative change of every
    # weight by r moves each of the 11 layers' outputs, hence the loss, by about 11 r relative.
    layers = 11
    for a, b in zip(one["history"], both["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=layers * relative)
        assert a["val_top1_err"] == b["val_top1_err"]


def test_trained_checkpoint_exports_and_serves(data, uninterrupted, tmp_path):
    best = uninterrupted / "best.pth"
    repository = tmp_path / "repo"
    flags = ["--weights", str(best), "--name", "tiny", "--repository", str(repository)]
    assert export_main(flags) == 0
    assert (repository / "tiny" / "1" / "model.onnx").is_file()
    models = read_repository(repository)
    entry = models["tiny"]
    val = scan_folder(data / "val")
    assert entry.labels == val.classes  # class names travel with the checkpoint
    assert entry.min_size == 32
    loaded = load_weights(best)

    scales = (32, 40, 48)  # the scales it was validated at
    classifier = Classifier(OnnxRuntimeBackend(models, threads=1), models, default_scales=scales)
    posteriors = np.load(uninterrupted / "posteriors.npz")
    for index in range(3):
        image = load_rgb(val.samples[index][0])
        served = asyncio.run(classifier.classify(image, ClassifyOptions(top_k=3)))
        expected = protocol([loaded.model], image, scales, True, mean=loaded.mean, std=loaded.std)
        # fp32 ONNX Runtime and fp32 PyTorch against float64 (testkit.tolerances).
        bound = posterior_bound(loaded.model, expected.largest_score)
        assert np.abs(served.probabilities - expected.probs).max() < bound
        # the validation during training measured exactly what is served
        validated = np.mean([posteriors[f"Q{q}"][index] for q in scales], axis=0)
        assert np.abs(served.probabilities - validated).max() < bound
        assert served.predictions[0].label in val.classes

    # the server's default scales work too: any Q >= the crop
    image = load_rgb(val.samples[0][0])
    wide = asyncio.run(classifier.classify(image, ClassifyOptions(scales=(256, 384, 512))))
    expected = protocol([loaded.model], image, (256, 384, 512), mean=loaded.mean, std=loaded.std)
    bound = posterior_bound(loaded.model, expected.largest_score)
    assert np.abs(wide.probabilities - expected.probs).max() < bound
