"""export.exporter.export_model: the library under ``python export/to_onnx.py`` and ``python -m
export``, with the command's defaults, checks and messages."""

from __future__ import annotations

import inspect
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from export import to_onnx
from export.exporter import ExportError, export_model
from export.repository import CLASSIFY_MODEL_PY, classify_config, parse_config
from inference import read_repository
from testkit import REPOSITORY_ROOT as ROOT
from testkit.models import SMALL

SMALL_SETTINGS = {"width": SMALL["width"], "fc_width": SMALL["fc_width"], "crop": SMALL["crop"]}
SMALL_FLAGS = ["--width", str(SMALL["width"]), "--fc-width", str(SMALL["fc_width"])]
SMALL_FLAGS += ["--crop", str(SMALL["crop"])]


def test_export_model_writes_what_the_command_writes(small_state_dict_path, tmp_path, capsys):
    lines: list[str] = []
    path = export_model(
        small_state_dict_path,
        arch="vgg16",
        name="small",
        repository=tmp_path / "library",
        scales=(64, 96),
        log=lines.append,
        **SMALL_SETTINGS,
    )
    assert path == tmp_path / "library" / "small" / "1" / "model.onnx"
    assert lines[0] == f"[small] 1/4 loading weights ({small_state_dict_path})"
    assert lines[-1].startswith(f"[small] done: {path} (")
    assert capsys.readouterr().err == ""  # every line went to ``log``

    flags = ["--arch", "vgg16", "--weights", str(small_state_dict_path), "--name", "small"]
    flags += ["--repository", str(tmp_path / "command"), "--scales", "64,96", *SMALL_FLAGS]
    assert to_onnx.main(flags) == 0
    command = tmp_path / "command" / "small"
    for name in ("config.pbtxt", "labels.txt", "1/model.onnx"):
        assert (command / name).read_bytes() == (path.parents[1] / name).read_bytes(), name
    assert read_repository(tmp_path / "library")["small"].scales == (64, 96)


def test_every_repository_gets_the_classify_model(small_state_dict_path, tmp_path):
    repository = tmp_path / "repo"
    export = {"arch": "vgg16", "repository": repository, "log": lambda _: None, **SMALL_SETTINGS}
    export_model(small_state_dict_path, name="first", **export)
    classify = repository / "classify"
    assert parse_config((classify / "config.pbtxt").read_text()) == classify_config()
    assert (classify / "1" / "model.py").read_text() == CLASSIFY_MODEL_PY
    assert list(read_repository(repository)) == ["first"]  # the pipeline is not a classifier
    # An operator's edit of its config survives the next export; its code is made current.
    edited = (classify / "config.pbtxt").read_text().replace("50000000", "20000000")
    assert "20000000" in edited
    (classify / "config.pbtxt").write_text(edited)
    (classify / "1" / "model.py").write_text("stale")
    export_model(small_state_dict_path, name="second", **export)
    assert (classify / "config.pbtxt").read_text() == edited
    assert (classify / "1" / "model.py").read_text() == CLASSIFY_MODEL_PY
    assert list(read_repository(repository)) == ["first", "second"]
    assert sorted(p.name for p in classify.rglob("*")) == ["1", "config.pbtxt", "model.py"]


def test_every_flag_is_a_keyword_argument_with_the_same_default():
    actions = [a for a in to_onnx.build_parser()._actions if a.dest not in ("help", "weights")]
    parameters = inspect.signature(export_model).parameters
    assert {a.dest for a in actions} == set(parameters) - {"weights", "log"}
    for action in actions:
        assert parameters[action.dest].default == action.default, action.dest


# (keyword arguments, the same settings as flags, the one message both give)
BAD_SETTINGS = [
    ({"version": 0}, ["--version", "0"], "--version must be a positive integer"),
    ({"opset": 12}, ["--opset", "12"], "--opset must be between 13 and 21"),
    ({"name": "a b"}, ["--name", "a b"], "--name 'a b': use letters, digits"),
    ({"name": "classify"}, ["--name", "classify"], "--name 'classify' is taken by the pipeline"),
    ({"precision": "int8"}, ["--precision", "int8"], "--precision int8 needs --calibration DIR"),
    (
        {"calibration": Path("x")},
        ["--calibration", "x"],
        "--calibration is only used with --precision int8",
    ),
    (
        {"precision": "int8", "calibration": Path("x"), "verify_images": 0},
        ["--precision", "int8", "--calibration", "x", "--verify-images", "0"],
        "--calibration-images and --verify-images must be at least 1",
    ),
    ({"scales": "64,a"}, ["--scales", "64,a"], "--scales: '64,a' is not a comma-separated list"),
    ({"scales": (0, 64)}, ["--scales", "0,64"], "--scales: '0,64' is not a comma-separated list"),
]


@pytest.mark.parametrize(
    ("settings", "flags", "message"),
    BAD_SETTINGS,
    ids=[
        "version",
        "opset",
        "name",
        "reserved-name",
        "int8-alone",
        "calibration-alone",
        "verify",
        "scales",
        "zero",
    ],
)
def test_bad_settings_give_the_flags_message_before_anything_is_read(
    settings, flags, message, tmp_path, capsys
):
    assert_refused_before_reading(settings, flags, message, tmp_path, capsys)


def assert_refused_before_reading(settings, flags, message, tmp_path, capsys) -> None:
    """The library and the command refuse with ``message`` before the weights are opened or
    anything is written."""
    missing = tmp_path / "not-read.pth"  # a checked setting fails before the weights are opened
    with pytest.raises(ExportError) as info:
        export_model(missing, arch="vgg16", repository=tmp_path / "repo", **settings)
    assert str(info.value).startswith(message)
    with pytest.raises(SystemExit) as exit_info:
        to_onnx.main(["--arch", "vgg16", "--weights", str(missing), *flags])
    assert exit_info.value.code == 2
    assert f"error: {message}" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()


def test_library_only_settings_are_checked_too(tmp_path):
    with pytest.raises(ExportError, match="--precision 'bf16': use one of fp32, fp16, int8"):
        export_model(tmp_path / "w.pth", precision="bf16")
    with pytest.raises(ExportError, match="--weights imagenet needs --arch"):
        export_model("imagenet", repository=tmp_path / "repo")


def test_python_dash_m_export_is_the_same_command(tmp_path, monkeypatch, capsys):
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    # As a process, from another folder: the module runs wherever the package is importable.
    help_text = subprocess.run(
        [sys.executable, "-m", "export", "--help"],
        capture_output=True,
        text=True,
        env=environment,
        cwd=tmp_path,
        timeout=300,
    )
    assert help_text.returncode == 0, help_text.stderr
    assert help_text.stdout.startswith("usage: python -m export")
    assert "--calibration-scales" in help_text.stdout
    # A bad flag through the same __main__ module, in this process (its exit is SystemExit).
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["export", "--arch", "vgg17", "--weights", "x.pth"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("export", run_name="__main__", alter_sys=True)
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: unknown architecture 'vgg17'; choose one of A, A-LRN")
    assert len(stderr.splitlines()) == 1
    assert not any(tmp_path.iterdir())
