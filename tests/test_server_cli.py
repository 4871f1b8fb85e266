"""``python -m server``'s flags: generated from the Settings fields, checked by Settings, and the
table of docs/server.md equal to the generated one."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from server.flags import (
    TABLE_BEGIN,
    TABLE_END,
    describe_default,
    flags_markdown,
    main,
    option_name,
    parse_settings,
)
from server.settings import SettingError, Settings
from testkit import REPOSITORY_ROOT as ROOT
from testkit.processes import run_server_command as run_server_cli

DOCS = ROOT / "docs" / "server.md"


def documented_table() -> str:
    text = DOCS.read_text()
    return text[text.index(TABLE_BEGIN) + len(TABLE_BEGIN) : text.index(TABLE_END)].strip("\n")


def test_docs_flag_table_is_the_generated_one():
    assert documented_table() == flags_markdown().strip("\n"), (
        "docs/server.md is out of date: python -m server.flags --write docs/server.md"
    )


def test_every_option_help_prints_is_in_the_docs_table():
    result = run_server_cli("--help")
    assert result.returncode == 0, result.stderr
    printed = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", result.stdout)) - {"--help"}
    documented = set(re.findall(r"^\| `(--[a-z0-9-]+)", documented_table(), re.M))
    # Equal sets: help texts also name no flag that does not exist.
    assert printed == documented
    assert documented == {option_name(item.name) for item in fields(Settings)}


def test_help_shows_the_dataclass_defaults():
    result = run_server_cli("--help")
    text = " ".join(result.stdout.split())  # undo argparse's line wrapping
    for item in fields(Settings):
        assert f"(default: {describe_default(item)})" in text, item.name
    assert "(default: 127.0.0.1:8001)" in text and "(default: 8080)" in text


def test_no_flags_give_the_defaults_every_deployment_relies_on():
    settings = parse_settings([])
    assert settings == Settings()
    assert (settings.repository, settings.models, settings.scales) == (
        Path("model_repository"),
        None,
        None,
    )
    assert (settings.backend, settings.triton_url, settings.threads) == (
        "onnxruntime",
        "127.0.0.1:8001",
        None,
    )
    assert (settings.host, settings.port) == ("127.0.0.1", 8080)
    assert (settings.max_upload_mb, settings.max_pixels, settings.max_batch_files) == (
        20.0,
        50_000_000,
        32,
    )
    assert (settings.max_concurrency, settings.max_queue) == (4, 32)
    assert (settings.torch_device, settings.torch_dtype, settings.torch_compile) == (
        "auto",
        "auto",
        "auto",
    )
    assert settings.torch_warmup is None  # none eager, 640x480,480x640 compiled
    assert (settings.onnxruntime_device, settings.onnxruntime_arena_mb) == ("auto", None)
    assert (settings.batch_delay_ms, settings.max_batch, settings.shape_multiple) == (
        None,
        32,
        None,
    )
    assert settings.jpeg_draft is False
    assert (settings.grace_period, settings.log_level) == (30.0, "info")


def test_every_flag_reaches_its_setting():
    settings = parse_settings(
        [
            *("--repository", "repo", "--models", "vgg16, vgg19", "--scales", "64,96"),
            *("--backend", "torch", "--triton-url", "triton:8001", "--threads", "3"),
            *("--torch-device", "cpu", "--torch-dtype", "fp16", "--torch-compile", "off"),
            *("--torch-warmup", "640x480,480X640", "--host", "0.0.0.0", "--port", "9000"),
            *("--max-upload-mb", "1.5", "--max-pixels", "1000", "--max-batch-files", "8"),
            *("--max-concurrency", "2", "--max-queue", "0", "--batch-delay-ms", "0"),
            *("--max-batch", "4", "--shape-multiple", "32", "--jpeg-draft"),
            *("--grace-period", "2.5", "--log-level", "debug"),
            *("--onnxruntime-device", "cpu", "--onnxruntime-arena-mb", "64"),
        ]
    )
    assert settings == Settings(
        repository=Path("repo"),
        models=("vgg16", "vgg19"),
        scales=(64, 96),
        backend="torch",
        triton_url="triton:8001",
        threads=3,
        torch_device="cpu",
        torch_dtype="fp16",
        torch_compile="off",
        torch_warmup=((640, 480), (480, 640)),
        host="0.0.0.0",
        port=9000,
        max_upload_mb=1.5,
        max_pixels=1000,
        max_batch_files=8,
        max_concurrency=2,
        max_queue=0,
        batch_delay_ms=0.0,
        max_batch=4,
        shape_multiple=32,
        jpeg_draft=True,
        grace_period=2.5,
        log_level="debug",
        onnxruntime_device="cpu",
        onnxruntime_arena_mb=64,
    )
    assert settings.max_upload_bytes == 1.5 * 2**20


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--port", "0"], "--port must be between 1 and 65535, got 0"),
        (["--port", "http"], "argument --port: invalid int value: 'http'"),
        (["--max-queue", "-1"], "--max-queue must be 0 or more, got -1"),
        (["--max-upload-mb", "0"], "--max-upload-mb must be positive, got 0.0"),
        (["--threads", "0"], "--threads must be positive, got 0"),
        (["--grace-period", "-1"], "--grace-period must be positive, got -1.0"),
        (["--batch-delay-ms", "1001"], "--batch-delay-ms must be between 0 and 1000, got 1001.0"),
        (
            ["--scales", "64;96"],
            "argument --scales: '64;96' is not a comma-separated list of positive integers "
            "(e.g. 256,384,512)",
        ),
        (
            ["--scales", "0,64"],
            "argument --scales: '0,64' is not a comma-separated list of positive integers "
            "(e.g. 256,384,512)",
        ),
        (
            ["--models", "vgg16,"],
            "argument --models: 'vgg16,' is not a comma-separated list of model names "
            "(e.g. vgg16,vgg19)",
        ),
        (
            ["--torch-warmup", "640by480"],
            "argument --torch-warmup: '640by480' is not a comma-separated list of WIDTHxHEIGHT "
            "sizes (e.g. 640x480,480x640)",
        ),
        (
            ["--backend", "tensorrt"],
            "argument --backend: invalid choice: 'tensorrt' (choose from 'onnxruntime', "
            "'triton', 'torch', 'openvino')",
        ),
        (
            ["--log-level", "verbose"],
            "argument --log-level: invalid choice: 'verbose' (choose from 'critical', 'error', "
            "'warning', 'info', 'debug')",
        ),
    ],
)
def test_a_bad_value_exits_2_with_one_line_saying_what_to_give(argv, error, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_settings(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"python -m server: error: {error}"


def test_the_command_exits_2_on_a_bad_value():
    result = run_server_cli("--max-batch-files", "0")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        "python -m server: error: --max-batch-files must be positive, got 0"
    )


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"max_batch": 0}, "max_batch must be positive, got 0"),
        ({"port": 70000}, "port must be between 1 and 65535, got 70000"),
        (
            {"backend": "tensorrt"},
            "backend must be one of onnxruntime, triton, torch, openvino, got 'tensorrt'",
        ),
        ({"torch_dtype": "fp8"}, "torch_dtype must be one of auto, bf16, fp16, fp32, got 'fp8'"),
        ({"scales": ()}, "scales must be one or more positive integers (e.g. 256,384,512), got ()"),
        ({"torch_warmup": ((640, 0),)}, "torch_warmup must be (width, height) pairs"),
        ({"onnxruntime_arena_mb": -1}, "onnxruntime_arena_mb must be 0 or more, got -1"),
    ],
)
def test_settings_built_in_code_are_checked_the_same_way(values, message):
    with pytest.raises(SettingError) as error:
        Settings(**values)
    assert str(error.value).startswith(message)
    assert error.value.name == next(iter(values))


def test_flags_write_replaces_only_the_table(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(f"# Title\n\n{TABLE_BEGIN}\nold table\n{TABLE_END}\n\nAfter.\n")
    assert main(["--write", str(page)]) == 0
    assert (
        page.read_text() == f"# Title\n\n{TABLE_BEGIN}\n{flags_markdown()}{TABLE_END}\n\nAfter.\n"
    )


def test_flags_write_refuses_a_page_without_markers(tmp_path, capsys):
    page = tmp_path / "page.md"
    page.write_text("# Title\n")
    assert main(["--write", str(page)]) == 1
    assert "no <!-- flags:begin --> ... <!-- flags:end --> markers" in capsys.readouterr().err
    assert page.read_text() == "# Title\n"
