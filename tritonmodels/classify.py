"""Triton model ``classify``: the paper's protocol on the repository's classifiers, over BLS.

Each request carries n encoded files (input ``image``, TYPE_STRING, shape [n, 1]) and the HTTP
API's options as KServe parameters (:mod:`inference.kserve`). Each file is decoded and rescaled
here with :mod:`inference` (the HTTP front end's code), every (model, Q) batch goes to the
classifier over Business Logic Scripting, so Triton's dynamic batcher merges it with other
requests' batches of the same shape, and the posteriors are fused as
:class:`~inference.Classifier` fuses them. A bad file or parameter fails its request alone,
with the HTTP API's message.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from inference.backends.base import BackendUnavailable
from inference.classifier import Classifier, ClassifyOptions, OptionError
from inference.images import DEFAULT_MAX_PIXELS, ImageError
from inference.kserve import HEATMAP_OUTPUT, OUTPUTS, options_from_parameters, result_arrays
from inference.repository import read_repository


class BlsBackend:
    """The repository's classifiers, called from inside Triton (Business Logic Scripting)."""

    name = "triton-bls"

    async def infer(
        self, model: str, images: np.ndarray, outputs: Sequence[str] = ("probs",)
    ) -> dict[str, np.ndarray]:
        request = pb_utils.InferenceRequest(
            model_name=model,
            requested_output_names=list(outputs),
            inputs=[pb_utils.Tensor("image", np.ascontiguousarray(images))],
        )
        response = await request.async_exec()
        if response.has_error():
            raise BackendUnavailable(f"{model} failed in Triton: {response.error().message()}")
        return {
            name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in outputs
        }

    async def ready(self) -> bool:
        return True

    async def close(self) -> None:
        pass


class TritonPythonModel:
    """One instance (one stub process): a :class:`Classifier` over the sibling classifiers."""

    def initialize(self, args: dict) -> None:
        """Read the classifiers beside this model (their config.pbtxt and labels.txt)."""
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.max_pixels = int(parameters.get("max_pixels", DEFAULT_MAX_PIXELS))
        repository = Path(args["model_repository"]).parent
        models = read_repository(repository)
        extra = {}
        if "max_rescaled_pixels" in parameters:
            extra["max_rescaled_pixels"] = int(parameters["max_rescaled_pixels"])
        self.classifier = Classifier(BlsBackend(), models, **extra)

    async def execute(self, requests: list) -> list:
        """Every request of the batch at once: their files decode while others' views run."""
        return list(await asyncio.gather(*(self._answer(request) for request in requests)))

    async def _answer(self, request):
        try:
            parameters = json.loads(request.parameters() or "{}")
            options, jpeg_draft = options_from_parameters(parameters)
            options = self.classifier.resolve(options)
            files = pb_utils.get_input_tensor_by_name(request, "image").as_numpy().reshape(-1)
            wanted = self._wanted(request, options)
            if options.heatmap and len(files) != 1:
                raise OptionError("heatmap", "send one file a request to get its heatmap")
            results = await asyncio.gather(
                *(
                    self._classify(i, len(files), data, options, jpeg_draft)
                    for i, data in enumerate(files)
                )
            )
        except (ImageError, OptionError) as exc:
            return _error(str(exc), pb_utils.TritonError.INVALID_ARG)
        except BackendUnavailable as exc:
            return _error(str(exc), pb_utils.TritonError.UNAVAILABLE)
        except Exception as exc:  # noqa: BLE001 - a bug fails its own request, not the batch
            return _error(
                f"classify failed: {type(exc).__name__}: {exc}", pb_utils.TritonError.INTERNAL
            )
        arrays = [result_arrays(result) for result in results]
        tensors = [pb_utils.Tensor(name, np.stack([a[name] for a in arrays])) for name in wanted]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    async def _classify(
        self, index: int, count: int, data: bytes, options: ClassifyOptions, jpeg_draft: bool
    ):
        try:
            return await self.classifier.classify_file(
                bytes(data), options, self.max_pixels, jpeg_draft
            )
        except ImageError as exc:
            if count == 1:
                raise
            raise type(exc)(f"file {index + 1} of {count}: {exc}") from exc

    @staticmethod
    def _wanted(request, options: ClassifyOptions) -> list[str]:
        """The outputs the client asked for (Triton lists every output when it named none); the
        heatmap only with the parameter heatmap=true, which is what computes it."""
        names = [name for name in request.requested_output_names() if name in OUTPUTS]
        return [name for name in names if name != HEATMAP_OUTPUT or options.heatmap]

    def finalize(self) -> None:
        self.classifier = None


def _error(message: str, code):
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))
