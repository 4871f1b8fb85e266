"""The Dockerfile (no container engine here): hadolint, its stages, and what each image needs."""

from __future__ import annotations

import ast
import fnmatch
import importlib.metadata
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

from testkit import REPOSITORY_ROOT as ROOT
from testkit.dockerfile import DOCKERFILE, instruction, stages

# The Python of NVIDIA's tritonserver image (Ubuntu 22.04's), which runs the classify model's
# code in Triton's stub. A new TRITON_VERSION needs its Python looked up and added here.
TRITON_IMAGE_PYTHON = {"24.10": (3, 10)}
# What Python 3.11 added that 3.10 lacks, by module ("builtins": names used bare). Syntax (except*)
# is caught by parsing with the older grammar.
ADDED_IN_PYTHON_311 = {
    "tomllib": {"*"},
    "asyncio": {"TaskGroup", "timeout", "timeout_at", "Timeout", "Runner"},
    "datetime": {"UTC"},
    "typing": {
        "Self",
        "LiteralString",
        "Never",
        "assert_never",
        "assert_type",
        "reveal_type",
        "Required",
        "NotRequired",
        "TypeVarTuple",
        "Unpack",
        "dataclass_transform",
    },
    "enum": {"StrEnum", "ReprEnum", "EnumCheck", "verify", "member", "nonmember", "global_enum"},
    "contextlib": {"chdir"},
    "hashlib": {"file_digest"},
    "builtins": {"ExceptionGroup", "BaseExceptionGroup"},
}


def hadolint() -> str:
    return str(Path(sys.executable).with_name("hadolint"))


