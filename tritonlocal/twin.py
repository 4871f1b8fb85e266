"""The Python-backend twin of a production model repository.

The CPU ``tritonserver`` bundled with ``nvidia-pytriton`` has no ONNX Runtime backend, so the
local server loads a twin: for every model of the production repository, its own
``config.pbtxt`` with the platform switched to ``backend: "python"`` (inputs, outputs, batching,
instances and parameters untouched), ``labels.txt`` and ``<version>/model.onnx`` as links to the
production files, and ``<version>/model.py`` from :mod:`tritonlocal.python_model`. Nothing is
copied that could drift; large graphs are never duplicated. The ``classify`` pipeline model is a
Python-backend model already: its config is taken as it is, and its ``model.py`` linked.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from export.repository import config_text, parse_config
from inference.repository import CLASSIFY_MODEL, RepositoryError, model_names

MODEL_TEMPLATE = Path(__file__).with_name("python_model.py")


def twin_config(production_text: str, instance_count: int | None = None):
    """The twin's ``ModelConfig`` from the production ``config.pbtxt`` text.

    Only the engine changes: ``platform``/``backend`` become the Python backend (and, if asked,
    the instance count, e.g. to share 2 cores between two models). A GPU config
    (``--target gpu``) is served on the CPU here: its ``KIND_GPU`` instances become ``KIND_CPU``
    ones, and its GPU accelerators and warm-up batches are left out.
    """
    config = parse_config(production_text)
    config.platform = ""
    config.backend = "python"
    for group in config.instance_group:
        if group.kind == group.KIND_GPU:
            group.kind = group.KIND_CPU
        if instance_count is not None:
            group.count = instance_count
    if config.HasField("optimization"):
        accelerators = config.optimization.execution_accelerators
        accelerators.ClearField("gpu_execution_accelerator")
        if not accelerators.ListFields():
            config.optimization.ClearField("execution_accelerators")
        if not config.optimization.ListFields():
            config.ClearField("optimization")
    config.ClearField("model_warmup")
    return config


def _link(target: Path, link: Path) -> None:
    link.symlink_to(target.resolve())


def write_twin(
    repository: Path, twin: Path, names: list[str] | None = None, instance_count: int | None = None
) -> list[str]:
    """(Re)write ``twin`` as the Python-backend twin of ``repository``; returns the model names
    (the classifiers, then ``classify`` where the repository has it).

    ``twin`` is replaced entirely, so a model removed from production disappears from the twin.
    """
    repository = Path(repository).resolve()
    twin = Path(twin)
    models = model_names(repository, names)
    if twin.exists():
        shutil.rmtree(twin)
    twin.mkdir(parents=True)
    for name in models:
        source = repository / name
        target = twin / name
        target.mkdir()
        config = twin_config((source / "config.pbtxt").read_text(), instance_count)
        (target / "config.pbtxt").write_text(config_text(config))
        for extra in source.iterdir():  # labels.txt and any other file the config refers to
            if extra.is_file() and extra.name != "config.pbtxt":
                _link(extra, target / extra.name)
        versions = [
            v for v in source.iterdir() if v.name.isdigit() and (v / "model.onnx").is_file()
        ]
        if not versions:
            raise RepositoryError(
                f"model {name} in {repository} has no <version>/model.onnx; export it again "
                "with python export/to_onnx.py"
            )
        for version in versions:
            (target / version.name).mkdir()
            _link(version / "model.onnx", target / version.name / "model.onnx")
            shutil.copyfile(MODEL_TEMPLATE, target / version.name / "model.py")
    pipeline = repository / CLASSIFY_MODEL
    if (pipeline / "config.pbtxt").is_file():
        # A folder of links, not a link to the folder: the model reads its siblings, which must
        # be the twin's (only the models served).
        for path in sorted(pipeline.rglob("*")):
            if "__pycache__" in path.parts:
                continue
            target = twin / CLASSIFY_MODEL / path.relative_to(pipeline)
            if path.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                _link(path, target)
        models.append(CLASSIFY_MODEL)
    return models
