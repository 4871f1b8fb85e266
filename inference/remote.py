"""Triton's ``classify`` model as a :class:`~inference.Classifier`: the same options and
answers, with decoding, rescaling and fusion done inside Triton.

Only the file's bytes cross the network (about the file's size, against megabytes of uint8
views per model when rescaling here). The header is read here first (no pixels are decoded),
so a file that is not an image, has too many pixels or an extreme aspect ratio is refused with
the HTTP API's status before anything is sent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor

from inference.backends.triton import TritonBackend, TritonRefused
from inference.classifier import (
    DEFAULT_MAX_RESCALED_PIXELS,
    Classification,
    Classifier,
    ClassifyOptions,
)
from inference.images import DEFAULT_MAX_PIXELS, CorruptImage, open_image
from inference.kserve import (
    DETAIL_OUTPUTS,
    HEATMAP_OUTPUT,
    TOP_K_OUTPUTS,
    classification_from_arrays,
    parameters_from_options,
)
from inference.repository import ModelEntry


class RemoteClassifier(Classifier):
    """Classifies encoded files with one call each to Triton's ``classify`` model.

    ``classify`` (a decoded image) still works, rescaling here and calling each classifier.

    Args:
        backend: the Triton connection (its ``served_models`` give ``models``).
        models: the classifiers, as :meth:`TritonBackend.served_models` reads them.
        default_scales, max_rescaled_pixels: as :class:`~inference.Classifier`'s.
    """

    def __init__(
        self,
        backend: TritonBackend,
        models: Mapping[str, ModelEntry],
        default_scales: Sequence[int] | None = None,
        max_rescaled_pixels: int = DEFAULT_MAX_RESCALED_PIXELS,
    ) -> None:
        super().__init__(backend, models, default_scales, max_rescaled_pixels)
        self.backend: TritonBackend = backend

    async def classify_file(
        self,
        data: bytes,
        options: ClassifyOptions,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        jpeg_draft: bool = False,
        executor: Executor | None = None,
    ) -> Classification:
        """Fused top-k for one encoded file, computed by Triton's ``classify``.

        Raises :class:`~inference.images.ImageError` (a file ``classify`` could not decode is a
        :class:`~inference.images.CorruptImage` with its message) and
        :class:`~inference.backends.base.BackendUnavailable` while Triton is down.
        """
        opts = self.resolve(options)
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        header = await loop.run_in_executor(executor, open_image, data, max_pixels)
        self.check_image(header.size, opts.scales)
        checked = time.perf_counter()
        outputs = TOP_K_OUTPUTS + DETAIL_OUTPUTS + ((HEATMAP_OUTPUT,) if opts.heatmap else ())
        try:
            arrays = await self.backend.classify(
                [data], parameters_from_options(opts, jpeg_draft), outputs
            )
        except TritonRefused as exc:
            # The header was fine here, so what Triton refused is the image data itself.
            raise CorruptImage(str(exc)) from None
        result = classification_from_arrays(arrays, 0, opts)
        # Triton's decode plus the header check here; the network shows in the caller's total.
        result.timing_ms["decode"] += (checked - started) * 1e3
        return result
