"""Static int8 quantisation of an exported graph for CPUs (ONNX Runtime, QDQ format).

The fp32 graph is calibrated on real images sent exactly as the server sends them (decoded by
``inference.images``, rescaled to each Q with its flip by ``inference.protocol``: uint8 NCHW
batches into the graph's own ``image`` input), then ``onnxruntime.quantization.quantize_static``
writes a QDQ graph: per-channel int8 weights, uint8 activations (the pairing ONNX Runtime
recommends for x86 CPUs with VNNI, where no range reduction is needed). Only the convolutions,
their ReLUs and the max-pools are quantised, so ONNX Runtime fuses the whole trunk into
``QLinearConv``/``MaxPool`` on uint8 tensors; the input cast and normalisation, the spatial mean
and the soft-max stay float32 (a quantised soft-max would round every posterior to 1/255).

The int8 graph is then checked against the fp32 graph on images kept out of the calibration:
top-1 agreement and the largest posterior difference under the full protocol (every Q, flips).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from PIL import Image

# export -> inference (pure protocol functions): calibration must see what the server sends.
from inference.backends.onnxruntime import OnnxRuntimeBackend
from inference.evaluation import collect
from inference.images import IMAGE_SUFFIXES, ImageError, decode_image
from inference.protocol import dense_batch

DEFAULT_CALIBRATION_IMAGES = 64
DEFAULT_VERIFY_IMAGES = 16
# With Relu and MaxPool quantised too, ONNX Runtime drops every DequantizeLinear/QuantizeLinear
# pair between convolutions; quantising only Conv left them in (VGG-16 ~1.4x slower). Keeping FC8
# in fp32 was measured too: top-1 agreement 99.9/99.5% instead of 99.7/99.4% on the demo models,
# for ~7% more time: not worth it.
QUANTIZED_OPS = ("Conv", "Relu", "MaxPool")
# int8 against fp32 under the full protocol (fused over Q and flips), on held-out images. Measured
# on the demo models over 1000 validation images: 99.4-99.7% agreement, largest difference 0.031
# (docs/benchmarks.md, "int8 accuracy"); the export's 16 held-out images gave 100% and 0.019.
MIN_TOP1_AGREEMENT = 0.9
MAX_PROB_DIFF = 0.15


class CalibrationError(ValueError):
    """Calibration input that cannot be used, said in one line with what to do."""


@dataclass(frozen=True)
class Agreement:
    """How closely the int8 graph follows the fp32 graph on some images."""

    images: int
    top1_agreement: float
    max_prob_diff: float

    def acceptable(self) -> bool:
        return self.top1_agreement >= MIN_TOP1_AGREEMENT and self.max_prob_diff <= MAX_PROB_DIFF


def select_images(
    folder: Path, calibration: int, verify: int = DEFAULT_VERIFY_IMAGES
) -> tuple[list[Path], list[Path]]:
    """Images for calibration and for the check, evenly spread over ``folder`` (walked
    recursively, sorted), so an ImageFolder tree gives every class; the check takes images the
    calibration did not see, or the calibration images when the folder has no others."""
    folder = Path(folder)
    hint = "pass --calibration DIR with images like the ones the model will serve (e.g. training images)"
    if not folder.is_dir():
        raise CalibrationError(f"calibration folder {folder} does not exist; {hint}")
    files = sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )
    if not files:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise CalibrationError(f"calibration folder {folder} holds no images ({suffixes}); {hint}")
    if calibration < 1:
        raise CalibrationError(f"--calibration-images must be at least 1, not {calibration}")
    chosen = _spread(files, calibration)
    taken = set(chosen)
    rest = [p for p in files if p not in taken]
    return chosen, _spread(rest, verify) if rest else chosen[:verify]


def _spread(files: Sequence[Path], count: int) -> list[Path]:
    if count >= len(files):
        return list(files)
    return [files[i * len(files) // count] for i in range(count)]


def decode_file(path: Path) -> Image.Image:
    """An image file decoded as the server decodes uploads; raises :class:`CalibrationError`
    naming a file that cannot be used."""
    try:
        return decode_image(path.read_bytes())
    except (OSError, ImageError) as exc:
        raise CalibrationError(
            f"cannot use calibration image {path}: {exc}; remove it or pick another folder"
        ) from exc


def serving_batches(
    files: Sequence[Path], scales: Sequence[int], flip: bool = True
) -> Iterator[tuple[int, np.ndarray]]:
    """(image index, uint8 batch) for every image and Q, exactly as the server builds them."""
    for index, path in enumerate(files):
        image = decode_file(path)
        for q in scales:
            yield index, dense_batch(image, q, flip)


class ServingCalibrationReader(CalibrationDataReader):
    """Feeds ONNX Runtime's calibrator one (image, Q) batch at a time, decoded lazily."""

    def __init__(self, files: Sequence[Path], scales: Sequence[int], flip: bool = True) -> None:
        self._batches = serving_batches(files, scales, flip)

    def get_next(self) -> dict[str, np.ndarray] | None:
        item = next(self._batches, None)
        return None if item is None else {"image": item[1]}


def quantize_int8(
    onnx_bytes: bytes,
    files: Sequence[Path],
    scales: Sequence[int],
    flip: bool = True,
    exclude_nodes: Sequence[str] = (),
) -> bytes:
    """The QDQ int8 graph of fp32 ``onnx_bytes``, calibrated (min/max) on ``files`` at ``scales``."""
    with tempfile.TemporaryDirectory(prefix="vggserve-int8-") as work:
        fp32, prepared, int8 = (Path(work) / n for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        fp32.write_bytes(onnx_bytes)
        # ONNX Runtime's own preparation: shape inference and constant folding (the exporter
        # shares equal biases through Identity nodes, which would keep those convs in float).
        quant_pre_process(str(fp32), str(prepared))
        fp32.unlink()
        quiet = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # per-tensor chatter of the quantiser
        try:
            quantize_static(
                str(prepared),
                str(int8),
                ServingCalibrationReader(files, scales, flip),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(QUANTIZED_OPS),
                nodes_to_exclude=list(exclude_nodes),
                per_channel=True,
                reduce_range=False,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
        finally:
            logging.getLogger().setLevel(quiet)
        return int8.read_bytes()


def compare(reference: np.ndarray, candidate: np.ndarray) -> Agreement:
    """Top-1 agreement and largest posterior difference of two (images, C) posterior sets."""
    agree = float(np.mean(reference.argmax(axis=1) == candidate.argmax(axis=1)))
    return Agreement(len(reference), agree, float(np.max(np.abs(reference - candidate))))


def verify_int8(
    int8_bytes: bytes,
    fp32_bytes: bytes,
    files: Sequence[Path],
    scales: Sequence[int],
    flip: bool = True,
) -> Agreement:
    """How the int8 graph agrees with the fp32 graph on ``files`` under the full protocol
    (dense evaluation at every Q of ``scales``, with flips: :mod:`inference.evaluation`)."""
    images = [decode_file(path) for path in files]
    backend = OnnxRuntimeBackend.from_graphs({"fp32": fp32_bytes, "int8": int8_bytes})
    reference, candidate = (
        collect(backend, name, images, scales, flip=flip).combine(scales)
        for name in ("fp32", "int8")
    )
    return compare(reference, candidate)
