"""The ``classify`` Triton model's interface, for both of its sides.

Request parameters (KServe v2 ``parameters``) become :class:`ClassifyOptions` in the model and
are made from them in clients; the model turns one :class:`Classification` per file into output
arrays, and clients turn the arrays back into the HTTP API's answer. Keeping both directions
here is what makes the model and its clients agree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from inference.classifier import Classification, ClassifyOptions, Heatmap, OptionError, Prediction
from inference.protocol import MODES, format_scales, parse_scales
from inference.repository import parse_model_names

# What a stock client asks for: the fused top-k.
TOP_K_OUTPUTS = ("probabilities", "indices", "labels")
# The rest of the HTTP API's answer: per-model top-k, what was run, the image, the stages.
DETAIL_OUTPUTS = (
    "model_probabilities",
    "model_indices",
    "model_labels",
    "models",
    "scales",
    "image_size",
    "timing_ms",
)
HEATMAP_OUTPUT = "heatmap"
OUTPUTS = TOP_K_OUTPUTS + DETAIL_OUTPUTS + (HEATMAP_OUTPUT,)
TIMING_STAGES = ("decode", "preprocess", "inference")
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _flag(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise OptionError(name, f"must be true or false, got {value!r}")


def _integer(name: str, value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise OptionError(name, f"must be an integer, got {value!r}")


def _text(name: str, value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # scales=256: one scale
    if isinstance(value, str):
        return value
    raise OptionError(name, f"must be a string, got {value!r}")


def options_from_parameters(parameters: Mapping[str, object]) -> tuple[ClassifyOptions, bool]:
    """(options, jpeg_draft) from a request's parameters; raises :class:`OptionError` naming the
    parameter, with the HTTP API's messages. Unknown names are ignored, as HTTP query
    parameters are (clients and Triton add their own, e.g. ``binary_data_output``)."""
    scales = models = None
    if "scales" in parameters:
        text = _text("scales", parameters["scales"])
        try:
            scales = parse_scales(text)
        except ValueError as exc:
            raise OptionError("scales", str(exc)) from None
    if "models" in parameters:
        text = _text("models", parameters["models"])
        try:
            models = parse_model_names(text)
        except ValueError as exc:
            raise OptionError("models", str(exc)) from None
    mode = _text("mode", parameters.get("mode", "dense"))
    if mode not in MODES:  # worded as the HTTP API's validation says it
        choices = ", ".join(repr(m) for m in MODES[:-1]) + f" or {MODES[-1]!r}"
        raise OptionError("mode", f"Input should be {choices} (got {mode!r})")
    options = ClassifyOptions(
        scales=scales,
        flip=_flag("flip", parameters.get("flip", True)),
        models=models,
        top_k=_integer("top_k", parameters["top_k"]) if "top_k" in parameters else None,
        heatmap=_flag("heatmap", parameters.get("heatmap", False)),
        mode=mode,
    )
    return options, _flag("jpeg_draft", parameters.get("jpeg_draft", False))


def parameters_from_options(options: ClassifyOptions, jpeg_draft: bool = False) -> dict:
    """The request parameters for ``options`` (resolved or not); None fields are left to the
    model's defaults."""
    parameters: dict[str, bool | int | str] = {"flip": options.flip, "mode": options.mode}
    if options.model_scales is not None and options.scales:
        distinct = set(options.model_scales.values())
        if len(distinct) == 1:  # per-model serving scales that differ are the model's default
            parameters["scales"] = format_scales(next(iter(distinct)))
    elif options.scales:
        parameters["scales"] = format_scales(options.scales)
    if options.models:
        parameters["models"] = ",".join(options.models)
    if options.top_k is not None:
        parameters["top_k"] = options.top_k
    if options.heatmap:
        parameters["heatmap"] = True
    if jpeg_draft:
        parameters["jpeg_draft"] = True
    return parameters


def _top_k_arrays(predictions: Sequence[Prediction]) -> tuple[np.ndarray, ...]:
    return (
        np.array([p.probability for p in predictions], dtype=np.float32),
        np.array([p.index for p in predictions], dtype=np.int32),
        np.array([p.label.encode() for p in predictions], dtype=np.object_),
    )


def result_arrays(result: Classification) -> dict[str, np.ndarray]:
    """One file's outputs (no batch axis); ``heatmap`` only when the result has one."""
    probabilities, indices, labels = _top_k_arrays(result.predictions)
    per_model = [_top_k_arrays(result.per_model[name]) for name in result.models]
    arrays = {
        "probabilities": probabilities,
        "indices": indices,
        "labels": labels,
        "model_probabilities": np.stack([p[0] for p in per_model]),
        "model_indices": np.stack([p[1] for p in per_model]),
        "model_labels": np.stack([p[2] for p in per_model]),
        "models": np.array([name.encode() for name in result.models], dtype=np.object_),
        "scales": np.array(result.scales, dtype=np.int32),
        "image_size": np.array(result.image_size, dtype=np.int32),
        "timing_ms": np.array([result.timing_ms.get(s, 0.0) for s in TIMING_STAGES], np.float32),
    }
    if result.heatmap is not None:
        arrays[HEATMAP_OUTPUT] = result.heatmap.scores.astype(np.float32)
    return arrays


def _text_of(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _predictions(probabilities, indices, labels) -> list[Prediction]:
    return [
        Prediction(int(i), _text_of(label), float(p))
        for p, i, label in zip(probabilities, indices, labels, strict=True)
    ]


def classification_from_arrays(
    arrays: Mapping[str, np.ndarray], row: int, options: ClassifyOptions
) -> Classification:
    """File ``row`` of a ``classify`` answer (batch axis first) as a :class:`Classification`.

    ``arrays`` holds :data:`TOP_K_OUTPUTS` and :data:`DETAIL_OUTPUTS` (and ``heatmap`` when
    asked for); ``options`` are the resolved options the request was made with. Only the top-k
    travel, so the full probability vectors are None.
    """
    models = tuple(_text_of(name) for name in arrays["models"][row])
    per_model = {
        name: _predictions(
            arrays["model_probabilities"][row][m],
            arrays["model_indices"][row][m],
            arrays["model_labels"][row][m],
        )
        for m, name in enumerate(models)
    }
    predictions = _predictions(
        arrays["probabilities"][row], arrays["indices"][row], arrays["labels"][row]
    )
    heatmap = None
    if HEATMAP_OUTPUT in arrays and options.heatmap:
        heatmap = Heatmap(
            predictions[0].index,
            predictions[0].label,
            max(int(q) for q in arrays["scales"][row]),
            np.asarray(arrays[HEATMAP_OUTPUT][row], dtype=np.float64),
        )
    width, height = (int(v) for v in arrays["image_size"][row])
    return Classification(
        predictions=predictions,
        per_model=per_model,
        probabilities=None,
        per_model_probabilities=None,
        scales=tuple(int(q) for q in arrays["scales"][row]),
        flip=options.flip,
        models=models,
        mode=options.mode,
        image_size=(width, height),
        heatmap=heatmap,
        timing_ms={
            stage: float(ms)
            for stage, ms in zip(TIMING_STAGES, arrays["timing_ms"][row], strict=True)
        },
    )
