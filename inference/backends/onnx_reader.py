"""The exported ONNX graph read back into a small PyTorch module with the very same weights.

``export/to_onnx.py`` writes one graph shape (``export/graph.py`` ServingGraph, batch-norm
already folded into the convs)::

    image uint8 -> Cast -> Mul(scale) -> Add(shift) -> [Cast] -> Conv/Relu/MaxPool[/LRN] ...
        -> Cast -> "scores";  "scores" -> ReduceMean(H, W) -> Softmax -> "probs"

:func:`read_serving_module` walks that chain backwards from ``scores`` and turns every node into
the matching ``torch.nn`` layer, loading the initializers with ``onnx.numpy_helper``. Every node
of the graph must be accounted for: anything it cannot read (an int8 QDQ graph, an unknown op, an
extra output) is refused with :class:`GraphNotReadable` instead of being silently skipped, so the
torch backend never runs something other than what ONNX Runtime runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from inference.backends.serving_module import ServingModule

# Ops of int8 graphs (QDQ from quantize_static, or integer ops from quantize_dynamic).
QUANTIZED_OPS = frozenset(
    [
        "QuantizeLinear",
        "DequantizeLinear",
        "QLinearConv",
        "ConvInteger",
        "DynamicQuantizeLinear",
        "QLinearMatMul",
        "MatMulInteger",
    ]
)
_T = onnx.TensorProto
FLOAT_TYPES = frozenset({_T.FLOAT, _T.FLOAT16, _T.BFLOAT16, _T.DOUBLE})
# The helper nodes of the exporter's decomposition of LocalResponseNorm (torch's
# F.local_response_norm: square, pad the channel axis, AveragePool3d, scale, add k, power).
LRN_HELPER_OPS = frozenset(
    [
        "Mul",
        "Shape",
        "Constant",
        "Gather",
        "Unsqueeze",
        "Concat",
        "Reshape",
        "ConstantOfShape",
        "Slice",
        "Transpose",
        "Cast",
        "Pad",
        "AveragePool",
        "Equal",
        "If",
        "Add",
        "Pow",
        "Squeeze",
    ]
)
LAYER_OPS = ("Conv", "Relu", "MaxPool", "LRN", "Cast")
SERVE_WITH_ORT = "serve this model with --backend onnxruntime"


class GraphNotReadable(ValueError):
    """An ONNX graph the torch backend cannot turn into a module; the message says why."""


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _describe(node: onnx.NodeProto) -> str:
    return f"node {node.name or node.output[0]!r} ({node.op_type})"


class _Graph:
    """Producers, constants and the bookkeeping of which nodes were read."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.constants: dict[str, np.ndarray] = {
            init.name: numpy_helper.to_array(init) for init in graph.initializer
        }
        self.producer: dict[str, onnx.NodeProto] = {}
        for node in graph.node:
            for name in node.output:
                self.producer[name] = node
        self.nodes = list(graph.node)
        self.read: set[int] = set()
        # Constant nodes and Identity aliases of initializers (the exporter shares equal biases).
        for node in graph.node:
            if node.op_type == "Constant":
                value = _attributes(node).get("value")
                if value is not None:
                    self.constants[node.output[0]] = numpy_helper.to_array(value)
                    self.mark(node)
        changed = True
        while changed:
            changed = False
            for node in graph.node:
                if (
                    node.op_type == "Identity"
                    and node.input[0] in self.constants
                    and node.output[0] not in self.constants
                ):
                    self.constants[node.output[0]] = self.constants[node.input[0]]
                    self.mark(node)
                    changed = True

    def mark(self, node: onnx.NodeProto) -> None:
        self.read.add(id(node))

    def produced_by(self, name: str, what: str) -> onnx.NodeProto:
        node = self.producer.get(name)
        if node is None:
            raise GraphNotReadable(f"tensor {name!r} ({what}) is not produced by any node")
        return node

    def constant(self, name: str, node: onnx.NodeProto) -> np.ndarray:
        if name not in self.constants:
            raise GraphNotReadable(
                f"{_describe(node)} takes {name!r}, which is computed, not a stored constant; "
                f"the torch backend reads float graphs with plain weights; {SERVE_WITH_ORT}"
            )
        return self.constants[name]

    def data_input(self, node: onnx.NodeProto) -> str:
        """The one input of ``node`` that is not a constant (the activation flowing through)."""
        computed = [name for name in node.input if name and name not in self.constants]
        if len(computed) != 1:
            raise GraphNotReadable(
                f"{_describe(node)} has {len(computed)} computed inputs; the torch backend reads "
                f"a single chain of layers; {SERVE_WITH_ORT}"
            )
        return computed[0]


