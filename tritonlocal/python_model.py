"""Triton Python-backend model that runs an exported VGG ``model.onnx`` with ONNX Runtime.

This file is installed as ``<model>/<version>/model.py`` of the local twin repository (see
:mod:`tritonlocal.twin`); ``model.onnx`` beside it is a link to the production repository's
file, so the twin serves exactly the graph NVIDIA's ``onnxruntime_onnx`` backend would.

It runs inside Triton's Python stub, on the interpreter that started the server (its ``bin`` is
first on the stub's PATH), so the session is opened with the project's own choices
(:func:`inference.backends.onnxruntime.session_options`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

from inference.backends.onnxruntime import session_options
from inference.cores import available_cores

OUTPUTS = ("probs", "scores")
# Largest run, in input pixels (N x H x W): 8 views of 512x683, ~0.7 GB of VGG activations.
MAX_RUN_PIXELS = int(os.environ.get("VGGSERVE_TRITON_MAX_RUN_PIXELS", str(8 * 512 * 683)))


class TritonPythonModel:
    """One instance: one ONNX Runtime session over this version's ``model.onnx``."""

    def initialize(self, args: dict) -> None:
        """Open the session.

        Parameters
        ----------
        args : dict
            Triton's arguments: ``model_config`` (JSON), ``model_repository`` (the model's
            folder), ``model_version``, ``model_name``.
        """
        config = json.loads(args["model_config"])
        self.name = args["model_name"]
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.min_size = int(parameters.get("min_size", "1"))
        # Instances of this model share the cores: each gets its part (at least one thread).
        instances = sum(group.get("count", 1) for group in config.get("instance_group", [])) or 1
        threads = int(os.environ.get("VGGSERVE_TRITON_THREADS", "0"))
        threads = threads or max(1, available_cores() // instances)
        self.session = ort.InferenceSession(
            str(path), session_options(threads), providers=["CPUExecutionProvider"]
        )

    def execute(self, requests: list) -> list:
        """Run the batch the dynamic batcher formed: one ONNX Runtime run per input shape.

        Parameters
        ----------
        requests : list of pb_utils.InferenceRequest
            Requests of possibly different image sizes; those of one (H, W) are concatenated
            along N (up to MAX_RUN_PIXELS per run), run, and the results split back.

        Returns
        -------
        list of pb_utils.InferenceResponse
            One response per request, in order, with only the outputs it asked for.
        """
        responses: list = [None] * len(requests)
        groups: dict[tuple[int, ...], list[int]] = {}
        images: list[np.ndarray] = []
        for i, request in enumerate(requests):
            array = pb_utils.get_input_tensor_by_name(request, "image").as_numpy()
            images.append(array)
            if array.ndim != 4 or array.shape[1] != 3 or min(array.shape[2:]) < self.min_size:
                responses[i] = self._error(
                    f"{self.name} expects uint8 images (N, 3, H, W) with H, W >= "
                    f"{self.min_size}; got shape {list(array.shape)}"
                )
                continue
            groups.setdefault(array.shape[1:], []).append(i)

        for members in groups.values():
            for chunk in self._chunks(members, images):
                self._run(chunk, requests, images, responses)
        return responses

    def _run(self, members: list[int], requests: list, images: list, responses: list) -> None:
        """One ONNX Runtime run over the concatenated images of ``members`` (one shape)."""
        wanted = [self._wanted(requests[i]) for i in members]
        names = [name for name in OUTPUTS if any(name in w for w in wanted)]
        batch = np.concatenate([images[i] for i in members], axis=0)
        try:
            results = dict(zip(names, self.session.run(names, {"image": batch}), strict=True))
        except Exception as exc:  # noqa: BLE001 - every request gets the reason
            for i in members:
                responses[i] = self._error(f"ONNX Runtime failed on {self.name}: {exc}")
            return
        start = 0
        for i, want in zip(members, wanted, strict=True):
            stop = start + images[i].shape[0]
            tensors = [pb_utils.Tensor(name, results[name][start:stop]) for name in want]
            responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
            start = stop

    @staticmethod
    def _chunks(members: list[int], images: list) -> list[list[int]]:
        """Requests split into runs of at most MAX_RUN_PIXELS input pixels (at least one each).

        The batcher may hand over up to max_batch_size images; at Q=512 one full-size VGG run of
        64 views would need tens of GB of activations on a CPU.
        """
        chunks: list[list[int]] = [[]]
        pixels = 0
        for i in members:
            size = int(np.prod(images[i].shape[:1] + images[i].shape[2:]))
            if chunks[-1] and pixels + size > MAX_RUN_PIXELS:
                chunks.append([])
                pixels = 0
            chunks[-1].append(i)
            pixels += size
        return chunks

    def finalize(self) -> None:
        """Release the session."""
        self.session = None

    @staticmethod
    def _wanted(request) -> list[str]:
        """Outputs the client asked for (all of them when it named none)."""
        names = [n for n in request.requested_output_names() if n in OUTPUTS]
        return names or list(OUTPUTS)

    @staticmethod
    def _error(message: str):
        return pb_utils.InferenceResponse(
            output_tensors=[], error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
        )
