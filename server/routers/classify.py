"""``POST /v1/classify`` and ``POST /v1/classify/batch``: thin endpoints over the pipeline."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, File, UploadFile

from inference import ImageError
from server.dependencies import Options, State
from server.errors import BadUpload, TooManyFiles, image_error_message, image_error_status
from server.pipeline import classify_bytes, read_upload
from server.schemas import (
    BatchResponse,
    ClassifiedFile,
    ClassifyResponse,
    ErrorInfo,
    ErrorResponse,
    FailedFile,
)

router = APIRouter(prefix="/v1/classify", tags=["classify"])

ERRORS = {
    400: {"model": ErrorResponse, "description": "no file, or an empty file"},
    413: {"model": ErrorResponse, "description": "upload or pixel count over the limit"},
    415: {"model": ErrorResponse, "description": "not an image"},
    422: {"model": ErrorResponse, "description": "corrupt image, or a bad parameter (named)"},
    429: {"model": ErrorResponse, "description": "at capacity; see Retry-After"},
    503: {"model": ErrorResponse, "description": "the inference backend is down"},
}


@router.post(
    "",
    response_model=ClassifyResponse,
    response_model_exclude_none=True,
    responses=ERRORS,
    summary="Classify one image",
)
async def classify(
    state: State,
    options: Options,
    file: Annotated[UploadFile | None, File(description="the image (JPEG, PNG, ...)")] = None,
) -> ClassifyResponse:
    """Dense multi-scale classification of one image: posteriors averaged over flips, scales Q
    and models, most probable classes first."""
    started = time.perf_counter()
    data = await read_upload(file)
    async with state.admission.slot():
        return await classify_bytes(state, data, options, started)


@router.post(
    "/batch",
    response_model=BatchResponse,
    response_model_exclude_none=True,
    responses=ERRORS,
    summary="Classify several images",
)
async def classify_batch(
    state: State,
    options: Options,
    files: Annotated[
        list[UploadFile] | None, File(description="the images, in the order of the results")
    ] = None,
) -> BatchResponse:
    """Each file is classified on its own: a bad file gets an ``error`` entry with the status it
    would have had alone, the others their results. The whole batch holds one slot."""
    started = time.perf_counter()
    if not files:
        raise BadUpload(
            "no images uploaded: send them as multipart/form-data fields named 'files' "
            "(e.g. curl -F files=@a.jpg -F files=@b.png http://HOST/v1/classify/batch)"
        )
    limit = state.settings.max_batch_files
    if len(files) > limit:
        raise TooManyFiles(
            f"{len(files)} files in one batch, over the limit of {limit}; split them into "
            "several requests"
        )
    results: list[ClassifiedFile | FailedFile] = []
    async with state.admission.slot():
        for index, upload in enumerate(files):
            name = upload.filename or f"file {index + 1}"
            # Each file's "total" is its own; the first one's also counts the wait for the slot.
            file_started = started if index == 0 else time.perf_counter()
            try:
                data = await read_upload(upload, "files")
                body = await classify_bytes(state, data, options, file_started)
            except BadUpload as exc:
                results.append(_failed(name, 400, str(exc)))
            except ImageError as exc:
                results.append(_failed(name, image_error_status(exc), image_error_message(exc)))
            else:
                results.append(ClassifiedFile(filename=name, **dict(body)))
    return BatchResponse(results=results)


def _failed(filename: str, status: int, message: str) -> FailedFile:
    return FailedFile(filename=filename, error=ErrorInfo(status=status, message=message))
