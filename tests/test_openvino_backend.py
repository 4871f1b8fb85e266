"""``--backend openvino``: OpenVINO Runtime on the same model.onnx, against ONNX Runtime.

fp32 against ONNX Runtime on the same files (dense batches at several sizes, with and without
flips), bf16 against fp32 where the CPU computes bf16, an int8 QDQ graph run in int8, the HTTP
API on the backend, and the graphs and settings it refuses.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import sys
from dataclasses import fields

import numpy as np
import onnxruntime as ort
import openvino as ov  # a dependency: make venv installs it
import pytest
from fastapi.testclient import TestClient

from export.quantize import quantize_int8
from inference import decode_image
from inference.backends.openvino import (
    PRECISIONS,
    GraphNotLoadable,
    OpenVinoBackend,
    native_bf16,
    read_graph,
    resolve_precision,
)
from inference.protocol import dense_batch
from server.engine import StartupError
from server.main import create_app
from server.settings import Settings
from testkit.images import jpeg
from testkit.tolerances import largest_score, posterior_bound, score_bound

# (N, 3, H, W): square at the crop, 3:4 and 4:3 with flips, an odd pair, a batch of 3.
SHAPES = [(1, 3, 64, 64), (2, 3, 64, 85), (2, 3, 128, 96), (2, 3, 101, 77), (3, 3, 96, 128)]
CAPABILITIES = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
needs_bf16 = pytest.mark.skipif(
    "BF16" not in CAPABILITIES,
    reason=f"this CPU has no native bf16 (OpenVINO's CPU capabilities: {CAPABILITIES})",
)


def images(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def dense_batches() -> list[np.ndarray]:
    """What the server runs for two photos at Q = 64, 96, 128, with and without the flip."""
    photos = [decode_image(jpeg(320, 240, seed=4)), decode_image(jpeg(150, 200, seed=5))]
    return [
        dense_batch(photo, q, flip) for photo in photos for q in (64, 96, 128) for flip in (1, 0)
    ]


def onnxruntime_outputs(path, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probs, scores = session.run(["probs", "scores"], {"image": batch})
    return probs, scores


def relative_error(actual: np.ndarray, reference: np.ndarray) -> float:
    return float(np.max(np.abs(actual - reference)) / np.max(np.abs(reference)))


def run(backend: OpenVinoBackend, model: str, batch: np.ndarray, outputs=("probs", "scores")):
    return asyncio.run(backend.infer(model, batch, outputs))


# OpenVINO and ONNX Runtime run the same graph in fp32 with their own summation orders: scores
# agree within testkit.tolerances' score bound (relative to the largest score, 1.6e-5 and 1.9e-5
# for the small VGG-16 and VGG-19), posteriors within its posterior bound (half the score bound
# times the largest score, plus the soft-max's rounding: about 1e-5 for these models, the
# figure --backend openvino promises). bf16 keeps 8 significant bits with fp32 accumulation:
# the same bounds with bf16's unit roundoff for weights and activations.


def assert_close(got: dict, probs, scores, module, precision: str = "fp32") -> None:
    """``got``'s probs and scores against the expected ones, within the bounds for ``module``
    run in ``precision``."""
    bound = posterior_bound(module, float(np.abs(scores).max()), precision)
    np.testing.assert_allclose(got["probs"], probs, rtol=0, atol=bound)
    assert relative_error(got["scores"], scores) < score_bound(module, precision)


@pytest.fixture(scope="module")
def fp32(entries):
    backend = OpenVinoBackend(entries, precision="fp32")
    yield backend
    asyncio.run(backend.close())


@pytest.mark.parametrize("model", ["m16", "m19"])
def test_fp32_equals_onnxruntime_on_dense_batches(entries, fp32, torch_models, model):
    batches = [images(shape, seed=sum(shape)) for shape in SHAPES] + dense_batches()
    assert {batch.shape[0] for batch in batches} == {1, 2, 3}  # with and without flips
    for batch in batches:
        probs, scores = onnxruntime_outputs(entries[model].onnx_path, batch)
        got = run(fp32, model, batch)
        assert got["probs"].dtype == got["scores"].dtype == np.float32
        assert got["probs"].shape == probs.shape and got["scores"].shape == scores.shape
        assert_close(got, probs, scores, torch_models[model])
        # Far from uniform (a thousand times the bound): the comparison means something.
        assert np.ptp(probs) > 0.01


def test_fp32_is_exact_even_where_the_cpu_defaults_to_bf16(fp32):
    # OpenVINO's CPU plugin runs bf16 by default where the CPU has it: fp32 must be asked for.
    for compiled in fp32.compiled.values():
        assert compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
        assert str(compiled.get_property("PERFORMANCE_HINT")) == "LATENCY"
    assert fp32.describe().startswith("openvino ") and ", fp32, " in fp32.describe()


def test_only_the_requested_outputs_come_back(fp32):
    batch = images((2, 3, 64, 85))
    assert set(run(fp32, "m16", batch, ("probs",))) == {"probs"}
    assert set(run(fp32, "m16", batch, ("scores",))) == {"scores"}
    with pytest.raises(ValueError, match="unknown outputs"):
        run(fp32, "m16", batch, ("logits",))
    with pytest.raises(KeyError, match="unknown model 'm11'; served: m16, m19"):
        run(fp32, "m11", batch)


def test_outputs_of_one_run_survive_the_next(fp32):
    # An infer request reuses its buffers: what a run returned must not change under the next.
    first = run(fp32, "m16", images((2, 3, 64, 85), seed=1))
    kept = {name: array.copy() for name, array in first.items()}
    run(fp32, "m16", images((2, 3, 64, 85), seed=2))
    for name in kept:
        np.testing.assert_array_equal(first[name], kept[name])


def test_concurrent_requests_each_get_their_own_answer(entries, fp32):
    batches = [images((2, 3, 64, 85), seed=seed) for seed in range(6)]

    async def all_at_once():
        return await asyncio.gather(*(fp32.infer("m19", batch) for batch in batches))

    for batch, got in zip(batches, asyncio.run(all_at_once()), strict=True):
        np.testing.assert_array_equal(got["probs"], run(fp32, "m19", batch, ("probs",))["probs"])


# --- precision ----------------------------------------------------------------------------------


class FakeCore:
    """An ov.Core stand-in reporting ``capabilities`` for the CPU."""

    def __init__(self, capabilities: list[str]) -> None:
        self.capabilities = capabilities

    def get_property(self, device: str, name: str):
        assert (device, name) == ("CPU", "OPTIMIZATION_CAPABILITIES")
        return self.capabilities


def test_auto_is_bf16_exactly_where_the_cpu_reports_bf16():
    assert resolve_precision("auto", FakeCore(["FP32", "INT8", "BF16"])) == "bf16"
    assert resolve_precision("auto", FakeCore(["FP32", "INT8"])) == "fp32"
    assert resolve_precision("auto") == ("bf16" if "BF16" in CAPABILITIES else "fp32")
    assert native_bf16() == ("BF16" in CAPABILITIES)
    assert resolve_precision("fp32", FakeCore(["FP32", "INT8", "BF16"])) == "fp32"


def test_bf16_on_a_cpu_without_it_is_refused_with_what_to_do():
    with pytest.raises(ValueError) as refused:
        resolve_precision("bf16", FakeCore(["FP32", "INT8"]))
    message = str(refused.value)
    assert "no native bf16" in message and "FP32, INT8" in message and "use fp32" in message
    with pytest.raises(ValueError, match="must be one of auto, fp32, bf16, got 'fp16'"):
        resolve_precision("fp16")


def test_server_flag_choices_are_the_backend_precisions():
    choices = {item.name: item.metadata["flag"].choices for item in fields(Settings)}
    assert choices["openvino_precision"] == PRECISIONS
    assert "openvino" in choices["backend"]


@needs_bf16
def test_bf16_is_fp32_within_bf16_rounding(entries, fp32, torch_models):
    # Measured: scores within about 1.2% of the largest, posteriors within 1.1e-3; the bound
    # (bf16's 8 bits, fp32 accumulation) allows about 9% and 5e-2; a wrong result is off by all.
    bf16 = OpenVinoBackend(entries, precision="bf16")
    try:
        for compiled in bf16.compiled.values():
            assert compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.bf16
        for batch in dense_batches()[:4] + [images((2, 3, 101, 77), seed=3)]:
            for model in entries:
                reference = run(fp32, model, batch)
                got = run(bf16, model, batch)
                assert got["probs"].dtype == got["scores"].dtype == np.float32
                assert_close(
                    got, reference["probs"], reference["scores"], torch_models[model], "bf16"
                )
                # bf16 rounding shows: it really is not the fp32 graph.
                assert np.abs(got["scores"] - reference["scores"]).max() > 0
    finally:
        asyncio.run(bf16.close())


# --- int8 ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def int8_graph(entries, tmp_path_factory):
    """m16 quantised to int8 QDQ by the exporter's own quantiser, calibrated on four photos."""
    folder = tmp_path_factory.mktemp("openvino-int8")
    files = []
    for seed in range(4):
        path = folder / f"{seed}.jpg"
        path.write_bytes(jpeg(96, 80, seed=seed))
        files.append(path)
    path = folder / "model.onnx"
    path.write_bytes(quantize_int8(entries["m16"].onnx_path.read_bytes(), files, (64,)))
    return path


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_int8_qdq_graph_runs_in_int8(int8_graph, entries, precision):
    core = ov.Core()
    backend = OpenVinoBackend({"q": read_graph(core, int8_graph)}, precision=precision)
    try:
        runtime = backend.compiled["q"].get_runtime_model()
        kinds = collections.Counter(
            tuple(op.get_rt_info()[key].astype(str) for key in ("layerType", "runtimePrecision"))
            for op in runtime.get_ops()
        )
        convolutions = {kind: n for kind, n in kinds.items() if kind[0] == "Convolution"}
        assert convolutions == {("Convolution", "u8"): 16}  # every conv of VGG-16, in 8 bits
        int8 = ort.InferenceSession(str(int8_graph), providers=["CPUExecutionProvider"])
        for batch in dense_batches()[:4]:
            (expected,) = int8.run(["probs"], {"image": batch})
            fp32, _ = onnxruntime_outputs(entries["m16"].onnx_path, batch)
            got = run(backend, "q", batch, ("probs",))["probs"]
            # The two engines may round a requantisation differently, but they run one int8
            # graph: closer to each other than ONNX Runtime's int8 is to fp32, same top-1.
            assert np.abs(got - expected).max() < np.abs(expected - fp32).max()
            np.testing.assert_array_equal(got.argmax(axis=1), expected.argmax(axis=1))
    finally:
        asyncio.run(backend.close())


