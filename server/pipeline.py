"""One uploaded file to one JSON result: read, decode off the event loop, classify, time.

The numerics live in :mod:`inference`; this module only moves bytes and measures stages.
"""

from __future__ import annotations

import time

from fastapi import UploadFile

from inference import ClassifyOptions
from server.dependencies import ServerState
from server.errors import BadUpload
from server.schemas import ClassifyResponse, classify_response


async def read_upload(upload: UploadFile | None, field: str = "file") -> bytes:
    """The bytes of an uploaded file; raises :class:`BadUpload` (400) if it is missing or empty."""
    if upload is None:
        raise BadUpload(
            f"no image uploaded: send it as the multipart/form-data field {field!r} "
            f"(e.g. curl -F {field}=@photo.jpg http://HOST/v1/classify)"
        )
    data = await upload.read()
    if not data:
        name = f" {upload.filename!r}" if upload.filename else ""
        raise BadUpload(f"the uploaded file{name} is empty (0 bytes); choose an image file")
    return data


async def classify_bytes(
    state: ServerState, data: bytes, options: ClassifyOptions, started: float
) -> ClassifyResponse:
    """Classify one image already admitted to a slot; ``started`` is ``time.perf_counter()``
    when the request began (so ``total`` includes the wait for the slot)."""
    assert state.decode_pool is not None, "the decode pool is made when the app starts"
    settings = state.settings
    classifier = await state.current_classifier()
    # Decoded here in the decode pool, or by Triton's classify with --backend triton.
    result = await classifier.classify_file(
        data, options, settings.max_pixels, settings.jpeg_draft, state.decode_pool
    )
    finished = time.perf_counter()
    timing_ms = {
        "decode": result.timing_ms.get("decode", 0.0),
        "preprocess": result.timing_ms.get("preprocess", 0.0),
        "inference": result.timing_ms.get("inference", 0.0),
        "total": (finished - started) * 1e3,
    }
    state.metrics.observe_stages(timing_ms)
    return classify_response(result, timing_ms)