def _pairs(pads: list[int], node: onnx.NodeProto) -> tuple[int, int]:
    top, left, bottom, right = pads
    if (top, left) != (bottom, right):
        raise GraphNotReadable(f"{_describe(node)} pads {pads} asymmetrically; {SERVE_WITH_ORT}")
    return top, left


def _check_auto_pad(attrs: dict, node: onnx.NodeProto) -> None:
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    if auto_pad not in (b"NOTSET", "NOTSET"):
        raise GraphNotReadable(f"{_describe(node)} uses auto_pad {auto_pad!r}; {SERVE_WITH_ORT}")


def _conv(graph: _Graph, node: onnx.NodeProto) -> nn.Conv2d:
    attrs = _attributes(node)
    _check_auto_pad(attrs, node)
    weight = graph.constant(node.input[1], node)
    bias = graph.constant(node.input[2], node) if len(node.input) > 2 and node.input[2] else None
    if weight.ndim != 4:
        raise GraphNotReadable(f"{_describe(node)} is not a 2-D convolution; {SERVE_WITH_ORT}")
    groups = int(attrs.get("group", 1))
    conv = nn.Conv2d(
        weight.shape[1] * groups,
        weight.shape[0],
        kernel_size=tuple(attrs.get("kernel_shape", weight.shape[2:])),
        stride=tuple(attrs.get("strides", (1, 1))),
        padding=_pairs(list(attrs.get("pads", (0, 0, 0, 0))), node),
        dilation=tuple(attrs.get("dilations", (1, 1))),
        groups=groups,
        bias=bias is not None,
    )
    with torch.no_grad():
        # float16 weights of an fp16 export become float32 exactly; configure() sets the dtype.
        conv.weight.copy_(torch.from_numpy(weight.astype(np.float32)))
        if bias is not None:
            conv.bias.copy_(torch.from_numpy(bias.astype(np.float32)))
    return conv


def _max_pool(node: onnx.NodeProto) -> nn.MaxPool2d:
    attrs = _attributes(node)
    _check_auto_pad(attrs, node)
    if len(node.output) > 1 and node.output[1]:
        raise GraphNotReadable(f"{_describe(node)} returns indices; {SERVE_WITH_ORT}")
    if attrs.get("storage_order", 0) != 0:
        raise GraphNotReadable(f"{_describe(node)} uses column-major order; {SERVE_WITH_ORT}")
    kernel = tuple(attrs["kernel_shape"])
    return nn.MaxPool2d(
        kernel,
        stride=tuple(attrs.get("strides", (1,) * len(kernel))),
        padding=_pairs(list(attrs.get("pads", (0, 0, 0, 0))), node),
        dilation=tuple(attrs.get("dilations", (1, 1))),
        ceil_mode=bool(attrs.get("ceil_mode", 0)),
    )


def _native_lrn(node: onnx.NodeProto) -> nn.LocalResponseNorm:
    # ONNX's LRN and PyTorch's share the convention alpha / size (checked against ORT in tests).
    attrs = _attributes(node)
    return nn.LocalResponseNorm(
        int(attrs["size"]),
        alpha=float(attrs.get("alpha", 1e-4)),
        beta=float(attrs.get("beta", 0.75)),
        k=float(attrs.get("bias", 1.0)),
    )