# --- graphs and starts refused ------------------------------------------------------------------


def test_a_damaged_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"not a protobuf at all")
    with pytest.raises(GraphNotLoadable) as refused:
        read_graph(ov.Core(), path)
    message = str(refused.value)
    assert message.startswith(f"OpenVINO cannot read {path} (") and "\n" not in message


def test_a_missing_file_is_refused_naming_it(tmp_path):
    with pytest.raises(GraphNotLoadable, match="model.onnx: no such file; export the model"):
        read_graph(ov.Core(), tmp_path / "model.onnx")


def test_a_graph_without_the_served_outputs_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["image"], ["out"])],
        "other",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 8, 8])],
    )
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(GraphNotLoadable, match="not a vggserve export.*outputs found: out"):
        read_graph(ov.Core(), path)


def test_server_refuses_to_start_on_a_damaged_graph(two_model_repository, tmp_path):
    import shutil

    repo, _ = two_model_repository
    shutil.copytree(repo / "m16", tmp_path / "repo" / "m16")
    (tmp_path / "repo" / "m16" / "1" / "model.onnx").write_bytes(b"\x08\x07garbage")
    with pytest.raises(StartupError) as refused:
        create_app(Settings(repository=tmp_path / "repo", backend="openvino"))
    message = str(refused.value)
    assert message.startswith("--backend openvino cannot run OpenVINO cannot read ")
    assert "m16/1/model.onnx" in message and "\n" not in message


