"""FLOPs estimate of a model from onnx shape inference.

A multiply-accumulate counts as 2 FLOPs:
  Conv            2 * prod(out) * (C_in / group) * prod(kernel)
  ConvTranspose   2 * prod(in)  * (C_out / group) * prod(kernel)
  Gemm / MatMul   2 * prod(out) * K            (+ prod(out) for a Gemm bias)
  elementwise, normalisation, pooling and activations: one FLOP per output
  element (pooling: per input element). Shape-only ops (Reshape, Transpose,
  Concat, Slice, Gather, ...) count zero.
Dynamic input dims are pinned by ``input_shapes`` or onnxforge's defaults.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

ZERO_COST = {
    "Reshape", "Transpose", "Concat", "Slice", "Split", "Gather", "GatherElements", "Squeeze", "Unsqueeze",
    "Flatten", "Identity", "Shape", "Size", "Constant", "ConstantOfShape", "Cast", "Expand", "Tile", "Pad",
    "Dropout", "Range", "NonZero", "DepthToSpace", "SpaceToDepth",
}
PER_INPUT = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "ReduceMean",
             "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceL1"}


def to_proto(model) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, gs.Graph):
        return gs.export_onnx(model, do_type_check=False)
    return model.to_proto()


def pin_inputs(proto: onnx.ModelProto, input_shapes: Mapping[str, tuple] | None = None) -> onnx.ModelProto:
    """A copy whose graph inputs have static shapes and no stale value_info."""
    from onnxforge.inputs import resolve_shape

    pinned = onnx.ModelProto()
    pinned.CopyFrom(proto)
    del pinned.graph.value_info[:]
    initializers = {i.name for i in pinned.graph.initializer}
    for inp in pinned.graph.input:
        if inp.name in initializers or not inp.type.HasField("tensor_type"):
            continue
        dims = []
        for d in inp.type.tensor_type.shape.dim:
            dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
        tensor = gs.Variable(inp.name, shape=dims)
        shape = resolve_shape(tensor, input_shapes)
        del inp.type.tensor_type.shape.dim[:]
        for d in shape:
            inp.type.tensor_type.shape.dim.add().dim_value = int(d)
    return pinned


def infer_shapes(model, input_shapes: Mapping[str, tuple] | None = None, probe: bool = False) -> dict[str, tuple]:
    """Tensor name -> static shape, for the tensors inference could tell; with ``probe``
    the model runs once on seeded inputs to measure the rest."""
    proto = pin_inputs(to_proto(model), input_shapes)
    shapes = _inferred(proto)
    if probe:
        shapes.update(_probed(proto, shapes))
    return shapes


def _probed(proto: onnx.ModelProto, shapes: dict) -> dict[str, tuple]:
    from onnxforge.inputs import seeded_feeds

    from .calib import iter_outputs

    missing = sorted({name for node in proto.graph.node for name in list(node.input) + list(node.output)
                      if name and name not in shapes})
    if not missing:
        return {}
    feeds = seeded_feeds(proto)
    values = next(iter_outputs(proto, [feeds], missing))
    return {name: tuple(int(d) for d in np.shape(v)) for name, v in values.items()}


def _inferred(proto: onnx.ModelProto) -> dict[str, tuple]:
    try:
        proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:  # inference is best effort; unknown shapes count zero FLOPs
        proto = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    shapes: dict[str, tuple | None] = {}
    for vi in list(proto.graph.input) + list(proto.graph.value_info) + list(proto.graph.output):
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim)
        if None not in dims:
            shapes[vi.name] = dims
    for init in proto.graph.initializer:
        shapes[init.name] = tuple(init.dims)
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            shapes[node.output[0]] = tuple(node.attribute[0].t.dims)
    return shapes


def _prod(shape) -> int:
    return int(np.prod(shape, dtype=np.int64)) if shape else 1


def node_flops(node: onnx.NodeProto, shapes: Mapping[str, tuple | None]) -> int:
    def shape(i: int, outputs: bool = False):
        names = node.output if outputs else node.input
        return shapes.get(names[i]) if i < len(names) and names[i] else None

    op = node.op_type
    out = shape(0, outputs=True)
    if op in ZERO_COST:
        return 0
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if op == "Conv":
        w = shape(1)
        return 2 * _prod(out) * _prod(w[1:]) if out and w else 0
    if op == "ConvTranspose":
        x, w = shape(0), shape(1)
        return 2 * _prod(x) * _prod(w[1:]) if x and w else 0
    if op in ("Gemm", "MatMul"):
        a = shape(0)
        if not out or not a:
            return 0
        k = a[0] if op == "Gemm" and attrs.get("transA", 0) else a[-1]
        bias = _prod(out) if op == "Gemm" and len(node.input) > 2 and node.input[2] else 0
        return 2 * _prod(out) * int(k) + bias
    if op in PER_INPUT:
        x = shape(0)
        return _prod(x) if x else 0
    return _prod(out) if out else 0


def flops_by_node(model_or_graph, input_shapes: Mapping[str, tuple] | None = None,
                  shapes: Mapping[str, tuple] | None = None, probe: bool = True) -> dict[str, int]:
    """Node name (or first output name for unnamed nodes) -> FLOPs of the main graph.
    Shapes come from ``shapes`` or from inference (plus one seeded run when ``probe``)."""
    proto = to_proto(model_or_graph)
    shapes = shapes if shapes is not None else infer_shapes(proto, input_shapes, probe=probe)
    return {node.name or node.output[0]: node_flops(node, shapes) for node in proto.graph.node}


def estimate_flops(model_or_graph, input_shapes: Mapping[str, tuple] | None = None, probe: bool = True) -> int:
    """Total FLOPs of one inference (main graph; If/Loop bodies are not counted). Shapes
    inference cannot tell are measured by one seeded onnxruntime run unless ``probe=False``."""
    return int(sum(flops_by_node(model_or_graph, input_shapes, probe=probe).values()))