def _decomposed_lrn(graph: _Graph, div: onnx.NodeProto) -> nn.LocalResponseNorm:
    """``x / (k + alpha * avg_pool3d(pad(x * x)))^beta``: torch's LRN as the exporter writes it."""
    x, denominator = div.input
    not_lrn = GraphNotReadable(
        f"{_describe(div)} divides by a computed tensor that is not a local response "
        f"normalisation; {SERVE_WITH_ORT}"
    )
    side: list[onnx.NodeProto] = []
    pending, seen = [denominator], set()
    while pending:  # every node between x and the denominator
        name = pending.pop()
        if name in seen or name == x or name in graph.constants or not name:
            continue
        seen.add(name)
        node = graph.produced_by(name, "LRN")
        if node.op_type not in LRN_HELPER_OPS:
            raise not_lrn
        if all(node is not other for other in side):
            side.append(node)
        pending.extend(node.input)
    pow_node = graph.producer.get(denominator)
    pools = [n for n in side if n.op_type == "AveragePool"]
    squares = [n for n in side if n.op_type == "Mul" and list(n.input) == [x, x]]
    if pow_node is None or pow_node.op_type != "Pow" or len(pools) != 1 or len(squares) != 1:
        raise not_lrn
    add = graph.producer.get(graph.data_input(pow_node))
    scale = graph.producer.get(graph.data_input(add)) if add is not None else None
    if add is None or add.op_type != "Add" or scale is None or scale.op_type != "Mul":
        raise not_lrn
    pool = _attributes(pools[0])
    if len(pool["kernel_shape"]) != 3 or not pool.get("count_include_pad", 0):
        raise not_lrn

    def scalar(node: onnx.NodeProto) -> float:
        (name,) = (n for n in node.input if n in graph.constants)
        return float(np.asarray(graph.constants[name]).reshape(-1)[0])

    for node in side:
        graph.mark(node)
    return nn.LocalResponseNorm(
        int(pool["kernel_shape"][0]), alpha=scalar(scale), beta=scalar(pow_node), k=scalar(add)
    )


def _check_probs(graph: _Graph, probs: str) -> None:
    """``probs`` must be Softmax(axis 1) of ReduceMean over H and W of ``scores``."""
    softmax = graph.produced_by(probs, "probs")
    attrs = _attributes(softmax)
    mean = graph.producer.get(softmax.input[0])
    ok = softmax.op_type == "Softmax" and attrs.get("axis", -1) in (1, -1) and mean is not None
    if ok:
        mean_attrs = _attributes(mean)
        axes = mean_attrs.get("axes")
        if axes is None and len(mean.input) > 1:  # opset 18: axes as an input
            axes = graph.constants.get(mean.input[1])
        ok = (
            mean.op_type == "ReduceMean"
            and mean.input[0] == "scores"
            and axes is not None
            and sorted(int(a) % 4 for a in np.asarray(axes).reshape(-1)) == [2, 3]
            and mean_attrs.get("keepdims", 1) == 0
        )
    if not ok:
        raise GraphNotReadable(
            "output 'probs' is not softmax(mean over H and W of 'scores'), the graph "
            f"export/to_onnx.py writes; {SERVE_WITH_ORT}"
        )
    graph.mark(softmax)
    graph.mark(mean)


def _chain(graph: _Graph) -> list[onnx.NodeProto]:
    """The nodes from the input to ``scores``, in order."""
    chain, name = [], "scores"
    while name != "image":
        node = graph.produced_by(name, "on the path from 'image' to 'scores'")
        chain.append(node)
        name = node.input[0] if node.op_type == "Div" else graph.data_input(node)
    return chain[::-1]