def test_server_without_openvino_says_what_to_install(two_model_repository, monkeypatch):
    repo, _ = two_model_repository
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    monkeypatch.delitem(sys.modules, "inference.backends.openvino")
    with pytest.raises(StartupError) as refused:
        create_app(Settings(repository=repo, backend="openvino"))
    message = str(refused.value)
    assert message.startswith("--backend openvino needs OpenVINO Runtime")
    assert "pip install 'openvino>=2026.4,<2027'" in message


# --- the HTTP front end on --backend openvino ---------------------------------------------------


def test_server_on_openvino_answers_like_onnxruntime(two_model_repository, caplog):
    repo, torch_models = two_model_repository
    data = jpeg(320, 240, seed=11)
    params = {"scales": "64,96,128", "heatmap": "true", "top_k": 10}
    bodies = {}
    caplog.set_level(logging.INFO, logger="server")
    for backend in ("onnxruntime", "openvino"):
        settings = Settings(repository=repo, backend=backend, openvino_precision="fp32")
        caplog.clear()
        with TestClient(create_app(settings)) as client:
            response = client.post(
                "/v1/classify", params=params, files={"file": ("i.jpg", data, "image/jpeg")}
            )
            assert response.status_code == 200, response.text
            bodies[backend] = response.json()
            models = client.get("/v1/models").json()
            log = caplog.text
        if backend == "openvino":
            assert {m["backend"] for m in models["models"]} == {"openvino"}
            assert "backend on the CPU, fp32" in log
    ort_body, openvino_body = bodies["onnxruntime"], bodies["openvino"]
    image = decode_image(data)
    views = [dense_batch(image, q) for q in (64, 96, 128)]
    graphs = [repo / name / "1" / "model.onnx" for name in torch_models]
    # Means over flips, scales and models never exceed the largest posterior error.
    bound = posterior_bound(torch_models.values(), largest_score(graphs, views))
    for name in ("m16", "m19"):
        expected = {p["index"]: p["probability"] for p in ort_body["per_model"][name]}
        got = {p["index"]: p["probability"] for p in openvino_body["per_model"][name]}
        assert got.keys() == expected.keys()
        np.testing.assert_allclose(
            [got[i] for i in expected], list(expected.values()), rtol=0, atol=bound
        )
    fused = {p["index"]: p["probability"] for p in ort_body["predictions"]}
    got = {p["index"]: p["probability"] for p in openvino_body["predictions"]}
    assert got.keys() == fused.keys()
    np.testing.assert_allclose([got[i] for i in fused], list(fused.values()), rtol=0, atol=bound)
    assert openvino_body["heatmap"]["index"] == ort_body["heatmap"]["index"]
    heat = np.asarray(openvino_body["heatmap"]["scores"])
    heat_ort = np.asarray(ort_body["heatmap"]["scores"])
    # The heatmap is a mean of score maps: bounded on the maps' own scale.
    largest = largest_score(graphs, views[-1:])
    assert np.abs(heat - heat_ort).max() < score_bound(torch_models.values()) * largest


def test_triton_openvino_config_describes_what_openvino_reads(entries):
    # Triton's openvino backend checks the config's inputs and outputs against the model it
    # reads: the exported model.onnx as OpenVINO sees it must match them (batch dimension first).
    from tritonclient.grpc import model_config_pb2

    from export.repository import ModelInfo, model_config

    entry = entries["m16"]
    info = ModelInfo("m16", len(entry.labels), entry.mean, entry.std, entry.min_size, "vgg16")
    config = model_config(info, backend="openvino")
    graph = read_graph(ov.Core(), entry.onnx_path)
    types = {"TYPE_UINT8": ov.Type.u8, "TYPE_FP32": ov.Type.f32}
    declared = {port.name: port for port in (*config.input, *config.output)}
    for port in (*graph.inputs, *graph.outputs):
        (name,) = port.get_names()
        shape = [-1 if dim.is_dynamic else dim.get_length() for dim in port.get_partial_shape()]
        expected = declared.pop(name)
        assert types[model_config_pb2.DataType.Name(expected.data_type)] == port.get_element_type()
        assert [-1, *expected.dims] == shape
    assert not declared
