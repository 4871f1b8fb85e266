"""How far two floating-point evaluations of one VGG may differ, derived from the arithmetic.

A format with a ``p``-bit significand rounds each operation with a relative error of at most
``u = 2**-p`` (:data:`UNIT_ROUNDOFF`: fp32 ``2**-24``, fp16 ``2**-11``, bf16 ``2**-8``).

**One dot product.** A sum of ``n`` products, added in any order, is off by at most about
``n * u * sum(|terms|)`` (Higham, *Accuracy and Stability of Numerical Algorithms*, section 3.1);
two orders of the same sum differ by at most twice that (:func:`reordered_sum_bound`). That
worst case is the right bound for one layer, but through a deep network it compounds with
``|W|`` in place of ``W`` at every layer: for the small VGG-16 of :mod:`testkit.models` it allows
a relative error of about 1e13, which says nothing.

**A network.** Rounding errors are independent and of either sign, so they add like a random
walk: a sum of ``n`` terms accumulated in a format with unit roundoff ``u_a`` makes ``n``
roundings, each of the size of its running total, about ``sqrt(n) * u_a`` relative to the
result; storing weights and activations in a format with unit roundoff ``u_s`` adds two
roundings of ``u_s`` per layer (the weight and the output). A layer passes its input's relative
error on without growing it (a random-sign dot product, ReLU and max-pooling do not amplify
it), so over the layers the errors add in quadrature: the relative error of the class score map
(its largest deviation over its largest magnitude) is about
``sqrt(u_a**2 * sum(n) + 2 * layers * u_s**2)``, ``n`` being the terms per output of each conv
and FC layer (``in_channels * kh * kw``). Measured on the small VGG-16 and VGG-19 (ONNX Runtime
against float64 PyTorch, noise and smooth images): 0.27 to 0.31 of it in fp32, 0.34 to 0.62
for fp16 weights and activations (ONNX Runtime's CPU kernels accumulate in fp32; fp16 rounding
itself is the same on every CPU). :func:`score_bound` allows
:data:`HEADROOM` times it: room for other CPUs' summation orders, and still about 1e-5 in fp32,
thousands of times below what a wrong result does (a missing flip, a wrong scale or transposed
weights change scores by tens of percent). Two fp32 evaluations in different orders differ by
about sqrt(2) times one's error, within the headroom.

**The soft-max.** ``p = softmax(z)`` moves by ``dp_i = p_i * sum_j p_j (dz_i - dz_j)``, so
``|dp_i| <= 2 p_i (1 - p_i) max|dz| <= max|dz| / 2``; spatial averaging and the means over flips,
scales, crops and models never increase the largest error. The soft-max of ``C`` classes itself,
in fp32 as the served graph computes it, adds at most ``(C + 9) u p_i``: each exponential within
a few units of rounding (4 allowed, for vectorised ``exp``), counted twice (the numerator and in
the sum), a ``C``-term sum (``C - 1``) and a division (:func:`posterior_bound`).

PyTorch and ONNX Runtime are imported by the functions that use them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

# Relative rounding error of one operation: 2**-p for a p-bit significand (implicit bit counted).
UNIT_ROUNDOFF = {"fp32": 2.0**-24, "fp16": 2.0**-11, "bf16": 2.0**-8}
# The factor between the random-walk estimate and the bound the tests assert (measured: <= 0.62).
HEADROOM = 4.0


def reordered_sum_bound(terms: int, precision: str = "fp32") -> float:
    """Two summation orders of ``terms`` products differ by at most this times ``sum(|terms|)``."""
    return 2 * terms * UNIT_ROUNDOFF[precision]


def dot_product_lengths(model: nn.Module) -> list[int]:
    """Terms per output of each convolution and linear layer of ``model``, in order."""
    from torch import nn

    lengths = []
    for layer in model.modules():
        if isinstance(layer, nn.Conv2d):
            lengths.append(layer.in_channels // layer.groups * math.prod(layer.kernel_size))
        elif isinstance(layer, nn.Linear):
            lengths.append(layer.in_features)
    return lengths


def score_bound(
    models: nn.Module | Iterable[nn.Module], precision: str = "fp32", accumulator: str = "fp32"
) -> float:
    """Relative bound (``max|error| / max|scores|``) on the score map or logits of ``models``
    with weights and activations stored in ``precision`` and sums accumulated in
    ``accumulator``, against exact arithmetic or another summation order. For several models,
    the largest of their bounds."""
    from torch import nn

    if isinstance(models, nn.Module):
        models = [models]
    stored, accumulated = UNIT_ROUNDOFF[precision], UNIT_ROUNDOFF[accumulator]
    variances = []
    for model in models:
        lengths = dot_product_lengths(model)
        variances.append(accumulated**2 * sum(lengths) + 2 * len(lengths) * stored**2)
    return HEADROOM * math.sqrt(max(variances))


def softmax_bound(classes: int) -> float:
    """Absolute bound on the rounding of an fp32 soft-max of ``classes`` posteriors (each at most
    1): ``(classes + 9) * 2**-24``."""
    return (classes + 9) * UNIT_ROUNDOFF["fp32"]


def class_count(model: nn.Module) -> int:
    """Outputs of ``model``'s last convolution or linear layer: its classes."""
    from torch import nn

    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    last = layers[-1]
    return last.out_features if isinstance(last, nn.Linear) else last.out_channels


def posterior_bound(
    models: nn.Module | Iterable[nn.Module],
    largest_score: float,
    precision: str = "fp32",
    accumulator: str = "fp32",
) -> float:
    """Absolute bound on posteriors (and their means) computed from score maps whose largest
    magnitude is ``largest_score``: half the largest score error (the soft-max's slope), plus
    the fp32 soft-max's own rounding."""
    from torch import nn

    models = [models] if isinstance(models, nn.Module) else list(models)
    classes = max(class_count(model) for model in models)
    scores = score_bound(models, precision, accumulator) * largest_score / 2
    return scores + softmax_bound(classes)


def largest_score(graphs: Iterable[Path | str], batches: Iterable[np.ndarray]) -> float:
    """The largest class score magnitude ONNX Runtime gives for any of ``batches`` (uint8
    N x 3 x H x W) through any of the exported ``graphs`` (model.onnx paths): the scale
    :func:`posterior_bound` needs when only the served graphs are at hand."""
    import numpy as np
    import onnxruntime as ort

    sessions = [
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]) for path in graphs
    ]
    largest = 0.0
    for batch in batches:
        for session in sessions:
            (scores,) = session.run(["scores"], {"image": batch})
            largest = max(largest, float(np.abs(scores).max()))
    return largest
