"""Recognising models that are already quantized, so they are never quantized twice.

Forms recognised:
  * QDQ: QuantizeLinear / DequantizeLinear nodes;
  * QOperator: QLinearConv, QLinearMatMul, QGemm, QAttention, QLinear* (com.microsoft);
  * integer ops: ConvInteger, MatMulInteger, DynamicQuantizeLinear,
    DynamicQuantizeMatMul, MatMulIntegerToFloat, MatMulNBits;
  * weight-only int8: an int8/uint8 initializer -> Cast(to float) -> Mul(scale)
    [-> its consumers], i.e. dequantization written out in float ops.

Re-quantizing any of these rounds already-rounded values a second time with a
new scale. The first three forms are refused. The weight-only form is kept as
it is, except that a MatMul reading such a weight with a per-tensor or
per-column scale can run as DynamicQuantizeMatMul on the *same* int8 values:
  MatMul(X, Cast(Wq) * s) == DynamicQuantizeMatMul(X, Wq, s, 0)
up to the dynamic (per call) u8 quantization of X; no weight is re-rounded.
Without VNNI, onnxruntime's u8 x s8 kernel (VPMADDUBSW) saturates the 16-bit
sum of two products, 255 * 127 * 2 > 32767: int8 weights past the 7-bit range
([-64, 64] cannot saturate) are then stored shifted, exactly, as uint8 with
zero point 128 (Wq + 128 - 128), which runs on the u8 x u8 kernel instead:
  DynamicQuantizeMatMul(X, Wq + 128, s, 128)
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxforge.opsets import one_default_domain

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
INTEGER_OPS = (
    "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
    "MatMulNBits", "DynamicQuantizeLSTM", "QAttention", "QOrderedMatMul",
)
INT_TYPES = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4)


@dataclasses.dataclass
class WeightOnly:
    """An int weight dequantized by Cast + Mul."""

    quantized: str  # int initializer
    scale: str  # float initializer
    cast: str  # node names
    mul: str
    output: str  # the float weight tensor
    consumers: list[str]


@dataclasses.dataclass
class Detection:
    forms: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # form -> node names
    weight_only: list[WeightOnly] = dataclasses.field(default_factory=list)

    @property
    def quantized(self) -> bool:
        return bool(self.forms) or bool(self.weight_only)

    @property
    def refuses(self) -> bool:
        """True when the model holds integer kernels or Q/DQ: nothing is left to quantize."""
        return bool(self.forms)

    def describe(self) -> str:
        parts = [f"{form} ({len(nodes)} nodes)" for form, nodes in self.forms.items()]
        if self.weight_only:
            parts.append(f"int8 weights dequantized by Cast+Mul ({len(self.weight_only)} weights)")
        return ", ".join(parts) if parts else "float"

    def as_dict(self) -> dict:
        return {
            "forms": {k: len(v) for k, v in self.forms.items()},
            "weight_only": [w.quantized for w in self.weight_only],
        }


def detect(model: onnx.ModelProto) -> Detection:
    found = Detection()
    for graph in _graphs(model.graph):
        _scan_graph(graph, found)
    return found


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _graphs(attr.g)
            for sub in attr.graphs:
                yield from _graphs(sub)


def _scan_graph(graph: onnx.GraphProto, found: Detection) -> None:
    for node in graph.node:
        form = _node_form(node)
        if form:
            found.forms.setdefault(form, []).append(node.name or node.output[0])
    found.weight_only.extend(_weight_only(graph))


def _node_form(node: onnx.NodeProto) -> str | None:
    if node.op_type in QDQ_OPS:
        return "QDQ"
    if node.op_type.startswith("QLinear") or node.op_type in ("QGemm", "NhwcQLinearConv"):
        return "QOperator"
    if node.op_type in INTEGER_OPS:
        return "integer ops"
    return None


def _weight_only(graph: onnx.GraphProto) -> list[WeightOnly]:
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found = []
    for cast in graph.node:
        if cast.op_type != "Cast" or cast.input[0] not in inits or inits[cast.input[0]].data_type not in INT_TYPES:
            continue
        users = consumers.get(cast.output[0], [])
        if len(users) != 1 or users[0].op_type != "Mul":
            continue
        mul = users[0]
        scale = next((i for i in mul.input if i != cast.output[0]), None)
        if scale not in inits:
            continue
        found.append(WeightOnly(
            cast.input[0], scale, cast.name, mul.name, mul.output[0],
            [n.name for n in consumers.get(mul.output[0], [])],
        ))
    return found


# ------------------------------------------------------------------ reuse the int8 weights


# |w| <= 64: two u8 x s8 products stay within int16 (255 * 64 * 2 = 32640)
SATURATION_FREE = 64


def int8_weights_to_dynamic_matmul(
    model: onnx.ModelProto, detection: Detection, saturating: bool = False,
) -> tuple[onnx.ModelProto, list[str]]:
    """MatMuls reading a Cast+Mul int8 weight become DynamicQuantizeMatMul on the same
    int8 values. ``saturating``: the CPU's u8 x s8 products saturate (no VNNI), so
    int8 weights past 7 bits are stored as the same values shifted to uint8 (zero
    point 128). Returns the model and the names of the rewritten MatMuls."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    one_default_domain(out)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    rewritten: list[str] = []
    new_inits: list[onnx.TensorProto] = []
    for weight in detection.weight_only:
        users = consumers.get(weight.output, [])
        matmuls = [n for n in users if n.op_type == "MatMul" and n.input[1] == weight.output]
        qw = inits[weight.quantized]
        scale = numpy_helper.to_array(inits[weight.scale]).astype(np.float32)
        if not matmuls or len(qw.dims) != 2 or not _column_scale(scale, qw.dims[1]):
            continue
        columns = qw.dims[1]
        scale_name, zp_name = weight.quantized + "_dq_scale", weight.quantized + "_dq_zero_point"
        new_inits.append(numpy_helper.from_array(np.broadcast_to(scale.reshape(-1), (columns,)).astype(np.float32).copy(), scale_name))
        values, zero = weight.quantized, np.zeros(columns, dtype=helper.tensor_dtype_to_np_dtype(qw.data_type))
        if saturating and qw.data_type == onnx.TensorProto.INT8:
            shifted = _unsigned_if_saturating(numpy_helper.to_array(qw), weight.quantized + "_u8")
            if shifted is not None:
                new_inits.append(shifted)
                values, zero = shifted.name, np.full(columns, 128, np.uint8)
        new_inits.append(numpy_helper.from_array(zero, zp_name))
        for matmul in matmuls:
            replacement = helper.make_node(
                "DynamicQuantizeMatMul", [matmul.input[0], values, scale_name, zp_name], list(matmul.output),
                name=(matmul.name or matmul.output[0]) + "_int8", domain="com.microsoft",
            )
            matmul.CopyFrom(replacement)
            rewritten.append(replacement.name)
    if rewritten:
        graph.initializer.extend(new_inits)
        _drop_dead(graph)
        if not any(o.domain == "com.microsoft" for o in out.opset_import):
            out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return out, rewritten


def _unsigned_if_saturating(values: np.ndarray, name: str) -> onnx.TensorProto | None:
    """``values`` + 128 as uint8 (exact) when some exceed the saturation-free range, else None."""
    if not values.size or max(-int(values.min()), int(values.max())) <= SATURATION_FREE:
        return None
    return numpy_helper.from_array((values.astype(np.int16) + 128).astype(np.uint8), name)


def _column_scale(scale: np.ndarray, columns: int) -> bool:
    if scale.size == 1:
        return True
    return scale.size == columns and (scale.ndim == 1 or scale.shape[-1] == columns)


def _drop_dead(graph: onnx.GraphProto) -> None:
    """Remove nodes and initializers nothing reads (the now unused Cast+Mul chains)."""
    needed = {o.name for o in graph.output}
    kept: list[onnx.NodeProto] = []
    for node in reversed(list(graph.node)):
        has_subgraph = any(a.HasField("g") or len(a.graphs) for a in node.attribute)
        if has_subgraph or any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
            for graph_attr in (a.g for a in node.attribute if a.HasField("g")):
                needed.update(i for n in graph_attr.node for i in n.input)
    kept.reverse()
    del graph.node[:]
    graph.node.extend(kept)
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