def test_hadolint_passes():
    result = subprocess.run(
        [hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def triton_version() -> str:
    version = re.search(r"^ARG TRITON_VERSION=(\d\d\.\d\d)$", DOCKERFILE.read_text(), re.M)
    assert version, "no ARG TRITON_VERSION=YY.MM"
    return version.group(1)


def test_triton_target_serves_the_repository_with_nvidias_image():
    triton = stages()["triton"]
    assert re.fullmatch(
        r"FROM nvcr\.io/nvidia/tritonserver:\$\{TRITON_VERSION\}-py3 AS triton", triton[0]
    )
    assert triton_version().startswith("24.")
    assert "model_repository/ /models/" in instruction(triton, "COPY")
    (entrypoint,) = instruction(triton, "ENTRYPOINT")
    (cmd,) = instruction(triton, "CMD")
    assert entrypoint == '["tritonserver"]' and "--model-repository=/models" in cmd
    assert instruction(triton, "EXPOSE") == ["8000 8001 8002"]


def test_frontend_target_runs_the_server_against_triton():
    all_stages = stages()
    frontend = all_stages["frontend"]
    assert frontend[0] == "FROM python:${PYTHON_VERSION}-slim AS frontend"
    assert re.search(r"^ARG PYTHON_VERSION=3\.11$", DOCKERFILE.read_text(), re.M)
    command = " ".join(
        shlex.split(instruction(frontend, "ENTRYPOINT")[0].strip("[]").replace(",", " "))
        + shlex.split(instruction(frontend, "CMD")[0].strip("[]").replace(",", " "))
    )
    assert command.startswith("python -m server --backend triton --triton-url triton:8001")
    assert "--host 0.0.0.0" in command
    # Only Triton's address: the models are read from Triton, no repository is mounted.
    assert "--repository" not in command and not instruction(frontend, "VOLUME")
    assert instruction(frontend, "USER") == ["10001"]  # not root


def copied_sources() -> list[str]:
    sources = []
    for stage in stages().values():
        for args in instruction(stage, "COPY"):
            if args.startswith("--from="):
                continue
            sources += args.split()[:-1]
    return sources


def test_every_copied_path_exists_and_is_not_docker_ignored():
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for source in copied_sources():
        assert (ROOT / source).exists(), source
        top = source.rstrip("/").split("/")[0]
        assert not any(fnmatch.fnmatch(top, pattern) for pattern in ignored), source
    assert ".venv" in ignored and ".git" in ignored  # gigabytes that must not be sent


def declared_dependencies() -> dict[str, str]:
    """pyproject.toml's dependencies by distribution name."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {re.split(r"[\[<>=]", d)[0]: d for d in pyproject["project"]["dependencies"]}


def installed_requirements(stage: str) -> list[str]:
    """The requirements a stage's pip installs (the quoted ones), each checked to be
    pyproject.toml's, with the same range."""
    declared = declared_dependencies()
    (install,) = [i for i in instruction(stages()[stage], "RUN") if "pip install" in i]
    required = re.findall(r'"([^"]+)"', install)
    assert required
    for requirement in required:
        name = re.split(r"[\[<>=]", requirement)[0]
        extras_free = re.sub(r"\[[^]]*\]", "", requirement)
        assert re.sub(r"\[[^]]*\]", "", declared[name]) == extras_free, requirement
    return required


def distribution_key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def blocked_modules(stage: str) -> set[str]:
    """The top-level modules (``PIL`` for pillow, ``google`` for protobuf) of pyproject's
    dependencies that ``stage`` does not install."""
    names = {re.split(r"[\[<>=]", r)[0] for r in installed_requirements(stage)}
    missing = {distribution_key(n) for n in set(declared_dependencies()) - names}
    return {
        module
        for module, distributions in importlib.metadata.packages_distributions().items()
        if any(distribution_key(d) in missing for d in distributions)
    }


def run_without(modules: set[str], code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter in which ``modules`` cannot be imported."""
    probe = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {sorted(modules)!r}:
            raise ImportError(f"{{name}} is not in this image")
sys.meta_path.insert(0, Block())
{code}
"""
    return subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_frontend_requirements_are_pyprojects_and_enough_to_serve(tmp_path):
    """The slim image installs a subset of pyproject's dependencies, with the same ranges, and
    that subset is enough to start the front end with --backend triton, with no repository."""
    modules = blocked_modules("frontend")
    assert {"torch", "torchvision", "onnx", "matplotlib"} <= modules
    absent = tmp_path / "no-repository"
    code = f"""
from server.main import create_app
from server.settings import Settings
from inference.backends.triton import TritonBackend
create_app(Settings(repository={str(absent)!r}, backend="triton"))
print("app created")
"""
    result = run_without(modules, code)
    assert result.returncode == 0 and "app created" in result.stdout, result.stderr


def test_triton_image_installs_the_package_for_classify():
    """The classify model's code is the package's, installed into Triton's own Python, whose
    version the package does not declare (hence --ignore-requires-python)."""
    triton = stages()["triton"]
    assert "/wheels /wheels" in [
        args.removeprefix("--from=build ") for args in instruction(triton, "COPY")
    ]
    (install,) = [i for i in instruction(triton, "RUN") if "pip install" in i]
    wheel = re.search(r"pip install (.*?) /wheels/\*\.whl", install)
    assert wheel and {"--no-deps", "--ignore-requires-python"} <= set(wheel.group(1).split())
    # The wheel holds what classify imports: the build stage copies those packages.
    copied = {args.split()[0].rstrip("/") for args in instruction(stages()["build"], "COPY")}
    assert {"inference", "tritonmodels"} <= copied


def classify_imports(modules: set[str], repository: Path) -> subprocess.CompletedProcess:
    """Load the classify model over ``repository`` as Triton's stub would (its utilities module
    stubbed), with ``modules`` unimportable; prints the classifiers it read, then the
    repository's own source files it imported."""
    code = f"""
import json, types
from pathlib import Path
sys.modules["triton_python_backend_utils"] = types.ModuleType("triton_python_backend_utils")
from google.protobuf import json_format
from export.repository import classify_config
from tritonmodels.classify import TritonPythonModel
config = json_format.MessageToJson(classify_config(), preserving_proto_field_name=True)
model = TritonPythonModel()
model.initialize({{"model_config": config, "model_repository": {str(repository / "classify")!r}}})
print(sorted(model.classifier.models))
root = Path.cwd()
files = [Path(m.__file__) for m in list(sys.modules.values()) if getattr(m, "__file__", None)]
ours = [f.relative_to(root) for f in files if f.is_relative_to(root) and f.suffix == ".py"]
print(json.dumps(sorted(str(f) for f in ours if not f.parts[0].startswith("."))))  # not .venv
"""
    return run_without(modules, code)


def test_triton_requirements_are_pyprojects_and_enough_for_classify(two_model_repository):
    """The triton image adds pyproject's ranges of what classify imports, and nothing of the
    front end, training or export: with everything else unimportable, classify loads."""
    repository, models = two_model_repository
    modules = blocked_modules("triton")
    assert {"torch", "onnxruntime", "fastapi", "uvicorn", "tqdm"} <= modules
    result = classify_imports(modules, repository)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == repr(sorted(models))


def python_311_additions(source: str, version: tuple[int, int]) -> list[str]:
    """What ``source`` uses that Python ``version`` (3.10) lacks: syntax, and the stdlib names of
    :data:`ADDED_IN_PYTHON_311`."""
    try:
        tree = ast.parse(source, feature_version=version)
    except SyntaxError as exc:
        return [f"line {exc.lineno}: {exc.msg}"]
    found: list[tuple[int, str]] = []
    aliases = {}  # local name -> module, for "import asyncio" and "import asyncio as aio"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in ADDED_IN_PYTHON_311 and "*" in ADDED_IN_PYTHON_311[alias.name]:
                    found.append((node.lineno, f"import {alias.name}"))
                aliases[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module in ADDED_IN_PYTHON_311:
            added = ADDED_IN_PYTHON_311[node.module]
            for alias in node.names:
                if "*" in added or alias.name in added:
                    found.append((node.lineno, f"from {node.module} import {alias.name}"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            module = aliases.get(node.value.id)
            if node.attr in ADDED_IN_PYTHON_311.get(module, ()):
                found.append((node.lineno, f"{node.value.id}.{node.attr}"))
        elif isinstance(node, ast.Name) and node.id in ADDED_IN_PYTHON_311["builtins"]:
            found.append((node.lineno, node.id))
    return [f"line {line}: {what}" for line, what in sorted(found)]


def test_classify_code_runs_on_the_python_of_nvidias_image(two_model_repository):
    """Every vggserve module classify imports parses with the triton image's Python grammar and
    uses nothing of the standard library that Python added later."""
    release = triton_version()
    assert release in TRITON_IMAGE_PYTHON, f"add the Python of tritonserver:{release}-py3"
    version = TRITON_IMAGE_PYTHON[release]
    result = classify_imports(blocked_modules("triton"), two_model_repository[0])
    assert result.returncode == 0, result.stderr
    files = json.loads(result.stdout.splitlines()[1])
    assert "tritonmodels/classify.py" in files and "inference/classifier.py" in files
    problems = {
        name: found
        for name in files
        if (found := python_311_additions((ROOT / name).read_text(), version))
    }
    assert not problems, f"not on Python {version}: {problems}"


def test_the_python_version_check_finds_what_311_added():
    source = """
import asyncio
import tomllib
from typing import Self
try:
    pass
except ValueError:
    raise ExceptionGroup("x", [])
async def f():
    async with asyncio.TaskGroup():
        pass
"""
    assert python_311_additions(source, (3, 10)) == [
        "line 3: import tomllib",
        "line 4: from typing import Self",
        "line 8: ExceptionGroup",
        "line 10: asyncio.TaskGroup",
    ]
    assert python_311_additions("try:\n    pass\nexcept* ValueError:\n    pass\n", (3, 10))
    assert python_311_additions("import asyncio\nasyncio.gather()\n", (3, 10)) == []
