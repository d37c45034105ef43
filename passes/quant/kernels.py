"""What onnxruntime really runs for a quantized model: the integer kernels its
optimized CPU graph holds, and float weights a clean quantized model must not keep."""
from __future__ import annotations

from typing import Mapping

import onnx

from onnxforge.errors import OptionError

from .formats import _all_nodes

INTEGER_KERNELS = (
    "QLinearConv", "QGemm", "QLinearMatMul", "QAttention", "MatMulInteger", "ConvInteger",
    "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QLinearAdd", "QLinearMul",
    "QLinearGlobalAveragePool", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu",
    "QLinearAveragePool", "QLinearSoftmax", "NhwcQLinearConv", "DynamicQuantizeLSTM",
)


def integer_kernels(model: onnx.ModelProto, provider: str = "cpu") -> dict[str, int]:
    """Op counts of the graph onnxruntime really runs (its optimized graph): which
    integer kernels the Q/DQ placement turned into."""
    from .prepare import ort_offline

    if provider != "cpu":
        raise OptionError("integer kernel check runs on the CPU provider only")
    optimized = ort_offline(model, level="extended", weights=False)
    counts: dict[str, int] = {}
    for node in _all_nodes(optimized.graph):
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def summarize_kernels(counts: Mapping[str, int]) -> dict[str, int]:
    return {op: n for op, n in sorted(counts.items()) if op in INTEGER_KERNELS or op in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")}


def stale_float_weights(model: onnx.ModelProto) -> list[str]:
    """Float initializers that duplicate a quantized weight (same name stem) or that
    nothing reads; empty for a clean quantized model."""
    used = {name for node in _all_nodes(model.graph) for name in node.input}
    quantized = {t.name[: -len("_quantized")] for t in model.graph.initializer if t.name.endswith("_quantized")}
    stale = []
    for t in model.graph.initializer:
        if t.data_type != onnx.TensorProto.FLOAT:
            continue
        if t.name not in used or t.name in quantized:
            stale.append(t.name)
    return stale


