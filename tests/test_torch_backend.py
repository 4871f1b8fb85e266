"""``--backend torch``: the module read back from model.onnx against ONNX Runtime, on the same files.

CPU tests run everywhere (fp32 eager, bf16, dynamic-shape compilation through dynamo and
Inductor: padding, warm-up, eager fallbacks); the CUDA ones (bf16 vs fp32, inductor with CUDA
graphs) run where a GPU is visible.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import sys
from dataclasses import fields

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from fastapi.testclient import TestClient

from inference import Classifier, ClassifyOptions, decode_image, read_repository
from inference.backends.onnx_reader import GraphNotReadable, read_serving_module
from inference.backends.serving_module import ServingModule
from inference.backends.torch import (
    COMPILE_MODES,
    DTYPES,
    ServingStats,
    TorchBackend,
    load_modules,
    resolve_compile,
    resolve_dtype,
)
from inference.batching import MicroBatcher, padded_batch_sizes
from inference.protocol import dense_batch
from server.engine import StartupError, warmup_shapes
from server.main import create_app
from server.metrics import Metrics
from server.settings import Settings
from testkit import REPOSITORY_ROOT as ROOT
from testkit.images import jpeg, smooth_image
from testkit.models import export_random_model
from testkit.processes import run_server_command
from testkit.tolerances import largest_score, posterior_bound, score_bound

# (N, 3, H, W): square at the crop, 3:4 and 4:3 with flips, an odd pair, a batch of 3.
SHAPES = [(1, 3, 64, 64), (2, 3, 64, 85), (2, 3, 128, 96), (2, 3, 101, 77), (3, 3, 96, 128)]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def relative_error(actual: np.ndarray, reference: np.ndarray) -> float:
    return float(np.max(np.abs(actual - reference)) / np.max(np.abs(reference)))


# PyTorch and ONNX Runtime run the same graph in fp32 with their own summation orders: scores
# agree within testkit.tolerances' score bound (relative to the largest score), posteriors
# within its posterior bound. bf16 and fp16 round weights and activations to 8 and 11 bits
# (fp32 accumulators on CPUs): the same bounds with those unit roundoffs.


def assert_close(got: dict, expected_probs, expected_scores, module, precision="fp32") -> None:
    """``got``'s probs and scores against the expected ones, within the bounds for ``module``
    (a torch module with the graph's layers) run in ``precision``."""
    largest = float(np.abs(expected_scores).max())
    bound = posterior_bound(module, largest, precision)
    np.testing.assert_allclose(got["probs"], expected_probs, rtol=0, atol=bound)
    if "scores" in got:
        assert relative_error(got["scores"], expected_scores) < score_bound(module, precision)


def images(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def onnxruntime_outputs(path, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probs, scores = session.run(["probs", "scores"], {"image": batch})
    return probs, scores


def run(backend: TorchBackend, model: str, batch: np.ndarray, outputs=("probs", "scores")):
    return asyncio.run(backend.infer(model, batch, outputs))


@pytest.fixture(scope="module")
def eager(entries):
    backend = TorchBackend.from_models(entries, device="cpu", dtype="fp32", compile="off")
    yield backend
    asyncio.run(backend.close())


@pytest.fixture(scope="module")
def other_exports(tmp_path_factory):
    """Small exports the two-model repository lacks: A-LRN (fp32) and VGG-16 in fp16."""
    repository = tmp_path_factory.mktemp("other-exports") / "repo"
    sizes = {"width": 0.125, "fc_width": 64, "crop": 64, "num_classes": 5}
    for name, arch, precision in (("alrn", "A-LRN", "fp32"), ("d16half", "vgg16", "fp16")):
        export_random_model(repository, arch, name, 7, sizes, precision=precision)
    return repository


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("model", ["m16", "m19"])
def test_module_from_onnx_equals_onnxruntime(entries, eager, torch_models, model, shape):
    batch = images(shape, seed=sum(shape))
    probs, scores = onnxruntime_outputs(entries[model].onnx_path, batch)
    got = run(eager, model, batch)
    assert got["probs"].dtype == np.float32 and got["scores"].dtype == np.float32
    assert got["probs"].shape == probs.shape and got["scores"].shape == scores.shape
    assert_close(got, probs, scores, torch_models[model])
    assert np.ptp(probs) > 0.05  # far from uniform: the comparison means something


@pytest.mark.parametrize("name, precision", [("alrn", "fp32"), ("d16half", "fp16")])
def test_lrn_and_fp16_exports_are_read(other_exports, name, precision):
    # LRN is written by the exporter as a decomposition (pad, AveragePool, Pow): read back as
    # one LocalResponseNorm. fp16 weights run in fp32 here, ONNX Runtime runs them in fp16:
    # the two differ by fp16's rounding of the activations.
    path = other_exports / name / "1" / "model.onnx"
    module = read_serving_module(path)
    if name == "alrn":
        assert any(isinstance(layer, torch.nn.LocalResponseNorm) for layer in module.layers)
    for shape in SHAPES[1:3]:
        batch = images(shape)
        probs, scores = onnxruntime_outputs(path, batch)
        with torch.no_grad():
            got_probs, got_scores = (t.numpy() for t in module(torch.from_numpy(batch)))
        assert_close({"probs": got_probs, "scores": got_scores}, probs, scores, module, precision)


def test_only_the_requested_outputs_come_back(eager):
    batch = images((2, 3, 64, 85))
    assert set(run(eager, "m16", batch, ("probs",))) == {"probs"}
    assert set(run(eager, "m16", batch, ("scores",))) == {"scores"}
    with pytest.raises(ValueError, match="unknown outputs"):
        run(eager, "m16", batch, ("logits",))


def test_bf16_on_cpu_is_fp32_within_bf16_rounding(entries, eager, torch_models):
    # bf16 keeps 8 significant bits: scores within about 9% of the largest (measured 1.4%), a
    # wrong result is off by all of it.
    bf16 = TorchBackend.from_models(entries, device="cpu", dtype="bf16", compile="off")
    try:
        for shape in SHAPES[1:3]:
            batch = images(shape, seed=3)
            for model in entries:
                reference = run(eager, model, batch)
                got = run(bf16, model, batch)
                assert got["probs"].dtype == got["scores"].dtype == np.float32
                assert_close(
                    got, reference["probs"], reference["scores"], torch_models[model], "bf16"
                )
    finally:
        asyncio.run(bf16.close())


def test_compiled_with_dynamic_shapes_compiles_once_per_model(entries, eager, torch_models):
    # dynamo's own counting backend (no inductor: a CPU C++ build takes minutes) shows that new
    # H and W reuse one graph; batch 1 (which dynamo specialises) may add one more.
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    backend = TorchBackend.from_models(
        entries, device="cpu", dtype="fp32", compile="default", compile_backend=counter
    )
    try:
        for shape in [(2, 3, 64, 85), (2, 3, 128, 96), (2, 3, 101, 77), (2, 3, 64, 85)]:
            batch = images(shape, seed=5)
            for model in entries:
                got = run(backend, model, batch)
                reference = run(eager, model, batch)
                assert_close(got, reference["probs"], reference["scores"], torch_models[model])
        assert counter.frame_count == len(entries)  # one graph per model for every H, W
        assert backend.shapes_seen["m16"] == {(2, 3, 64, 85), (2, 3, 128, 96), (2, 3, 101, 77)}
        run(backend, "m16", images((1, 3, 64, 85)))
        assert counter.frame_count <= len(entries) + 1
    finally:
        asyncio.run(backend.close())


# --- compiled: padding, warm-up, no compile on the request path ---------------------------------
# dynamo's counting backend stands in for Inductor in most of these: the classes of shapes that
# recompile are decided by dynamo's guards, before any backend sees a graph, and it traces in a
# second where Inductor's C++ builds take minutes.


def counting_backend(entries, **options):
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    backend = TorchBackend.from_models(
        entries, device="cpu", dtype="fp32", compile="default", compile_backend=counter, **options
    )
    return backend, counter


def test_compiled_runs_are_padded_to_the_batch_sizes_and_sliced(entries, eager, torch_models):
    backend, counter = counting_backend(entries, batch_sizes=(1, 2, 4, 8))
    try:
        assert [backend.padded_size(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 9]
        for rows in (3, 5, 6):  # run at 4, 8, 8: the padding rows' results are dropped
            batch = images((rows, 3, 64, 85), seed=rows)
            got = run(backend, "m16", batch)
            assert got["probs"].shape == (rows, 10) and got["scores"].shape[0] == rows
            reference = run(eager, "m16", batch)
            assert_close(got, reference["probs"], reference["scores"], torch_models["m16"])
        assert backend.shapes_seen["m16"] == {(3, 3, 64, 85), (5, 3, 64, 85), (6, 3, 64, 85)}
        assert counter.frame_count == 1  # 4 and 8 rows: one graph with a dynamic batch size
    finally:
        asyncio.run(backend.close())


def test_after_warmup_an_uncompiled_shape_runs_eagerly_with_a_warning(
    entries, eager, torch_models, caplog
):
    backend, counter = counting_backend(entries)
    try:
        asyncio.run(backend.warmup({"m16": [(2, 3, 64, 85)]}))
        compiled = counter.frame_count
        # Other H and W of the warmed class run compiled, no new compile.
        run(backend, "m16", images((2, 3, 96, 128)))
        assert counter.frame_count == compiled and backend.stats.eager_shapes == 0
        # A batch of 1 is a class of its own (the compiler specialises a size of 1): refused on
        # the request path, run eagerly with the same numbers, said once.
        caplog.set_level(logging.WARNING, logger="inference.torch")
        batch = images((1, 3, 64, 85), seed=4)
        for _ in range(2):
            got = run(backend, "m16", batch)
            reference = run(eager, "m16", batch)
            assert_close(got, reference["probs"], reference["scores"], torch_models["m16"])
        assert counter.frame_count == compiled
        assert backend.stats == ServingStats(eager_shapes=1)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warnings == [
            "m16: batch shape (1, 3, 64, 85) runs eagerly (slower), as warm-up did not compile "
            "it (warm up its image size)"
        ]
    finally:
        asyncio.run(backend.close())


def test_a_single_view_batch_runs_the_compiled_code_whatever_its_strides(entries):
    # dense_batch without the flip is view[None]: stride 0 on the batch axis, which numpy and
    # torch call contiguous but dynamo's guards see; it must reach the warmed-up entry.
    backend, counter = counting_backend(entries)
    try:
        asyncio.run(backend.warmup({"m16": [(1, 3, 64, 85)]}))
        batch = dense_batch(smooth_image(85, 64, 0), 64, flip=False)
        assert batch.shape == (1, 3, 64, 85) and batch.strides[0] == 0
        run(backend, "m16", batch)
        assert backend.stats.eager_shapes == 0
    finally:
        asyncio.run(backend.close())


def test_past_the_recompile_limit_a_shape_runs_eagerly_not_an_error(
    entries, eager, torch_models, caplog
):
    # fullgraph=True raises FailOnRecompileLimitHit at the limit: that must become an eager run.
    backend, counter = counting_backend(entries, recompile_limit=1)
    caplog.set_level(logging.WARNING, logger="inference.torch")
    try:
        asyncio.run(backend.warmup({"m16": [(2, 3, 64, 85), (1, 3, 64, 85)]}))
        assert counter.frame_count == 1
        assert backend.stats.eager_shapes == 1
        assert "(1, 3, 64, 85) runs eagerly (slower), as it would pass the recompile limit" in (
            caplog.text
        )
        batch = images((1, 3, 85, 64), seed=6)  # also past the limit, on the request path
        got = run(backend, "m16", batch)
        reference = run(eager, "m16", batch)
        assert_close(got, reference["probs"], reference["scores"], torch_models["m16"])
        assert backend.stats.eager_shapes == 2
    finally:
        asyncio.run(backend.close())


def test_warmup_compiles_every_batch_the_server_makes(two_model_repository, entries):
    # The server's warm-up for its settings, then the traffic it serves: flips on and off, dense,
    # multi-crop and both, portrait and landscape, joined by micro-batching into runs of 1 to 4
    # views. Scales 64 (the crop: score maps 1 high or wide) and 96 (2x2 and up).
    repo, _ = two_model_repository
    settings = Settings(repository=repo, scales=(64, 96), max_batch=4)
    sizes = padded_batch_sizes(settings.max_batch)
    assert sizes == (1, 2, 4, 25, 50)
    shapes = warmup_shapes(settings, entries, sizes, batching=True)
    expected_dense = {(n, 3, h, w) for n in (1, 2, 4) for h, w in ((64, 85), (96, 128))}
    expected_dense |= {(n, 3, w, h) for n, _, h, w in expected_dense}
    for model in entries:
        assert set(shapes[model]) == expected_dense | {(25, 3, 64, 64), (50, 3, 64, 64)}
    backend, counter = counting_backend(entries, batch_sizes=sizes)

    async def serve():
        await backend.warmup(shapes)
        compiled = counter.frame_count
        classifier = Classifier(MicroBatcher(backend, max_delay=0.05, max_batch=4), entries)
        requests = [
            (
                smooth_image(width, height, seed),
                ClassifyOptions(scales=(64, 96), flip=flip, mode=mode),
            )
            for seed, (width, height) in enumerate([(640, 480), (480, 640), (800, 600), (300, 400)])
            for flip in (True, False)
            for mode in ("dense", "multicrop", "both")
        ]
        await asyncio.gather(*(classifier.classify(image, opts) for image, opts in requests))
        return compiled

    compiled = asyncio.run(serve())
    try:
        # A run of 3 views, as micro-batching joins when three arrive together (whether they
        # did above depends on timing): padded to 4, it compiles nothing either.
        backend.run("m16", np.zeros((3, 3, 64, 85), np.uint8))
        assert counter.frame_count == compiled, "a request compiled"
        assert backend.stats.eager_shapes == 0, "a request's batch shape was not warmed up"
        seen = set().union(*backend.shapes_seen.values())
        assert {n for n, *_ in seen} >= {1, 2, 3, 4, 25, 50}
    finally:
        asyncio.run(backend.close())


def test_compiled_warmup_without_sizes_warms_the_common_photo_orientations(two_model_repository):
    # Nothing compiles after warm-up, so a compiled server always warms something up; an eager
    # one has nothing to compile and starts at once.
    repo, _ = two_model_repository
    entries = read_repository(repo, ["m16"])
    settings = Settings(repository=repo, scales=(96,))
    eager_shapes = warmup_shapes(settings, entries)
    assert eager_shapes == {"m16": []}
    compiled_shapes = warmup_shapes(settings, entries, padded_batch_sizes())
    # 640x480 and 480x640 at Q=96: 128x96 and 96x128; batches of 1 and 2; 25 and 50 crops.
    assert compiled_shapes == {
        "m16": [
            (1, 3, 96, 128),
            (1, 3, 128, 96),
            (2, 3, 96, 128),
            (2, 3, 128, 96),
            (25, 3, 64, 64),
            (50, 3, 64, 64),
        ]
    }
    given = Settings(repository=repo, scales=(96,), torch_warmup=((320, 240),))
    assert warmup_shapes(given, entries) == {"m16": [(2, 3, 96, 128)]}


def tiny_serving_module(seed: int = 0) -> ServingModule:
    """A 3-conv fully convolutional net of the ServingModule's form (16-pixel crop, 5 classes)."""
    torch.manual_seed(seed)
    layers = [
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2, 2),
        torch.nn.Conv2d(4, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2, 2),
        torch.nn.Conv2d(8, 5, 4),
    ]
    return ServingModule(torch.full((3, 1, 1), 4 / 255), torch.full((3, 1, 1), -2.0), layers)


def test_inductor_on_the_cpu_serves_warmed_shapes_compiled_and_equal_to_eager(caplog):
    # The production compiler (Inductor, C++ kernels on the CPU) on a tiny net: the warm-up
    # compiles, requests of other H and W and padded batch sizes reuse it, and the numbers are
    # eager's within fp32 rounding: a 3-layer net of at most 72 products per output, each
    # rounded at 2**-24 relative, so 1e-5 of the largest score is a generous bound.
    from torch._dynamo.utils import counters

    modules = {"tiny": tiny_serving_module()}
    eager = TorchBackend(modules, device="cpu", compile="off")
    compiled = TorchBackend(
        {"tiny": tiny_serving_module()}, device="cpu", compile="default", batch_sizes=(2, 4)
    )
    caplog.set_level(logging.WARNING, logger="inference.torch")
    try:
        asyncio.run(compiled.warmup([(2, 3, 32, 40), (4, 3, 32, 40)]))
        graphs = counters["stats"]["unique_graphs"]
        for shape in [(2, 3, 48, 40), (3, 3, 40, 56), (4, 3, 36, 36)]:
            batch = images(shape, seed=shape[2])
            got = run(compiled, "tiny", batch)
            reference = run(eager, "tiny", batch)
            largest = float(np.abs(reference["scores"]).max())
            np.testing.assert_allclose(got["scores"], reference["scores"], atol=1e-5 * largest)
            np.testing.assert_allclose(got["probs"], reference["probs"], atol=1e-5 * largest)
            assert got["scores"].flags["C_CONTIGUOUS"]
        assert counters["stats"]["unique_graphs"] == graphs, "a request compiled"
        assert compiled.stats == ServingStats() and "eagerly" not in caplog.text
    finally:
        asyncio.run(eager.close())
        asyncio.run(compiled.close())


def test_metrics_read_the_torch_backends_counts():
    metrics = Metrics()
    stats = ServingStats()
    metrics.watch_torch(stats)
    stats.cuda_graphs, stats.cuda_graph_bytes, stats.eager_shapes = 12, 3 * 2**20, 2
    exposed = prometheus_text(metrics)
    assert "vggserve_torch_cuda_graphs 12.0" in exposed
    assert "vggserve_torch_cuda_graph_memory_bytes 3.145728e+06" in exposed
    assert "vggserve_torch_eager_shapes 2.0" in exposed


def prometheus_text(metrics: Metrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.registry).decode()


def test_warmup_runs_every_model_at_every_shape(entries):
    backend = TorchBackend.from_models(entries, device="cpu", compile="off")
    try:
        seconds = asyncio.run(backend.warmup([(2, 3, 64, 85), (2, 3, 85, 64)]))
        assert seconds > 0
        for model in entries:
            assert backend.shapes_seen[model] == {(2, 3, 64, 85), (2, 3, 85, 64)}
    finally:
        asyncio.run(backend.close())


def test_cpu_defaults_are_fp32_eager(entries):
    backend = TorchBackend(load_modules(entries))
    try:
        if not torch.cuda.is_available():
            assert (backend.device.type, backend.dtype, backend.compile_mode) == (
                "cpu",
                torch.float32,
                "off",
            )
        assert backend.describe().startswith("torch backend on ")
    finally:
        asyncio.run(backend.close())


def test_server_flag_choices_are_what_the_backend_resolves():
    choices = {item.name: item.metadata["flag"].choices for item in fields(Settings)}
    cpu = torch.device("cpu")
    assert {resolve_dtype(name, cpu) for name in choices["torch_dtype"]} == set(DTYPES.values())
    assert {resolve_compile(mode, cpu) for mode in choices["torch_compile"]} == set(COMPILE_MODES)


# --- graphs the backend refuses -----------------------------------------------------------------


@pytest.fixture(scope="module")
def int8_graph(entries, tmp_path_factory) -> tuple:
    """m16 quantised to int8 QDQ with ONNX Runtime's quantize_static (per-channel)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Calibration(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"image": images((1, 3, 64, 64), seed=i)} for i in range(2)])

        def get_next(self):
            return next(self.batches, None)

    path = tmp_path_factory.mktemp("int8") / "model.onnx"
    quantize_static(
        str(entries["m16"].onnx_path),
        str(path),
        Calibration(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        weight_type=QuantType.QInt8,
    )
    return path


def test_int8_qdq_graph_is_refused_with_what_to_do(int8_graph):
    with pytest.raises(GraphNotReadable) as info:
        read_serving_module(int8_graph)
    message = str(info.value)
    assert "int8 quantised graph" in message and "QuantizeLinear" in message
    assert "--backend onnxruntime" in message and str(int8_graph) in message


def test_unknown_op_is_refused_naming_the_node(entries, tmp_path):
    model = onnx.load(str(entries["m16"].onnx_path))
    relu = next(node for node in model.graph.node if node.op_type == "Relu")
    relu.op_type = "LeakyRelu"
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    with pytest.raises(GraphNotReadable, match=rf"node '{relu.name}' \(LeakyRelu\) is not an op"):
        read_serving_module(path)


def test_a_damaged_file_is_refused(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"not a protobuf at all")
    with pytest.raises(GraphNotReadable, match="cannot read"):
        read_serving_module(path)


# The app refuses these while it is created: python -m server prints the StartupError as its one
# line and exits 2 (that path is tested as a process in test_server.py), so the app is built here.


def test_server_refuses_to_start_on_an_int8_graph(two_model_repository, int8_graph, tmp_path):
    repo, _ = two_model_repository
    shutil.copytree(repo / "m16", tmp_path / "repo" / "m16")
    shutil.copy(int8_graph, tmp_path / "repo" / "m16" / "1" / "model.onnx")
    with pytest.raises(StartupError) as refused:
        create_app(Settings(repository=tmp_path / "repo", backend="torch"))
    message = str(refused.value)
    assert message.startswith("--backend torch cannot run ") and "\n" not in message
    assert "int8 quantised graph" in message and "--backend onnxruntime" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_server_without_cuda_refuses_torch_device_cuda(two_model_repository):
    repo, _ = two_model_repository
    with pytest.raises(StartupError) as refused:
        create_app(Settings(repository=repo, backend="torch", torch_device="cuda"))
    message = str(refused.value)
    assert message.startswith("--torch-device 'cuda': no CUDA device is visible"), message
    assert "\n" not in message


def test_bad_warmup_sizes_are_refused():
    result = run_server_command("--backend", "torch", "--torch-warmup", "640by480")
    assert result.returncode == 2
    assert "WIDTHxHEIGHT" in result.stderr


def test_onnxruntime_server_never_imports_torch(two_model_repository):
    repo, _ = two_model_repository
    code = (
        "import sys; from server.main import create_app; from server.settings import Settings; "
        f"create_app(Settings(repository={str(repo)!r})); "
        "print(sorted(m for m in ('torch', 'onnx') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --- the HTTP front end on --backend torch ------------------------------------------------------


def test_server_on_torch_answers_like_onnxruntime(two_model_repository, caplog):
    repo, torch_models = two_model_repository
    data = jpeg(320, 240, seed=11)
    params = {"scales": "64,96,128", "heatmap": "true", "top_k": 10}
    bodies = {}
    caplog.set_level(logging.INFO, logger="server")
    for backend in ("onnxruntime", "torch"):
        warmup = ((320, 240),) if backend == "torch" else ()
        settings = Settings(repository=repo, backend=backend, torch_warmup=warmup)
        caplog.clear()
        with TestClient(create_app(settings)) as client:
            response = client.post(
                "/v1/classify", params=params, files={"file": ("i.jpg", data, "image/jpeg")}
            )
            assert response.status_code == 200, response.text
            bodies[backend] = response.json()
            models = client.get("/v1/models").json()
            exposed = client.get("/metrics").text
            log = caplog.text
        if backend == "torch":
            assert all(m["backend"] == "torch" for m in models["models"])
            assert "torch backend on cpu, fp32, compile off" in log
            # Eager: the batch of 2 views at each of the 3 scales, for each model.
            assert "torch warm-up of 6 (model, batch shape) pairs" in log
            assert "vggserve_torch_cuda_graphs 0.0" in exposed
            assert "vggserve_torch_eager_shapes 0.0" in exposed
    ort_body, torch_body = bodies["onnxruntime"], bodies["torch"]
    image = decode_image(data)
    views = [dense_batch(image, q) for q in (64, 96, 128)]
    graphs = [repo / name / "1" / "model.onnx" for name in torch_models]
    bound = posterior_bound(torch_models.values(), largest_score(graphs, views))
    for name in ("m16", "m19"):
        expected = {p["index"]: p["probability"] for p in ort_body["per_model"][name]}
        got = {p["index"]: p["probability"] for p in torch_body["per_model"][name]}
        assert got.keys() == expected.keys()
        np.testing.assert_allclose(
            [got[i] for i in expected], list(expected.values()), rtol=0, atol=bound
        )
    assert [p["index"] for p in torch_body["predictions"]] == [
        p["index"] for p in ort_body["predictions"]
    ]
    assert torch_body["heatmap"]["index"] == ort_body["heatmap"]["index"]
    heat_torch = np.asarray(torch_body["heatmap"]["scores"])
    heat_ort = np.asarray(ort_body["heatmap"]["scores"])
    # The heatmap is a mean of score maps: relative to its own largest value it can be off by
    # more than the maps are relative to theirs, so the bound is taken from the maps' scale.
    largest = largest_score(graphs, views[-1:])
    assert np.abs(heat_torch - heat_ort).max() < score_bound(torch_models.values()) * largest


# --- CUDA only ----------------------------------------------------------------------------------


@needs_cuda
def test_cuda_fp32_equals_onnxruntime_and_bf16_within_1e2(entries):
    fp32 = TorchBackend.from_models(entries, device="cuda", dtype="fp32", compile="off")
    bf16 = TorchBackend.from_models(entries, device="cuda", dtype="bf16", compile="off")
    try:
        for shape in SHAPES:
            batch = images(shape, seed=9)
            for model, entry in entries.items():
                probs, scores = onnxruntime_outputs(entry.onnx_path, batch)
                exact = run(fp32, model, batch)
                # cuDNN sums in another order than the CPU (TF32 is off): 1e-4, not 1e-5.
                np.testing.assert_allclose(exact["probs"], probs, rtol=0, atol=1e-4)
                assert relative_error(exact["scores"], scores) < 1e-4
                half = run(bf16, model, batch, ("probs",))["probs"]
                np.testing.assert_allclose(half, exact["probs"], rtol=0, atol=1e-2)
    finally:
        asyncio.run(fp32.close())
        asyncio.run(bf16.close())


@needs_cuda
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_cuda_compile_reuses_its_graph_across_shapes(entries, mode):
    from torch._dynamo.utils import counters

    eager = TorchBackend.from_models(entries, device="cuda", dtype="bf16", compile="off")
    compiled = TorchBackend.from_models(
        entries, device="cuda", dtype="bf16", compile=mode, batch_sizes=(2, 4)
    )
    try:
        before = counters["stats"]["unique_graphs"]
        # Score maps of at least 2x2: Inductor specialises a size of 1 (a 64-pixel side here).
        a, b, c = (2, 3, 96, 128), (2, 3, 128, 96), (2, 3, 160, 224)
        asyncio.run(compiled.warmup([a, b, (4, 3, 96, 128)]))
        compiled_graphs = counters["stats"]["unique_graphs"] - before
        captured = 3 * len(entries) if mode == "reduce-overhead" else 0
        assert compiled.stats.cuda_graphs == captured
        assert (compiled.stats.cuda_graph_bytes > 0) == (captured > 0)
        # Warmed shapes replay their graphs; c runs compiled without one; 3 rows run padded to
        # the warmed batch of 4.
        for shape in [a, b, a, c, c, (3, 3, 96, 128), b]:
            batch = images(shape, seed=2)
            for model in entries:
                got = run(compiled, model, batch, ("probs", "scores"))
                reference = run(eager, model, batch, ("probs", "scores"))
                np.testing.assert_allclose(got["probs"], reference["probs"], rtol=0, atol=1e-2)
                assert got["scores"].shape == reference["scores"].shape
        assert counters["stats"]["unique_graphs"] - before == compiled_graphs, (
            "a request compiled (see TORCH_LOGS=recompiles)"
        )
        assert compiled.stats.cuda_graphs == captured and compiled.stats.eager_shapes == 0
    finally:
        asyncio.run(eager.close())
        asyncio.run(compiled.close())
