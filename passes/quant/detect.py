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

import onnx

from onnxforge.model import iter_graph_protos
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
    for graph in iter_graph_protos(model.graph):
        _scan_graph(graph, found)
    return found


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


def int8_weights_to_dynamic_matmul(
    model: onnx.ModelProto, detection: Detection, saturating: bool = False,
) -> tuple[onnx.ModelProto, list[str]]:
    """MatMuls reading a Cast+Mul int8 weight of ``detection`` become DynamicQuantizeMatMul
    on the same int8 values: the registered pass int8-weights-to-dynamic-matmul
    (passes/qdq/int8_weights.py, its math and preconditions there). ``saturating``: the
    CPU's u8 x s8 products saturate (no VNNI). Returns the model and the names of the
    rewritten MatMuls."""
    from .registered import apply_passes

    settings = {"weights": [w.quantized for w in detection.weight_only], "saturating": saturating}
    out, _fired = apply_passes(one_default_domain(model, copy=True), ("int8-weights-to-dynamic-matmul",),
                              options={"int8-weights-to-dynamic-matmul": settings})
    before = {n.name for n in model.graph.node}
    return out, [n.name for n in out.graph.node if n.op_type == "DynamicQuantizeMatMul" and n.name not in before]
