"""Reading a Triton model repository written by ``export/to_onnx.py``.

The front end needs each model's labels and pre-processing facts whatever the backend, so they
are read from ``config.pbtxt`` parameters and ``labels.txt`` (the exporter writes both from one
source), never from the ONNX file itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from inference.protocol import parse_scales, serving_scales

# The Triton model that runs the whole protocol on the repository's classifiers (BLS); the
# exporter writes it into every repository, so no classifier may take its name.
CLASSIFY_MODEL = "classify"


class RepositoryError(ValueError):
    """A model repository or model that cannot be served, with what to do about it."""


@dataclass(frozen=True)
class ModelEntry:
    """One servable model: where its graph is and what it expects."""

    name: str
    version: int
    onnx_path: Path | None  # None: a model read from a Triton server
    labels: tuple[str, ...]
    arch: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    min_size: int
    precision: str
    scales: tuple[int, ...]  # served at these Q when a request names none

    @property
    def num_classes(self) -> int:
        return len(self.labels)


def _latest_version(model_dir: Path) -> tuple[int, Path]:
    versions = sorted(
        (int(p.name), p / "model.onnx")
        for p in model_dir.iterdir()
        if p.is_dir() and p.name.isdigit() and (p / "model.onnx").is_file()
    )
    if not versions:
        raise RepositoryError(
            f"model {model_dir.name} has no <version>/model.onnx; export it again with "
            "python export/to_onnx.py"
        )
    return versions[-1]


def read_model(model_dir: Path) -> ModelEntry:
    """The latest version of one model folder."""
    config_path = model_dir / "config.pbtxt"
    try:
        config = text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())
    except (OSError, text_format.ParseError) as exc:
        raise RepositoryError(f"cannot read {config_path}: {exc}") from exc
    try:
        labels_text = (model_dir / "labels.txt").read_text()
    except OSError as exc:
        raise RepositoryError(
            f"model {model_dir.name} lacks its labels ({exc}); export it with "
            "python export/to_onnx.py"
        ) from exc
    version, onnx_path = _latest_version(model_dir)
    labels = tuple(line for line in labels_text.splitlines() if line)
    return model_entry(config, labels, version, onnx_path, model_dir.name)


def model_entry(
    config: model_config_pb2.ModelConfig,
    labels: tuple[str, ...],
    version: int,
    onnx_path: Path | None = None,
    name: str | None = None,
) -> ModelEntry:
    """A :class:`ModelEntry` from a classifier's config and labels, read from a repository on
    disk or from a Triton server (then there is no ``onnx_path``)."""
    name = config.name or name or "?"
    params = {k: v.string_value for k, v in config.parameters.items()}
    try:
        mean = tuple(json.loads(params["mean"]))
        std = tuple(json.loads(params["std"]))
        min_size = int(params["min_size"])
        # Exports older than the "scales" parameter: the default for their training crop.
        scales = parse_scales(params["scales"]) if "scales" in params else serving_scales(min_size)
    except (KeyError, ValueError) as exc:
        raise RepositoryError(
            f"model {name} lacks its pre-processing parameters ({exc}); export it with "
            "python export/to_onnx.py"
        ) from exc
    return ModelEntry(
        name=name,
        version=version,
        onnx_path=onnx_path,
        labels=labels,
        arch=params.get("arch", "unknown"),
        mean=mean,
        std=std,
        min_size=min_size,
        precision=params.get("precision", "fp32"),
        scales=scales,
    )


def parse_model_names(text: str) -> tuple[str, ...]:
    """``"vgg16,vgg19"`` -> ("vgg16", "vgg19"); raises ``ValueError`` on an empty name."""
    names = tuple(name.strip() for name in text.split(","))
    if not all(names):
        raise ValueError(
            f"{text!r} is not a comma-separated list of model names (e.g. vgg16,vgg19)"
        )
    return names


def model_names(repository: Path, names: list[str] | None = None) -> list[str]:
    """The classifier folders of ``repository`` (all, sorted, or ``names`` in that order,
    checked; never the ``classify`` pipeline); raises :class:`RepositoryError` saying what to do
    when there are none."""
    repository = Path(repository)
    if not repository.is_dir():
        raise RepositoryError(
            f"model repository {repository} does not exist; export models into it with "
            "python export/to_onnx.py (or make models)"
        )
    available = sorted(
        p.name
        for p in repository.iterdir()
        if p.is_dir()
        and not p.name.startswith(".")
        and p.name != CLASSIFY_MODEL
        and (p / "config.pbtxt").is_file()
    )
    if names:
        unknown = [n for n in names if n not in available]
        if unknown:
            raise RepositoryError(
                f"no model {', '.join(unknown)} in {repository}; available: "
                f"{', '.join(available) or 'none'}"
            )
        available = list(names)
    if not available:
        raise RepositoryError(
            f"model repository {repository} holds no models; export some with "
            "python export/to_onnx.py (or make models)"
        )
    return available


def read_repository(repository: Path, names: list[str] | None = None) -> dict[str, ModelEntry]:
    """Models of ``repository`` by name (all, or ``names`` in that order)."""
    repository = Path(repository)
    return {name: read_model(repository / name) for name in model_names(repository, names)}
