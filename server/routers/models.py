"""``GET /v1/models``: what is served, and what each model expects."""

from __future__ import annotations

from fastapi import APIRouter

from inference import ClassifyOptions
from server.dependencies import State
from server.schemas import ModelsResponse, served_model

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models", response_model=ModelsResponse, summary="List the served models")
async def list_models(state: State) -> ModelsResponse:
    """Each model's architecture, class count, minimum Q, pre-processing and version."""
    backend = state.settings.backend
    classifier = await state.current_classifier()
    defaults = classifier.resolve(ClassifyOptions())
    return ModelsResponse(
        models=[
            served_model(entry, backend, defaults.model_scales[name])
            for name, entry in classifier.models.items()
        ],
        default_scales=list(defaults.scales),
        shape_multiple=state.settings.shape_multiple,
    )
