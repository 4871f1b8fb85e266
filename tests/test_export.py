"""python export/to_onnx.py: the graph, the repository it writes, and every bad input.

The command runs in process (``to_onnx.main``) except where the script itself is the point.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from export import to_onnx
from testkit import REPOSITORY_ROOT as ROOT
from testkit.models import SMALL, peaked_small_model
from testkit.tolerances import posterior_bound, score_bound
from vgg.models import build

from .reference import dense_probs, dense_scores

SMALL_FLAGS = [
    "--width",
    str(SMALL["width"]),
    "--fc-width",
    str(SMALL["fc_width"]),
    "--crop",
    str(SMALL["crop"]),
]


def run_script(*args: str) -> subprocess.CompletedProcess:
    """``python export/to_onnx.py ARGS`` as a process: the documented script itself."""
    return subprocess.run(
        [sys.executable, str(ROOT / "export" / "to_onnx.py"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ),
        timeout=600,
    )


def run_export(*args: str) -> subprocess.CompletedProcess:
    """The command in this process: its exit code and what it wrote to stderr."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            code = to_onnx.main(list(args))
        except SystemExit as exit_info:  # argparse's errors
            code = exit_info.code if isinstance(exit_info.code, int) else 1
            if not isinstance(exit_info.code, int):
                print(exit_info.code, file=sys.stderr)
    return subprocess.CompletedProcess(["to_onnx", *args], code, "", stderr.getvalue())


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def relative(actual, reference) -> float:
    return float(np.abs(actual - reference).max() / np.abs(reference).max())


