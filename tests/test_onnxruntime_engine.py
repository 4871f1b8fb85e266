"""Where the in-process ONNX Runtime backend runs, and that it says so.

This machine has no GPU and the CPU build of ONNX Runtime, so the GPU cases fake what a CUDA
build reports (its provider list, the installed distributions, the sessions it builds) and check
the decisions taken from it: the built session's first provider decides, a GPU asked for and
not obtained stops with one line, and a GPU session runs on one intra-op thread.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from inference.backends import onnxruntime as engine
from inference.backends.onnxruntime import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    GPU_INTRA_OP_THREADS,
    EngineError,
    OnnxRuntimeBackend,
)
from inference.cores import available_cores
from inference.repository import ModelEntry
from server.settings import Settings
from testkit import REPOSITORY_ROOT

REAL_VERSION = importlib.metadata.version
# ONNX Runtime's own warning when a CUDA provider is passed to this CPU build: the fallback the
# tests provoke on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")


@pytest.fixture(scope="module")
def tiny_graph(tmp_path_factory):
    """A graph with the exported models' interface: uint8 image in, probs out."""
    image = helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 3, "H", "W"])
    probs = helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 3])
    nodes = [
        helper.make_node("Cast", ["image"], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["pixels"], ["means"], axes=[2, 3], keepdims=0),
        helper.make_node("Softmax", ["means"], ["probs"], axis=1),
    ]
    graph = helper.make_graph(nodes, "tiny", [image], [probs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path_factory.mktemp("tiny") / "model.onnx"
    onnx.save(model, path)
    return path


def entry(path, name="tiny", precision="fp32") -> ModelEntry:
    return ModelEntry(
        name, 1, path, ("r", "g", "b"), "vgg16", (0.5,) * 3, (0.5,) * 3, 1, precision, (1,)
    )


@pytest.fixture
def cuda_listed(monkeypatch):
    """ONNX Runtime lists the CUDA provider, as a GPU build does whether or not CUDA loads."""
    monkeypatch.setattr(
        ort, "get_available_providers", lambda: [CUDA_PROVIDER, CPU_PROVIDER], raising=True
    )


def fake_installed(monkeypatch, versions: dict[str, str]) -> None:
    def version(name: str) -> str:
        if name in engine.RUNTIME_DISTRIBUTIONS:
            if name not in versions:
                raise importlib.metadata.PackageNotFoundError(name)
            return versions[name]
        return REAL_VERSION(name)

    monkeypatch.setattr(importlib.metadata, "version", version)


def test_cpu_default_is_unchanged(tiny_graph):
    """Without a CUDA build, auto is the CPU: one worker, every core, as before."""
    assert CUDA_PROVIDER not in ort.get_available_providers()  # this machine's CPU build
    backend = OnnxRuntimeBackend({"tiny": entry(tiny_graph)})
    try:
        assert not backend.on_gpu
        assert backend.sessions["tiny"].get_providers()[0] == CPU_PROVIDER
        assert backend.threads == {"tiny": available_cores()}
        assert "tiny on CPUExecutionProvider" in backend.describe()
        probs = backend.run("tiny", np.zeros((2, 3, 4, 5), np.uint8))["probs"]
        np.testing.assert_allclose(probs, np.full((2, 3), 1 / 3), rtol=1e-6)
    finally:
        backend._executor.shutdown()


def test_session_that_fell_back_to_the_cpu_stops_the_backend(tiny_graph, cuda_listed):
    """CUDA listed, the real session built on the CPU (no CUDA library here): one line saying
    which model, where it runs, which library failed to load, the build, and what to do."""
    with pytest.raises(EngineError) as caught:
        OnnxRuntimeBackend({"tiny": entry(tiny_graph)})
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(
        f"model tiny: the GPU was asked for but the session runs on {CPU_PROVIDER}: "
        "its CUDA library does not load ("
    )
    assert "libonnxruntime_providers_cuda.so" in message  # the loader's own words
    assert f"onnxruntime {ort.__version__}" in message
    assert "Install the onnxruntime-gpu build for this machine's CUDA" in message
    assert message.endswith("or choose the CPU")


def test_fallback_message_names_the_cuda_builds(monkeypatch, tiny_graph, cuda_listed):
    """The versions a user must match: the CUDA (and cuDNN) ONNX Runtime was built for, and
    torch's CUDA beside it; the loader's complaint names the missing library."""
    from onnxruntime.capi import build_and_package_info as build

    monkeypatch.setattr(build, "package_name", "onnxruntime-gpu", raising=False)
    monkeypatch.setattr(build, "cuda_version", "12.8", raising=False)
    monkeypatch.setattr(build, "cudnn_version", "9.8", raising=False)
    monkeypatch.setattr(engine, "_torch_cuda_version", lambda: "13.0")
    monkeypatch.setattr(
        engine,
        "cuda_library_problem",
        lambda: "libcublasLt.so.12: cannot open shared object file: No such file or directory",
    )
    with pytest.raises(EngineError) as caught:
        OnnxRuntimeBackend({"tiny": entry(tiny_graph)})
    assert (
        "its CUDA library does not load (libcublasLt.so.12: cannot open shared object file: "
        f"No such file or directory); onnxruntime-gpu {ort.__version__} built for CUDA 12.8 "
        "and cuDNN 9.8; torch here uses CUDA 13.0." in str(caught.value)
    )


def test_cpu_device_ignores_a_listed_cuda(tiny_graph, cuda_listed):
    backend = OnnxRuntimeBackend({"tiny": entry(tiny_graph)}, device="cpu")
    try:
        assert not backend.on_gpu
        assert backend.sessions["tiny"].get_providers() == [CPU_PROVIDER]
    finally:
        backend._executor.shutdown()


def test_cuda_device_without_a_cuda_build(tiny_graph):
    with pytest.raises(EngineError) as caught:
        OnnxRuntimeBackend({"tiny": entry(tiny_graph)}, device="cuda")
    message = str(caught.value)
    assert message.startswith(
        f"the GPU was asked for but this ONNX Runtime has no {CUDA_PROVIDER} "
        f"(onnxruntime {ort.__version__}"
    )
    assert f"pip install onnxruntime-gpu=={ort.__version__}" in message
    with pytest.raises(ValueError, match="device 'gpu': use one of auto, cpu, cuda"):
        OnnxRuntimeBackend({"tiny": entry(tiny_graph)}, device="gpu")


def test_both_distributions_installed_stop_a_gpu_backend(monkeypatch, tiny_graph, cuda_listed):
    fake_installed(monkeypatch, {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.32.0"})
    with pytest.raises(EngineError) as caught:
        OnnxRuntimeBackend({"tiny": entry(tiny_graph)})
    assert str(caught.value) == (
        "onnxruntime 1.32.0 and onnxruntime-gpu 1.32.0 are both installed and share the "
        "onnxruntime module, so whichever was installed last runs; keep only the GPU build: "
        "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu==1.32.0"
    )
    # The CPU, chosen, builds nothing from the GPU package and needs no check.
    backend = OnnxRuntimeBackend({"tiny": entry(tiny_graph)}, device="cpu")
    backend._executor.shutdown()


def test_one_distribution_passes_the_check(monkeypatch):
    for versions in ({"onnxruntime": "1.32.0"}, {"onnxruntime-gpu": "1.32.0"}):
        fake_installed(monkeypatch, versions)
        engine.check_single_runtime()


class FakeCudaSession:
    """What a working CUDA build returns: the providers it was given, CUDA first."""

    built: list[tuple[str, ort.SessionOptions, list]] = []

    def __init__(self, path, options, providers):
        self.providers = [p if isinstance(p, str) else p[0] for p in providers]
        FakeCudaSession.built.append((path, options, providers))

    def get_providers(self):
        return self.providers


def test_gpu_session_runs_on_one_intra_op_thread(monkeypatch, tiny_graph, cuda_listed):
    """A CUDA session gets one intra-op thread and the backend two workers; an int8 graph in
    the same backend stays on the CPU with every core."""
    FakeCudaSession.built = []
    monkeypatch.setattr(ort, "InferenceSession", FakeCudaSession)
    models = {"fp32": entry(tiny_graph, "fp32"), "int8": entry(tiny_graph, "int8", "int8")}
    backend = OnnxRuntimeBackend(models)
    try:
        (_, gpu_options, gpu_providers), (_, cpu_options, cpu_providers) = FakeCudaSession.built
        assert gpu_options.intra_op_num_threads == GPU_INTRA_OP_THREADS == 1
        assert gpu_providers[0] == (
            CUDA_PROVIDER,
            {"cudnn_conv_algo_search": "HEURISTIC", "arena_extend_strategy": "kSameAsRequested"},
        )
        assert cpu_providers == [CPU_PROVIDER]
        assert cpu_options.intra_op_num_threads == available_cores()
        assert backend.on_gpu and backend._workers == 2
        assert backend.threads == {"fp32": 1, "int8": available_cores()}
        assert "fp32 on CUDAExecutionProvider (1 intra-op threads)" in backend.describe()
    finally:
        backend._executor.shutdown()
    # Threads given explicitly are kept on the GPU too.
    FakeCudaSession.built = []
    backend = OnnxRuntimeBackend({"fp32": entry(tiny_graph)}, threads=3)
    backend._executor.shutdown()
    assert FakeCudaSession.built[0][1].intra_op_num_threads == 3


def test_server_flag_chooses_the_device():
    """--onnxruntime-device: the backend's choices, auto by default; cuda on a machine without
    the GPU build stops the start with one line naming the flag."""
    from dataclasses import fields

    from server.engine import StartupError, engine_opener
    from server.flags import parse_settings

    choices = {item.name: item.metadata["flag"].choices for item in fields(Settings)}
    assert choices["onnxruntime_device"] == engine.DEVICES
    assert parse_settings([]).onnxruntime_device == "auto"
    settings = parse_settings(["--onnxruntime-device", "cuda"])
    with pytest.raises(StartupError) as caught:
        engine_opener(settings, {})
    assert str(caught.value).startswith(
        f"--onnxruntime-device cuda: the GPU was asked for but this ONNX Runtime has no "
        f"{CUDA_PROVIDER}"
    )


# --- the CPU arena kept between runs -----------------------------------------------------------

WIDE = 64  # channels of the arena graph's convolutions: VGG's first block
ARENA_PROBE = """
import json, resource, sys
import numpy as np
from pathlib import Path
from server.heap import fix_mmap_threshold
fix_mmap_threshold()  # as the server does
from inference.backends.onnxruntime import OnnxRuntimeBackend
from inference.repository import ModelEntry

graph, arena_mib = sys.argv[1], int(sys.argv[2])
entry = ModelEntry("wide", 1, Path(graph), ("a",) * 64, "vgg16", (0.5,) * 3, (0.5,) * 3, 1,
                   "fp32", (128,))
backend = OnnxRuntimeBackend({"wide": entry}, threads=1, arena_bytes=arena_mib << 20)

def rss():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

rng = np.random.default_rng(0)
small = rng.integers(0, 256, (2, 3, 96, 128), dtype=np.uint8)
big = rng.integers(0, 256, (2, 3, 320, 427), dtype=np.uint8)
backend.run("wide", small)
base = rss()
before = faults()
first = backend.run("wide", small)["probs"]
repeat_faults = faults() - before
backend.run("wide", big)
after_big = rss()
last = backend.run("wide", small)["probs"]
print(json.dumps({"base": base, "after_big": after_big, "repeat_faults": repeat_faults,
                  "arena": backend.arena_bytes, "same": bool((first == last).all()),
                  "probs": first.tolist()}))
"""


@pytest.fixture(scope="module")
def wide_graph(tmp_path_factory):
    """Two 3x3 convolutions of 64 channels: activations of 64 fp32 per pixel, as VGG's first."""
    rng = np.random.default_rng(1)
    weights = [
        numpy_helper.from_array(rng.normal(0, 0.1, (WIDE, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.05, (WIDE, WIDE, 3, 3)).astype(np.float32), "w2"),
    ]
    image = helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 3, "H", "W"])
    probs = helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", WIDE])
    nodes = [
        helper.make_node("Cast", ["image"], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("Conv", ["pixels", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("ReduceMean", ["c2"], ["means"], axes=[2, 3], keepdims=0),
        helper.make_node("Softmax", ["means"], ["probs"], axis=1),
    ]
    graph = helper.make_graph(nodes, "wide", [image], [probs], initializer=weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path_factory.mktemp("wide") / "model.onnx"
    onnx.save(model, path)
    return path


def probe_arena(graph, arena_mib: int) -> dict:
    """The probe in a process of its own: the arena is ONNX Runtime's, one per process."""
    out = subprocess.run(
        [sys.executable, "-c", ARENA_PROBE, str(graph), str(arena_mib)],
        cwd=REPOSITORY_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(out.stdout.splitlines()[-1])


def test_kept_arena_reuses_its_pages_and_returns_what_a_larger_run_borrowed(wide_graph):
    # One activation of the small batch: 2 x 64 x 96 x 128 fp32 = 6 MiB, 1536 pages of 4 KiB;
    # the run's activations fit the 16 MiB kept. The big batch's are 2 x 64 x 320 x 427 fp32
    # = 67 MiB each, more than the kept region: the run borrows and gives back.
    activation_pages = 2 * WIDE * 96 * 128 * 4 // 4096
    kept = probe_arena(wide_graph, 16)
    none = probe_arena(wide_graph, 0)
    assert kept["arena"] == 16 << 20 and none["arena"] == 0
    # Without an arena each run page-faults its activations afresh (two live at once); with it
    # a repeated run touches mapped pages: well under one activation's pages.
    assert none["repeat_faults"] > activation_pages
    assert kept["repeat_faults"] < activation_pages / 4
    # After the big run resident memory is back within the kept 16 MiB plus 8 MiB for Python's
    # own allocations, far below the 134 MiB of the big run's two live activations.
    assert kept["after_big"] - kept["base"] < (16 + 8) << 20
    # The arena changes where buffers live, not the arithmetic: bit for bit the same posteriors.
    assert kept["same"] and kept["probs"] == none["probs"]


def test_arena_budget_is_two_views_at_the_largest_scale(wide_graph, tiny_graph):
    wide = ModelEntry(
        "wide",
        1,
        wide_graph,
        ("a",) * WIDE,
        "vgg16",
        (0.5,) * 3,
        (0.5,) * 3,
        1,
        "fp32",
        (256, 384, 512),
    )
    # 2.5 live activations of 64 fp32 per pixel, over two 512 x 683 views.
    assert engine.arena_budget({"wide": wide}) == int(2.5 * 64 * 2 * 512 * 683 * 4)
    # A graph without convolutions: the image's 3 channels.
    assert engine.first_conv_width(tiny_graph) == 3
