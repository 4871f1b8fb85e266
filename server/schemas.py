"""Request and response bodies as pydantic models, so ``/docs`` documents the API itself."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from inference import Classification, ModelEntry, Prediction


class PredictionOut(BaseModel):
    index: int = Field(description="class index in the model's labels.txt")
    label: str
    probability: float = Field(ge=0, le=1)


class ImageSize(BaseModel):
    width: int
    height: int


class Timing(BaseModel):
    """Milliseconds per stage of this image; ``total`` also counts waiting for a free slot."""

    decode: float
    preprocess: float
    inference: float
    total: float


class HeatmapOut(BaseModel):
    """Class score map of the fused top-1 class at the largest Q (raw scores, row-major)."""

    index: int
    label: str
    scale: int
    width: int
    height: int
    scores: list[list[float]] = Field(description="height rows of width scores")


class ClassifyResponse(BaseModel):
    predictions: list[PredictionOut] = Field(
        description="fused over flips, scales and models; most probable first"
    )
    per_model: dict[str, list[PredictionOut]]
    scales: list[int]
    flip: bool
    models: list[str]
    mode: Literal["dense", "multicrop", "both"]
    image: ImageSize
    timing_ms: Timing
    heatmap: HeatmapOut | None = Field(default=None, description="present when heatmap=true")


class ClassifiedFile(ClassifyResponse):
    filename: str


class ErrorInfo(BaseModel):
    status: int = Field(description="the status this file alone would have got")
    message: str


class FailedFile(BaseModel):
    filename: str
    error: ErrorInfo


class BatchResponse(BaseModel):
    results: list[ClassifiedFile | FailedFile] = Field(description="in upload order")


class Preprocessing(BaseModel):
    mean: list[float]
    std: list[float]
    input: str = Field(description="what the graph takes; normalisation happens inside it")


class ServedModel(BaseModel):
    name: str
    arch: str
    classes: int
    min_size: int = Field(description="smallest accepted Q (the training crop)")
    scales: list[int] = Field(description="the Q this model runs at when a request names none")
    preprocessing: Preprocessing
    backend: str
    version: int
    precision: str


class ModelsResponse(BaseModel):
    models: list[ServedModel]
    default_scales: list[int] = Field(
        description="Q of a request that names none: the models' serving scales (their union "
        "when they differ), or the server's --scales"
    )
    shape_multiple: int | None = Field(
        None, description="longer rescaled side rounded to this multiple; null: exact rescaling"
    )


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    ready: bool
    backend: str
    detail: str | None = None


class ErrorResponse(BaseModel):
    detail: str = Field(description="what was wrong and what to do about it")


def prediction_out(prediction: Prediction) -> PredictionOut:
    """One class of a result."""
    return PredictionOut(
        index=prediction.index, label=prediction.label, probability=prediction.probability
    )


def classify_response(result: Classification, timing_ms: dict[str, float]) -> ClassifyResponse:
    """The JSON body for one classified image."""
    heatmap = None
    if result.heatmap is not None:
        scores = result.heatmap.scores
        heatmap = HeatmapOut(
            index=result.heatmap.index,
            label=result.heatmap.label,
            scale=result.heatmap.scale,
            width=int(scores.shape[1]),
            height=int(scores.shape[0]),
            scores=scores.tolist(),
        )
    width, height = result.image_size
    return ClassifyResponse(
        predictions=[prediction_out(p) for p in result.predictions],
        per_model={name: [prediction_out(p) for p in ps] for name, ps in result.per_model.items()},
        scales=list(result.scales),
        flip=result.flip,
        models=list(result.models),
        mode=result.mode,
        image=ImageSize(width=width, height=height),
        timing_ms=Timing(**timing_ms),
        heatmap=heatmap,
    )


def served_model(entry: ModelEntry, backend: str, scales: tuple[int, ...]) -> ServedModel:
    """What a client needs to know about one served model."""
    return ServedModel(
        name=entry.name,
        arch=entry.arch,
        classes=entry.num_classes,
        min_size=entry.min_size,
        scales=list(scales),
        preprocessing=Preprocessing(
            mean=list(entry.mean), std=list(entry.std), input="uint8 RGB NCHW"
        ),
        backend=backend,
        version=entry.version,
        precision=entry.precision,
    )