@pytest.fixture(scope="module")
def small_export(small_state_dict_path, tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    result = run_export(
        "--arch",
        "vgg16",
        "--weights",
        str(small_state_dict_path),
        "--name",
        "small",
        "--repository",
        str(repo),
        *SMALL_FLAGS,
    )
    assert result.returncode == 0, result.stderr
    return repo


@pytest.fixture(scope="module")
def small_reference(small_state_dict_path):
    """The small VGG-16 the export was made from."""
    reference = build("vgg16", **SMALL)
    reference.load_state_dict(torch.load(small_state_dict_path, weights_only=True))
    return reference.eval()


def test_repository_layout_and_config_parses_with_triton_protobuf(small_export):
    model_dir = small_export / "small"
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "config.pbtxt", "labels.txt"]
    config = text_format.Parse(
        (model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    assert config.name == "small"
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size > 0
    assert config.HasField("dynamic_batching")
    assert len(config.instance_group) == 1
    (image,) = config.input
    assert (image.name, image.data_type, list(image.dims)) == (
        "image",
        model_config_pb2.TYPE_UINT8,
        [3, -1, -1],
    )
    outputs = {o.name: o for o in config.output}
    assert list(outputs["probs"].dims) == [10]
    assert outputs["probs"].label_filename == "labels.txt"
    assert list(outputs["scores"].dims) == [10, -1, -1]
    assert json.loads(config.parameters["mean"].string_value) == [0.485, 0.456, 0.406]
    assert json.loads(config.parameters["std"].string_value) == [0.229, 0.224, 0.225]
    assert config.parameters["min_size"].string_value == "64"
    labels = (model_dir / "labels.txt").read_text().splitlines()
    assert labels == [f"class_{i}" for i in range(10)]


def test_openvino_config_parses_with_triton_protobuf():
    # Triton's openvino backend: the same model.onnx (it reads model.xml unless told), on the
    # CPU, with the parameters that backend reads written in its spelling (it lower-cases them).
    from export.repository import ModelInfo, config_text, model_config, parse_config

    info = ModelInfo("small", 10, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 64, "vgg16")
    config = parse_config(config_text(model_config(info, backend="openvino")))
    assert (config.backend, config.platform) == ("openvino", "")
    assert config.default_model_filename == "model.onnx"
    assert [group.kind for group in config.instance_group] == [
        model_config_pb2.ModelInstanceGroup.KIND_CPU
    ]
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    assert parameters["PERFORMANCE_HINT"] == "LATENCY" and parameters["NUM_STREAMS"] == "1"
    assert "cudnn_conv_algo_search" not in parameters  # ONNX Runtime's options stay out
    assert parameters["min_size"] == "64" and parameters["precision"] == "fp32"
    native = model_config(info)
    for field in ("input", "output", "max_batch_size", "dynamic_batching"):
        assert getattr(config, field) == getattr(native, field)
    with pytest.raises(ValueError, match="use one of onnxruntime, openvino, python"):
        model_config(info, backend="tensorrt")


def test_graph_io_and_metadata(small_export, small_state_dict_path):
    model = onnx.load(str(small_export / "small" / "1" / "model.onnx"))
    (inp,) = model.graph.input
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims[1] == 3 and all(isinstance(d, str) for d in (dims[0], dims[2], dims[3]))
    assert [o.name for o in model.graph.output] == ["probs", "scores"]
    props = {p.key: p.value for p in model.metadata_props}
    assert props["arch"] == "vgg16"
    assert json.loads(props["mean"]) == [0.485, 0.456, 0.406]
    assert props["min_size"] == "64"
    assert props["classes"] == "10"
    assert props["sha256"] == hashlib.sha256(small_state_dict_path.read_bytes()).hexdigest()


@pytest.mark.parametrize("size", [(64, 64), (224, 224), (256, 341), (301, 457), (97, 500)])
def test_small_export_matches_independent_reference(small_export, small_reference, size):
    image = torch.randint(0, 256, (2, 3, *size), dtype=torch.uint8)
    probs, scores = session(small_export / "small" / "1" / "model.onnx").run(
        None, {"image": image.numpy()}
    )
    expected = dense_scores(small_reference, image).numpy()
    # fp32 against float64 (testkit.tolerances): relative to the largest score, and the
    # posteriors within half the largest score error.
    assert relative(scores, expected) < score_bound(small_reference)
    expected_probs = dense_probs(small_reference, image)
    bound = posterior_bound(small_reference, float(np.abs(expected).max()))
    assert np.abs(probs - expected_probs).max() < bound
    assert np.ptp(expected_probs, axis=1).min() > 100 * bound  # far from uniform


@pytest.fixture(scope="module")
def peaked_weights(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """A small VGG-16 whose posteriors are far from uniform (FC8 scaled up further than
    peaked_small_model's), and its state dict's path."""
    model = peaked_small_model("vgg16", seed=3)
    with torch.no_grad():
        model.classifier[6].weight.mul_(8)
    path = tmp_path_factory.mktemp("peaked") / "peaked16.pth"
    torch.save(model.state_dict(), path)
    return model, path


def test_fp16_export_matches_the_fp32_reference_within_fp16_rounding(peaked_weights, tmp_path):
    model, weights = peaked_weights
    result = run_export(
        "--arch",
        "vgg16",
        "--weights",
        str(weights),
        "--name",
        "half",
        "--precision",
        "fp16",
        "--repository",
        str(tmp_path),
        *SMALL_FLAGS,
    )
    assert result.returncode == 0, result.stderr
    image = torch.randint(0, 256, (2, 3, 256, 341), dtype=torch.uint8)
    probs, scores = session(tmp_path / "half" / "1" / "model.onnx").run(
        None, {"image": image.numpy()}
    )
    assert probs.dtype == scores.dtype == np.float32
    expected_scores = dense_scores(model, image).numpy()
    expected = dense_probs(model, image)
    # fp16 keeps an 11-bit significand: weights and activations rounded to 2**-11 relative at
    # each of the 16 layers, errors adding in quadrature (testkit.tolerances): about 1.1e-2 of
    # the largest score, and the posteriors within half the largest score error.
    largest = float(np.abs(expected_scores).max())
    score_error = score_bound(model, "fp16") * largest
    assert np.abs(scores - expected_scores).max() < score_error
    bound = posterior_bound(model, largest, "fp16")
    assert np.abs(probs - expected).max() < bound
    # Peaked posteriors: a model answering the uniform 1/C everywhere misses by far more.
    assert (expected.max(axis=1) - 1 / expected.shape[1]).min() > 5 * bound
    # The top-1 class wins by more than the scores can move (twice the largest error, one
    # down and one up), so fp16 rounding cannot change it.
    averaged = np.sort(expected_scores.mean(axis=(2, 3)), axis=1)
    assert (averaged[:, -1] - averaged[:, -2]).min() > 2 * score_error
    assert (probs.argmax(axis=1) == expected.argmax(axis=1)).all()


@pytest.mark.slow
def test_full_vgg16_torchvision_state_dict_exports_and_matches(tmp_path, monkeypatch):
    """torchvision's vgg16 weights, probs equal at any size from 224."""
    # The exporter's own check against PyTorch runs at one size here: this test compares the
    # written graph with the independent reference at three (a third of the export's time).
    monkeypatch.setattr("export.exporter.VERIFY_SIZES", ((224, 224),))
    torch.manual_seed(0)
    tv = torchvision.models.vgg16(weights=None).eval()
    with torch.no_grad():  # spread the logits so the soft-max is not flat
        tv.classifier[6].weight.mul_(20)
    weights = tmp_path / "vgg16.pth"
    torch.save(tv.state_dict(), weights)
    repo = tmp_path / "repo"
    result = run_export(
        "--arch", "vgg16", "--weights", str(weights), "--name", "vgg16", "--repository", str(repo)
    )
    assert result.returncode == 0, result.stderr
    labels = (repo / "vgg16" / "labels.txt").read_text().splitlines()
    assert labels == list(torchvision.models.VGG16_Weights.IMAGENET1K_V1.meta["categories"])
    sess = session(repo / "vgg16" / "1" / "model.onnx")
    tv.double()  # the reference runs in float64: convert its weights once
    for size in [(224, 224), (224, 300), (289, 257)]:
        image = torch.randint(0, 256, (1, 3, *size), dtype=torch.uint8)
        probs, scores = sess.run(["probs", "scores"], {"image": image.numpy()})
        expected = dense_scores(tv, image).numpy()
        # testkit.tolerances: 4 * 2**-24 * sqrt(66715 terms per output over the 16 layers) =
        # 6.2e-5 of the largest score; the posteriors within half the largest score error.
        largest = float(np.abs(expected).max())
        assert relative(scores, expected) < score_bound(tv), size
        expected_probs = torch.softmax(torch.from_numpy(expected).mean(dim=(2, 3)), 1).numpy()
        assert np.abs(probs - expected_probs).max() < posterior_bound(tv, largest), size


def test_export_keeps_other_versions_and_replaces_config(
    small_export, small_state_dict_path, tmp_path
):
    repository = tmp_path / "repo"  # a copy: the module's export stays as other tests expect
    shutil.copytree(small_export, repository)
    assert 'string_value: "64,96,128"' in (repository / "small" / "config.pbtxt").read_text()
    result = run_export(
        "--arch",
        "vgg16",
        "--weights",
        str(small_state_dict_path),
        "--name",
        "small",
        "--version",
        "2",
        "--scales",
        "96,128",
        "--repository",
        str(repository),
        *SMALL_FLAGS,
    )
    assert result.returncode == 0, result.stderr
    assert (repository / "small" / "1" / "model.onnx").is_file()
    assert (repository / "small" / "2" / "model.onnx").is_file()
    # The config is the new export's, not the old one's.
    assert 'string_value: "96,128"' in (repository / "small" / "config.pbtxt").read_text()
    leftovers = [p for p in repository.parent.iterdir() if "staging" in p.name]
    assert not leftovers


# --- bad input: non-zero exit, one line, no traceback, nothing written ---------------------


def assert_clean_failure(result: subprocess.CompletedProcess, expected: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert expected in result.stderr, result.stderr


def test_unknown_arch(tmp_path):
    result = run_export("--arch", "vgg17", "--weights", "x.pth", "--repository", str(tmp_path))
    assert_clean_failure(result, "unknown architecture 'vgg17'")
    assert not any(tmp_path.iterdir())


def test_missing_weights(tmp_path):
    result = run_export(
        "--arch",
        "vgg16",
        "--weights",
        str(tmp_path / "nope.pth"),
        "--repository",
        str(tmp_path / "repo"),
    )
    assert_clean_failure(result, "does not exist")
    assert not (tmp_path / "repo").exists()


def test_corrupt_weights(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(os.urandom(4096))
    result = run_export("--arch", "vgg16", "--weights", str(bad), "--repository", str(tmp_path))
    assert_clean_failure(result, "cannot read")


def test_checkpoint_of_another_arch(small_state_dict_path, tmp_path):
    result = run_export(
        "--arch",
        "vgg19",
        "--weights",
        str(small_state_dict_path),
        "--repository",
        str(tmp_path / "repo"),
        *SMALL_FLAGS,
    )
    assert_clean_failure(result, "does not match vgg19: missing keys")
    assert not (tmp_path / "repo").exists()


def test_unwritable_repository(small_state_dict_path, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run_export(
        "--arch",
        "vgg16",
        "--weights",
        str(small_state_dict_path),
        "--repository",
        str(blocker / "repo"),
        *SMALL_FLAGS,
    )
    assert_clean_failure(result, "cannot write to repository")


def test_imagenet_offline_says_how_to_pass_a_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # an empty cache

    def offline(url, *_args, **_kwargs):
        raise urllib.error.URLError(f"no network to reach {url}")

    # Offline on every machine, whatever its network: no 528 MB download.
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    result = run_export("--arch", "vgg16", "--repository", str(tmp_path / "repo"))
    assert_clean_failure(result, "--weights PATH")
    assert "vgg16-397923af.pth" in result.stderr
    assert not (tmp_path / "repo").exists()
    assert not any((tmp_path / "torch-home").rglob("*.pth"))  # no partial file left in the cache


def test_wrong_label_count(small_state_dict_path, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\n")
    result = run_export(
        "--arch",
        "vgg16",
        "--weights",
        str(small_state_dict_path),
        "--labels",
        str(labels),
        "--repository",
        str(tmp_path / "r"),
        *SMALL_FLAGS,
    )
    assert_clean_failure(result, "2 labels for a model with 10 classes")


def test_mismatch_writes_nothing(monkeypatch, small_state_dict_path, tmp_path, capsys):
    monkeypatch.setitem(to_onnx.TOLERANCE, "fp32", 0.0)
    code = to_onnx.main(
        [
            "--arch",
            "vgg16",
            "--weights",
            str(small_state_dict_path),
            "--repository",
            str(tmp_path / "repo"),
            *SMALL_FLAGS,
        ]
    )
    assert code != 0
    assert "nothing was written" in capsys.readouterr().err
    assert not (tmp_path / "repo" / "vgg16").exists()


def test_failure_while_writing_leaves_repository_as_it_was(
    monkeypatch, small_export, small_state_dict_path
):
    before = {p: p.stat().st_mtime_ns for p in (small_export / "small").rglob("*")}

    def explode(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("export.repository.config_text", explode)
    code = to_onnx.main(
        [
            "--arch",
            "vgg16",
            "--weights",
            str(small_state_dict_path),
            "--name",
            "small",
            "--repository",
            str(small_export),
            *SMALL_FLAGS,
        ]
    )
    assert code != 0
    after = {p: p.stat().st_mtime_ns for p in (small_export / "small").rglob("*")}
    assert after == before
    assert not [p for p in small_export.parent.iterdir() if "staging" in p.name]


def test_help_documents_every_flag():
    result = run_script("--help")  # the documented script, run as a script
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ")
    for flag in [
        "--arch",
        "--weights",
        "--name",
        "--repository",
        "--version",
        "--precision",
        "--labels",
        "--opset",
    ]:
        assert flag in result.stdout


def test_serving_scales_are_written_into_the_config(small_state_dict_path, tmp_path):
    from inference import read_repository

    repository = tmp_path / "repo"
    common = [
        "--arch",
        "vgg16",
        "--weights",
        str(small_state_dict_path),
        "--crop",
        "64",
        "--width",
        "0.125",
        "--fc-width",
        "128",
        "--repository",
        str(repository),
    ]
    assert to_onnx.main([*common, "--name", "default"]) == 0
    assert to_onnx.main([*common, "--name", "given", "--scales", "96,128"]) == 0
    models = read_repository(repository)
    assert models["default"].scales == (64, 96, 128)  # the crop x1, x1.5, x2
    assert models["given"].scales == (96, 128)
    assert 'string_value: "96,128"' in (repository / "given" / "config.pbtxt").read_text()
    assert to_onnx.main([*common, "--name", "small", "--scales", "32,64"]) == 1
    assert not (repository / "small").exists()
