"""One uploaded file to one JSON result: read, decode off the event loop, classify, time.

The numerics live in :mod:`inference`; this module only moves bytes and measures stages.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import UploadFile

from inference import ClassifyOptions
from inference.images import decode_image
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
    loop = asyncio.get_running_loop()
    decode_started = time.perf_counter()
    settings = state.settings
    # --jpeg-draft: large JPEGs decode at reduced size, never below twice the largest Q (the
    # options come resolved by the Options dependency: their scales are every Q used).
    draft = 2 * max(options.scales) if settings.jpeg_draft else None
    image = await loop.run_in_executor(
        state.decode_pool, decode_image, data, settings.max_pixels, draft
    )
    decoded = time.perf_counter()
    result = await state.classifier.classify(image, options)
    finished = time.perf_counter()
    timing_ms = {
        "decode": (decoded - decode_started) * 1e3,
        "preprocess": result.timing_ms.get("preprocess", 0.0),
        "inference": result.timing_ms.get("inference", 0.0),
        "total": (finished - started) * 1e3,
    }
    state.metrics.observe_stages(timing_ms)
    return classify_response(result, timing_ms)
