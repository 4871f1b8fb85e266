"""The local Triton launcher: the twin repository, the real tritonserver, starting and stopping."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from export.repository import ModelInfo, config_text, model_config
from testkit import REPOSITORY_ROOT as ROOT
from testkit.ports import free_ports
from testkit.processes import start_triton
from tritonlocal import LocalTriton, TritonStartError, port_is_free, twin_config, write_twin
from tritonlocal.twin import MODEL_TEMPLATE

# --- the twin: one source of truth --------------------------------------------------------------


def parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_twin_differs_from_production_only_in_engine(two_model_repository, tmp_path):
    repository, _ = two_model_repository
    names = write_twin(repository, tmp_path / "twin")
    assert names == ["m16", "m19", "classify"]
    for name in names[:2]:
        production = parse(repository / name / "config.pbtxt")
        twin = parse(tmp_path / "twin" / name / "config.pbtxt")
        assert production.platform == "onnxruntime_onnx"
        assert (twin.platform, twin.backend) == ("", "python")
        twin.platform, twin.backend = production.platform, production.backend
        assert twin == production  # inputs, outputs, batching, instances, parameters
        # The graph and labels are the production files themselves, not copies.
        onnx = tmp_path / "twin" / name / "1" / "model.onnx"
        assert onnx.is_symlink()
        assert onnx.resolve() == (repository / name / "1" / "model.onnx").resolve()
        labels = tmp_path / "twin" / name / "labels.txt"
        assert labels.resolve() == (repository / name / "labels.txt").resolve()
        model_py = tmp_path / "twin" / name / "1" / "model.py"
        assert model_py.read_text() == MODEL_TEMPLATE.read_text()
    # The pipeline model is a Python-backend model already: taken as it is, in a folder of its
    # own (it reads its siblings, which must be the twin's).
    twin_classify = tmp_path / "twin" / "classify"
    assert not twin_classify.is_symlink()
    assert parse(twin_classify / "config.pbtxt") == parse(repository / "classify" / "config.pbtxt")
    model_py = twin_classify / "1" / "model.py"
    assert model_py.resolve() == (repository / "classify" / "1" / "model.py").resolve()


def test_twin_equals_the_python_config_of_the_same_model():
    """model_config(info, "onnxruntime") -> twin == model_config(info, "python") up to ORT options."""
    info = ModelInfo("vgg16", 1000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 224, "vgg16")
    twin = twin_config(config_text(model_config(info, backend="onnxruntime")))
    python = model_config(info, backend="python")
    ort_only = set(twin.parameters) - set(python.parameters)
    assert ort_only == {"cudnn_conv_algo_search", "arena_extend_strategy"}
    for key in ort_only:
        del twin.parameters[key]
    assert twin == python


def test_twin_instance_count_override(two_model_repository, tmp_path):
    repository, _ = two_model_repository
    write_twin(repository, tmp_path / "twin", ["m19"], instance_count=2)
    assert sorted(p.name for p in (tmp_path / "twin").iterdir()) == ["classify", "m19"]
    assert parse(tmp_path / "twin" / "m19" / "config.pbtxt").instance_group[0].count == 2


# --- the real server ----------------------------------------------------------------------------


def test_server_is_ready_and_serves_the_twin_of_each_model(triton_server, two_model_repository):
    repository, _ = two_model_repository
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    assert client.is_server_ready()
    for name in ("m16", "m19"):
        assert client.is_model_ready(name)
        served = client.get_model_config(name).config
        assert served.backend == "python"
        production = parse(repository / name / "config.pbtxt")
        assert list(served.input) == list(production.input)
        assert [o.name for o in served.output] == ["probs", "scores"]
        assert served.max_batch_size == production.max_batch_size
    url = f"http://{triton_server.http_url}/v2/health/ready"
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200


def test_port_in_use_is_reported_before_starting(two_model_repository):
    repository, _ = two_model_repository
    http, grpc, metrics = free_ports(3)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", grpc))
        squatter.listen()
        server = LocalTriton(repository, http, grpc, metrics)
        with pytest.raises(TritonStartError, match=f"grpc {grpc} .* in use"):
            server.start()
        assert not server.running()
        assert server.work_dir is None  # its temporary twin is gone too


def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_stop_and_kill_leave_no_process_shared_memory_or_port(two_model_repository):
    repository, _ = two_model_repository
    server = start_triton(repository)
    try:
        stubs = _children(server.process.pid)
        assert len(stubs) == 4  # a Python stub per model instance: m16, m19, classify x 2
        prefix = server._shm_prefix
        assert list(Path("/dev/shm").glob(f"{prefix}*"))
        pid = server.process.pid
        assert server.stop() == 0  # SIGTERM: a clean exit
        assert not _alive(pid) and not any(_alive(p) for p in stubs)
        assert not list(Path("/dev/shm").glob(f"{prefix}*"))
        assert all(port_is_free(p) for p in server.ports.values())

        server.start()  # the same ports again, then a crash
        stubs, prefix = _children(server.process.pid), server._shm_prefix
        server.kill()
        assert not any(_alive(p) for p in stubs)
        assert not list(Path("/dev/shm").glob(f"{prefix}*"))
    finally:
        server.close()
    assert server.work_dir is None  # the temporary twin is gone


def test_command_line_serves_in_the_foreground_and_stops_on_ctrl_c(two_model_repository):
    repository, _ = two_model_repository
    http, grpc, metrics = free_ports(3)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tritonlocal",
            "--repository",
            str(repository),
            "--http-port",
            str(http),
            "--grpc-port",
            str(grpc),
            "--metrics-port",
            str(metrics),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = []
        for line in process.stderr:
            lines.append(line)
            if line.startswith("tritonlocal: ready"):
                break
        assert f"gRPC 127.0.0.1:{grpc}" in lines[-1], "".join(lines[-20:])
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc}")
        assert client.is_model_ready("m16") and client.is_model_ready("m19")
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
        assert "stopping Triton" in process.stderr.read()
        # The kernel releases the ports as the server's sockets close; the deadline only bounds
        # a hang.
        deadline = time.monotonic() + 60
        while not all(port_is_free(p) for p in (http, grpc, metrics)):
            assert time.monotonic() < deadline, "a port is still held after the launcher exited"
            time.sleep(0.1)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_command_line_explains_a_missing_repository(tmp_path):
    http, grpc, metrics = free_ports(3)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tritonlocal",
            "--repository",
            str(tmp_path / "nope"),
            "--http-port",
            str(http),
            "--grpc-port",
            str(grpc),
            "--metrics-port",
            str(metrics),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 1
    assert "does not exist" in result.stderr and "export/to_onnx.py" in result.stderr
    assert "Traceback" not in result.stderr
