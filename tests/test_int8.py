"""python export/to_onnx.py --precision int8: the calibrated graph, its config, serving it, bad input."""

from __future__ import annotations

import asyncio
import collections
import json

import numpy as np
import onnx
import pytest
import torch
from google.protobuf import text_format
from PIL import Image
from tritonclient.grpc import model_config_pb2

from export import quantize, to_onnx
from export.graph import ServingGraph
from inference import Classifier, ClassifyOptions, decode_image, read_repository
from inference.backends.onnxruntime import OnnxRuntimeBackend
from inference.protocol import dense_batch, serving_scales
from testkit.images import encode, jpeg, smooth_image
from testkit.models import SMALL, peaked_small_model
from tritonlocal.twin import twin_config
from vgg.convert import to_fully_conv
from vgg.models import IMAGENET_MEAN, IMAGENET_STD

SMALL_FLAGS = [
    "--width",
    str(SMALL["width"]),
    "--fc-width",
    str(SMALL["fc_width"]),
    "--crop",
    str(SMALL["crop"]),
]
SCALES = (64, 96)


TINTS = ((220, 40, 40), (40, 200, 60), (50, 60, 230), (128, 128, 128))


def tinted_jpeg(index: int, seed: int) -> bytes:
    """A smooth random image of assorted size, tinted by its class ``index % 4``."""
    size = (80 + 13 * (index % 5), 70 + 17 * (index % 3))
    pixels = np.asarray(smooth_image(*size, seed=seed), dtype=np.float32)
    tinted = 0.4 * pixels + 0.6 * np.array(TINTS[index % len(TINTS)], dtype=np.float32)
    return encode(Image.fromarray(tinted.clip(0, 255).astype(np.uint8)), "JPEG", quality=90)


def write_images(folder, count: int, seed: int) -> list:
    """Tinted JPEGs in one folder per class (an ImageFolder tree)."""
    paths = []
    for i in range(count):
        path = folder / f"class{i % len(TINTS)}" / f"{i:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(tinted_jpeg(i, seed + i))
        paths.append(path)
    return paths


def probe_fitted_small_model(count: int = 16) -> torch.nn.Module:
    """A small VGG-16 (random trunk) whose FC8 is fitted in closed form to tell the tints apart.

    A random net calls every image the same class with near-uniform posteriors, so top-1
    agreement would test nothing; a ridge-regression probe on its FC7 features gives decisions
    that differ between images, with margins like a trained model's.
    """
    model = peaked_small_model("vgg16", 7)
    graph = ServingGraph(to_fully_conv(model).eval(), IMAGENET_MEAN, IMAGENET_STD)
    features = []
    hook = graph.net.head[4].register_forward_hook(
        lambda module, inputs, output: features.append(output.mean(dim=(0, 2, 3)))
    )
    with torch.no_grad():
        for i in range(count):
            graph(torch.from_numpy(dense_batch(decode_image(tinted_jpeg(i, 50 + i)), SCALES[0])))
        hook.remove()
        x = torch.stack(features).double()
        mean = x.mean(dim=0)
        x = x - mean
        targets = -torch.ones(count, SMALL["num_classes"], dtype=torch.float64)
        targets[torch.arange(count), torch.arange(count) % len(TINTS)] = 1.0
        ridge = x.T @ x + 1e-3 * torch.eye(x.shape[1], dtype=torch.float64)
        weight = 4.0 * torch.linalg.solve(ridge, x.T @ targets).T  # 4: peaked posteriors
        model.classifier[6].weight.copy_(weight.float())
        model.classifier[6].bias.copy_((-weight @ mean).float())
    return model


