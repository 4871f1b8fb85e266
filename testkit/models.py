"""Models with generated weights, exported into a model repository: nothing is downloaded.

The small VGG (:data:`SMALL`): the real topology at 1/8 width, FC 128, crop 64, 10 classes, so a
request takes milliseconds per view. The small repository holds two of them, "m16" (VGG-16) and
"m19" (VGG-19), with peaked weights (posteriors far from uniform, as trained ones). The
benchmarks export full-size networks with seeded random weights the same way.

PyTorch and the exporter are imported by the functions that use them.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

# A VGG at 1/8 width, FC 128, crop 64 (FC6 a 2x2 kernel), 10 classes: vgg.models.build overrides.
SMALL: Mapping[str, float | int] = {"width": 0.125, "fc_width": 128, "crop": 64, "num_classes": 10}
# The small repository: (name, architecture, seed of its weights).
SMALL_MODELS: tuple[tuple[str, str, int], ...] = (("m16", "vgg16", 16), ("m19", "vgg19", 19))
# Standard deviation of the peaked FC weights: large enough that one class clearly wins.
PEAKED_FC_STD = 0.08


def peaked_small_model(arch: str, seed: int) -> nn.Module:
    """A small VGG (:data:`SMALL`) with seeded weights whose FC layers are scaled up, so
    posteriors are far from uniform, as a trained model's are. In eval mode."""
    import torch

    from vgg.models import build

    torch.manual_seed(seed)
    model = build(arch, **SMALL)
    with torch.no_grad():
        for layer in model.classifier:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0, PEAKED_FC_STD)
    return model.eval()


def export_weights(
    weights: Path,
    arch: str,
    repository: Path,
    name: str,
    overrides: Mapping[str, float | int] | None = None,
    scales: Sequence[int] | None = None,
    precision: str = "fp32",
) -> Path:
    """Export a state dict of ``arch`` as model ``name`` into ``repository``; returns the
    repository. ``overrides`` are the ``vgg.models.build`` sizes the weights were built with
    (:data:`SMALL`; none: full size); ``scales`` the serving scales written into its config
    (default: the exporter's, by crop); ``precision`` fp32 or fp16. Raises the exporter's
    errors (``export.exporter.ExportError``, ...) when the export fails."""
    from export.exporter import export_model

    sizes = {
        key: overrides[key] for key in ("width", "fc_width", "crop") if key in (overrides or {})
    }
    export_model(
        weights,
        arch=arch,
        repository=Path(repository),
        name=name,
        precision=precision,
        scales=tuple(scales) if scales else None,
        **sizes,
    )
    return Path(repository)


def write_small_repository(
    repository: Path,
    scales: Sequence[int] | None = None,
    weights_dir: Path | None = None,
    keep_existing: bool = False,
) -> dict[str, nn.Module]:
    """Export the small models of :data:`SMALL_MODELS` into ``repository``.

    Args:
        repository: the model repository to write (created if missing).
        scales: the serving scales written into each config (default: the exporter's,
            64,96,128 for the 64 crop).
        weights_dir: where each model's state dict is kept as ``NAME.pth`` (default: a temporary
            folder, removed afterwards).
        keep_existing: leave a model that ``repository`` already holds as it is.

    Returns:
        ``{name: model}``: the training-form torch models the exports were made from.
    """
    import torch

    repository = Path(repository)
    models = {}
    with tempfile.TemporaryDirectory(prefix="vggserve-small-") as scratch:
        folder = Path(weights_dir) if weights_dir is not None else Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        for name, arch, seed in SMALL_MODELS:
            models[name] = model = peaked_small_model(arch, seed)
            if keep_existing and (repository / name / "config.pbtxt").is_file():
                continue
            weights = folder / f"{name}.pth"
            torch.save(model.state_dict(), weights)
            export_weights(weights, arch, repository, name, SMALL, scales)
    return models


def export_random_model(
    repository: Path,
    arch: str,
    name: str,
    seed: int = 0,
    overrides: Mapping[str, float | int] | None = None,
    scales: Sequence[int] | None = None,
    weights_path: Path | None = None,
    precision: str = "fp32",
) -> Path:
    """Export ``arch`` with seeded random weights (full size unless ``overrides``, e.g.
    :data:`SMALL`) as ``name`` into ``repository``, unless it is there already; returns the
    repository. ``weights_path`` keeps the state dict (default: a temporary file); ``scales``
    and ``precision`` as :func:`export_weights`."""
    import torch

    from vgg.models import build

    repository = Path(repository)
    if (repository / name / "1" / "model.onnx").is_file():
        return repository
    torch.manual_seed(seed)
    model = build(arch, **(overrides or {}))
    with tempfile.TemporaryDirectory(prefix="vggserve-random-") as scratch:
        weights = Path(weights_path) if weights_path else Path(scratch) / f"{name}.pth"
        torch.save(model.state_dict(), weights)
        return export_weights(weights, arch, repository, name, overrides, scales, precision)