def _preprocessing(graph: _Graph, chain: list[onnx.NodeProto]) -> tuple[torch.Tensor, ...]:
    ops = [node.op_type for node in chain[:3]]
    if ops != ["Cast", "Mul", "Add"] or _attributes(chain[0]).get("to") != onnx.TensorProto.FLOAT:
        raise GraphNotReadable(
            f"the graph starts with {ops}, not the exporter's Cast(float), Mul(scale), "
            f"Add(shift); {SERVE_WITH_ORT}"
        )
    values = []
    for node in chain[1:3]:
        (constant,) = (n for n in node.input if n in graph.constants)
        value = np.asarray(graph.constants[constant], dtype=np.float32)
        if value.size not in (1, 3):
            raise GraphNotReadable(f"{_describe(node)} is not per-channel; {SERVE_WITH_ORT}")
        values.append(
            torch.from_numpy(np.broadcast_to(value.reshape(-1), 3).copy()).view(1, 3, 1, 1)
        )
    return tuple(values)


def _layers(graph: _Graph, chain: list[onnx.NodeProto]) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for node in chain:
        op = node.op_type
        if op == "Cast":
            # The conv precision is the module's choice (configure()); only float casts allowed.
            if _attributes(node).get("to") not in FLOAT_TYPES:
                raise GraphNotReadable(f"{_describe(node)} casts to a non-float type")
        elif op == "Conv":
            layers.append(_conv(graph, node))
        elif op == "Relu":
            layers.append(nn.ReLU(inplace=True))
        elif op == "MaxPool":
            layers.append(_max_pool(node))
        elif op == "LRN":
            layers.append(_native_lrn(node))
        elif op == "Div":
            layers.append(_decomposed_lrn(graph, node))
        else:
            raise GraphNotReadable(
                f"{_describe(node)} is not an op the torch backend reads (it reads "
                f"{', '.join(LAYER_OPS)} after the pre-processing); {SERVE_WITH_ORT}"
            )
    if not any(isinstance(layer, nn.Conv2d) for layer in layers):
        raise GraphNotReadable(f"the graph holds no convolution; {SERVE_WITH_ORT}")
    return layers


def read_serving_module(path: str | Path) -> ServingModule:
    """The float32 :class:`ServingModule` of an exported ``model.onnx``.

    Raises:
        GraphNotReadable: the graph is not one ``export/to_onnx.py`` writes in fp32 or fp16 (an
            int8 QDQ graph, an unknown op, other inputs or outputs), with what to do instead.
    """
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf raises several types for a damaged file
        raise GraphNotReadable(f"cannot read {path}: {exc}") from exc
    graph = _Graph(model.graph)
    try:
        return _read(graph, model.graph)
    except GraphNotReadable as exc:
        raise GraphNotReadable(f"{path}: {exc}") from None


def _read(graph: _Graph, proto: onnx.GraphProto) -> ServingModule:
    quantized = sorted({n.op_type for n in proto.node if n.op_type in QUANTIZED_OPS})
    if quantized:
        raise GraphNotReadable(
            f"an int8 quantised graph ({', '.join(quantized)} nodes); the torch backend runs "
            f"fp32 and fp16 exports only; {SERVE_WITH_ORT}"
        )
    inputs = [
        (i.name, i.type.tensor_type.elem_type) for i in proto.input if i.name not in graph.constants
    ]
    if inputs != [("image", onnx.TensorProto.UINT8)]:
        raise GraphNotReadable(
            f"inputs {inputs} are not the single uint8 'image' of export/to_onnx.py; "
            f"{SERVE_WITH_ORT}"
        )
    outputs = sorted(o.name for o in proto.output)
    if outputs != ["probs", "scores"]:
        raise GraphNotReadable(f"outputs {outputs} are not 'probs' and 'scores'; {SERVE_WITH_ORT}")
    _check_probs(graph, "probs")
    chain = _chain(graph)
    scale, shift = _preprocessing(graph, chain)
    layers = _layers(graph, chain[3:])
    for node in chain:
        graph.mark(node)
    unread = [node for node in graph.nodes if id(node) not in graph.read]
    if unread:
        raise GraphNotReadable(
            f"{_describe(unread[0])} (and {len(unread) - 1} more) is off the chain from 'image' "
            f"to 'scores'; {SERVE_WITH_ORT}"
        )
    return ServingModule(scale, shift, layers).eval().requires_grad_(False)