@pytest.fixture(scope="module")
def weights_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("int8-weights") / "small16.pth"
    torch.save(probe_fitted_small_model().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def calibration_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calibration")
    write_images(folder, 32, seed=100)
    return folder


def export_args(weights, repo, *extra: str) -> list[str]:
    return [
        "--arch",
        "vgg16",
        "--weights",
        str(weights),
        "--repository",
        str(repo),
        *SMALL_FLAGS,
        *extra,
    ]


@pytest.fixture(scope="module")
def exported(weights_path, calibration_dir, tmp_path_factory):
    """A repository with the small VGG-16 in fp32 ("small") and int8 (default name)."""
    repo = tmp_path_factory.mktemp("int8-repo")
    assert to_onnx.main(export_args(weights_path, repo, "--name", "small")) == 0
    int8 = [
        "--precision",
        "int8",
        "--calibration",
        str(calibration_dir),
        "--calibration-images",
        "16",
        "--calibration-scales",
        ",".join(map(str, SCALES)),
    ]
    assert to_onnx.main(export_args(weights_path, repo, *int8)) == 0
    return repo


def test_int8_is_written_next_to_fp32_with_int8_config(exported):
    assert sorted(p.name for p in exported.iterdir()) == ["classify", "small", "vgg16-int8"]
    text = (exported / "vgg16-int8" / "config.pbtxt").read_text()
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert config.name == "vgg16-int8"
    assert config.platform == "onnxruntime_onnx"
    assert config.parameters["precision"].string_value == "int8"
    # An int8 QDQ graph runs on ONNX Runtime's CPU kernels, also in a GPU Triton.
    assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
    twin = twin_config(text)
    assert (twin.backend, twin.parameters["precision"].string_value) == ("python", "int8")
    entries = read_repository(exported)
    assert (entries["vgg16-int8"].precision, entries["small"].precision) == ("int8", "fp32")
    assert entries["vgg16-int8"].labels == entries["small"].labels


def test_int8_graph_is_quantized_and_records_its_calibration(exported):
    model = onnx.load(exported / "vgg16-int8" / "1" / "model.onnx")
    ops = collections.Counter(node.op_type for node in model.graph.node)
    assert ops["Conv"] == 16 and ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    int8_weights = [
        t
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4
    ]
    assert len(int8_weights) == 16  # every conv's weights, per channel
    assert ops["Softmax"] == 1  # the posterior stays float32
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["precision"] == "int8"
    calibration = json.loads(meta["calibration"])
    assert (calibration["images"], calibration["scales"]) == (16, list(SCALES))
    assert float(meta["int8_top1_agreement"]) >= quantize.MIN_TOP1_AGREEMENT
    assert int(meta["int8_verify_images"]) == 16  # the 32 - 16 images calibration did not see
    fp32 = exported / "small" / "1" / "model.onnx"
    assert (exported / "vgg16-int8" / "1" / "model.onnx").stat().st_size < fp32.stat().st_size / 3


def test_served_int8_agrees_with_fp32(exported, tmp_path):
    """The ONNX Runtime backend serves the int8 model like any other; top-1 equals fp32's."""
    images = [decode_image(p.read_bytes()) for p in write_images(tmp_path, 8, seed=900)]
    models = read_repository(exported)
    backend = OnnxRuntimeBackend(models, threads=1)
    classifier = Classifier(backend, models, default_scales=SCALES)

    async def classify(image):
        result = await classifier.classify(image, ClassifyOptions(models=("small", "vgg16-int8")))
        return result.per_model_probabilities

    try:
        results = [asyncio.run(classify(image)) for image in images]
    finally:
        asyncio.run(backend.close())
    fp32 = np.stack([r["small"] for r in results])
    int8 = np.stack([r["vgg16-int8"] for r in results])
    assert fp32.max() > 0.5 and len(set(fp32.argmax(axis=1))) > 2  # top-1 is a real decision
    np.testing.assert_array_equal(int8.argmax(axis=1), fp32.argmax(axis=1))
    assert np.abs(int8 - fp32).max() < 0.1  # a random 1/8-width trunk: noisier than a trained one


def test_calibration_batches_are_the_servers(calibration_dir):
    files = sorted(calibration_dir.rglob("*.jpg"))[:2]
    batches = list(quantize.serving_batches(files, SCALES))
    assert [index for index, _ in batches] == [0, 0, 1, 1]
    for (index, batch), q in zip(batches, SCALES * 2, strict=True):
        expected = dense_batch(decode_image(files[index].read_bytes()), q, flip=True)
        assert batch.dtype == np.uint8 and batch.shape[:2] == (2, 3) and min(batch.shape[2:]) == q
        np.testing.assert_array_equal(batch, expected)


def test_images_are_spread_over_classes_and_held_out(calibration_dir):
    chosen, held_out = quantize.select_images(calibration_dir, 6, 4)
    assert len(chosen) == 6 and len(held_out) == 4
    assert not set(chosen) & set(held_out)
    assert {p.parent.name for p in chosen} == {f"class{i}" for i in range(len(TINTS))}
    everything, fallback = quantize.select_images(calibration_dir, 100, 4)
    assert len(everything) == 32 and fallback == everything[:4]


def test_default_scales_are_the_serving_scales():
    assert serving_scales(224) == (256, 384, 512)
    assert serving_scales(64) == (64, 96, 128)


@pytest.mark.parametrize(
    "make_folder, message",
    [(lambda root: root / "missing", "does not exist"), (lambda root: root, "holds no images")],
    ids=["missing", "empty"],
)
def test_bad_calibration_folder_is_one_clear_line(
    weights_path, tmp_path, capsys, make_folder, message
):
    (tmp_path / "notes.txt").write_text("not an image")
    folder = make_folder(tmp_path)
    repo = tmp_path / "repo"
    args = export_args(weights_path, repo, "--precision", "int8", "--calibration", str(folder))
    assert to_onnx.main(args) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1  # refused before any weights are loaded
    assert lines[0].startswith(f"error: calibration folder {folder} {message}")
    assert "--calibration DIR" in lines[0]
    assert not repo.exists()


def test_corrupt_calibration_image_is_named(weights_path, tmp_path, capsys):
    folder = tmp_path / "images"
    write_images(folder, 3, seed=5)
    broken = folder / "class0" / "broken.jpg"
    broken.write_bytes(jpeg(seed=1)[:200])
    repo = tmp_path / "repo"
    args = export_args(
        weights_path,
        repo,
        "--precision",
        "int8",
        "--calibration",
        str(folder),
        "--calibration-scales",
        "64",
    )
    assert to_onnx.main(args) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot use calibration image {broken}: ")
    assert not (repo / "vgg16-int8").exists()


def test_int8_too_far_from_fp32_writes_nothing(
    weights_path, calibration_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(quantize, "MAX_PROB_DIFF", 0.0)  # no int8 graph is that exact
    repo = tmp_path / "repo"
    args = export_args(
        weights_path,
        repo,
        "--precision",
        "int8",
        "--calibration",
        str(calibration_dir),
        "--calibration-images",
        "4",
        "--verify-images",
        "2",
        "--calibration-scales",
        "64",
    )
    assert to_onnx.main(args) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: int8 disagrees with fp32 on 2 held-out images")
    assert "nothing was written" in last
    assert not (repo / "vgg16-int8").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--precision", "int8"], "--precision int8 needs --calibration DIR"),
        (["--calibration", "x"], "--calibration is only used with --precision int8"),
        (
            ["--precision", "int8", "--calibration", "x", "--calibration-scales", "64,a"],
            "--calibration-scales: '64,a' is not a comma-separated list of positive integers "
            "(e.g. 256,384,512)",
        ),
    ],
    ids=["no-folder", "not-int8", "bad-scales"],
)
def test_bad_int8_flags(weights_path, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        to_onnx.main(export_args(weights_path, tmp_path / "repo", *flags))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_scales_below_the_input_minimum_are_refused(
    weights_path, calibration_dir, tmp_path, capsys
):
    args = export_args(
        weights_path,
        tmp_path / "repo",
        "--precision",
        "int8",
        "--calibration",
        str(calibration_dir),
        "--calibration-scales",
        "32,64",
    )
    assert to_onnx.main(args) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (
        "error: --calibration-scales [32] are below the model's input minimum 64; use scales >= 64"
    )
