"""Helpers shared by the fusion rules: constant lookup, consumer walking, shapes.

Rules match on structure only; these helpers let them see a constant whether it
is an initializer, a Constant node or an Identity of either, and let ``check``
prove that no intermediate tensor of a pattern escapes it.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxforge.context import PassContext, Refusal
from onnxforge.passes.base import Match, Rule
from onnxforge.passes.matching import producer, producer_op  # noqa: F401  (re-exported)

MS_DOMAIN = "com.microsoft"


def const_value(tensor: gs.Tensor | None) -> np.ndarray | None:
    """The value of an initializer, a Constant node output, or an Identity of one; else None."""
    for _ in range(8):  # follow a short chain of Identity nodes
        if tensor is None:
            return None
        if isinstance(tensor, gs.Constant):
            return np.asarray(tensor.values)
        node = producer(tensor)
        if node is None:
            return None
        if node.op == "Constant" and not node.domain:
            value = node.attrs.get("value")
            if isinstance(value, gs.Constant):
                return np.asarray(value.values)
            for key in ("value_float", "value_int"):
                if key in node.attrs:
                    return np.asarray(node.attrs[key])
            return None
        if node.op != "Identity":
            return None
        tensor = node.inputs[0]
    return None


def is_const(tensor: gs.Tensor | None) -> bool:
    """Whether ``const_value`` finds a value, decided without reading it (weights may be
    external and large)."""
    for _ in range(8):
        if tensor is None:
            return False
        if isinstance(tensor, gs.Constant):
            return True
        node = producer(tensor)
        if node is None:
            return False
        if node.op == "Constant" and not node.domain:
            return isinstance(node.attrs.get("value"), gs.Constant) or any(
                key in node.attrs for key in ("value_float", "value_int"))
        if node.op != "Identity":
            return False
        tensor = node.inputs[0]
    return False


def const_ints(tensor: gs.Tensor | None) -> np.ndarray | None:
    """The values of an integer constant (as ``const_value`` finds it), else None."""
    value = const_value(tensor)
    return value if value is not None and value.dtype.kind in "iu" else None


def scalar(tensor: gs.Tensor | None) -> float | None:
    value = const_value(tensor)
    if value is None or value.size != 1 or value.dtype.kind not in "fiu":
        return None
    return float(value.reshape(-1)[0])


def near(value: float | None, target: float, rtol: float = 1e-4) -> bool:
    return value is not None and abs(value - target) <= rtol * abs(target)


def consumers(graph: gs.Graph, tensor: gs.Tensor) -> list[gs.Node]:
    return list(tensor.outputs)


def consumer_op(tensor: gs.Tensor, *ops: str) -> gs.Node | None:
    """The first default-domain consumer of ``tensor`` whose op is one of ``ops``."""
    for node in tensor.outputs:
        if node.op in ops and not node.domain:
            return node
    return None


def other_input(node: gs.Node, tensor: gs.Tensor) -> gs.Tensor | None:
    """For a binary op fed ``tensor`` on one side, the tensor on the other side."""
    if len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if a is tensor:
        return b
    if b is tensor:
        return a
    return None


def either_order(node: gs.Node) -> tuple[tuple[gs.Tensor, gs.Tensor], ...]:
    """A commutative binary op's operands in both orders, (a, b) first; () unless two."""
    if len(node.inputs) != 2:
        return ()
    a, b = node.inputs
    return (a, b), (b, a)


def split_const(node: gs.Node) -> tuple[gs.Tensor, gs.Tensor] | None:
    """(variable input, constant input) of a binary op with exactly one constant side."""
    if len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if is_const(b) and not is_const(a):
        return a, b
    if is_const(a) and not is_const(b):
        return b, a
    return None


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(out is tensor for out in graph.outputs)


def escaping(graph: gs.Graph, nodes: list[gs.Node], keep_tensors=(), keep_nodes=(),
             ignore_readers: tuple[str, ...] = ()) -> list[tuple[gs.Node, gs.Tensor]]:
    """(node, tensor) for each output of ``nodes`` that is a graph output or is read by a
    node outside ``nodes``: the outputs in ``keep_tensors`` and of ``keep_nodes`` excepted
    (the fused node makes those), and readers whose op is in ``ignore_readers`` not counted."""
    inside = {id(n) for n in nodes}
    keep = {id(t) for t in keep_tensors}
    kept_nodes = {id(n) for n in keep_nodes}
    found = []
    for node in nodes:
        if id(node) in kept_nodes:
            continue
        for out in node.outputs:
            if id(out) in keep:
                continue
            outside = [c for c in out.outputs if id(c) not in inside and c.op not in ignore_readers]
            if is_graph_output(graph, out) or outside:
                found.append((node, out))
    return found


def fused_outputs(match: Match) -> tuple[gs.Tensor, ...]:
    """The tensors the fused node makes: the ``outputs`` field of the rule's match, none
    when its match has no such field."""
    return tuple(getattr(match.info, "outputs", ()))


def escaping_tensor(graph: gs.Graph, match: Match) -> gs.Tensor | None:
    """An intermediate tensor of the match read outside it (or a graph output), if any."""
    found = escaping(graph, match.nodes, keep_tensors=fused_outputs(match))
    return found[0][1] if found else None


def float_dtype(value: np.ndarray | None) -> bool:
    return value is not None and value.dtype in (np.float32, np.float16, np.float64)


def replace(graph: gs.Graph, match: Match, op: str, inputs: list, attrs: dict | None = None,
            domain: str | None = None, outputs: list | None = None, name: str | None = None) -> gs.Node:
    """Detach the match's outputs from their producers and add one node making them."""
    outs = outputs if outputs is not None else list(fused_outputs(match))
    for k, node in enumerate(match.nodes):
        for i, out in enumerate(list(node.outputs)):
            if any(out is o for o in outs):
                # Named from the match, never id(): outputs must be byte-identical run to run.
                node.outputs[i] = gs.Variable(f"{out.name}__detached_{k}_{i}")
    node = gs.Node(op, name=name or f"{match.nodes[0].name or op}_fused_{op}", attrs=attrs or {},
                   inputs=inputs, outputs=outs, domain=domain)
    graph.nodes.append(node)
    return node


def fresh_constant(graph: gs.Graph, base: str, values: np.ndarray) -> gs.Constant:
    """A new initializer with a name not used in the graph."""
    names = graph.tensors().keys()
    name, k = base, 0
    while name in names:
        k += 1
        name = f"{base}_{k}"
    return gs.Constant(name, np.asarray(values, order="C"))  # ascontiguousarray would make a scalar [1]


def need_ms_domain(ctx: PassContext) -> None:
    if ctx.model is not None:
        ctx.model.ensure_domain(MS_DOMAIN, 1)


def model_opset(graph: gs.Graph, ctx: PassContext) -> int:
    if ctx.model is not None and ctx.model.opset() is not None:
        return int(ctx.model.opset())
    return int(graph.opset or 0)


class FusionRule(Rule):
    """A rule whose ``check`` first refuses when a pattern tensor is read outside it,
    then asks ``preconditions`` (subclasses) for the rule's own reasons or plan."""

    def check(self, graph: gs.Graph, match: Match, ctx: PassContext) -> Refusal | None:
        escaped = escaping_tensor(graph, match)
        if escaped is not None:
            return self.refusal(f"intermediate tensor {escaped.name} has other consumers", match)
        verdict = self.preconditions(graph, match, ctx)
        return self.refusal(verdict, match) if isinstance(verdict, str) else verdict

    def preconditions(self, graph: gs.Graph, match: Match, ctx: PassContext) -> Any:
        """The reason to refuse (a str), or None, or a plan for rewrite (``match.plan``)."""
        return None


# ---------------------------------------------------------------- shapes


@dataclasses.dataclass
class Shapes:
    """Inferred dims by tensor name: ints, dim_param strings (symbolic) or None."""

    dims: dict[str, tuple | None]

    def of(self, tensor: gs.Tensor) -> tuple | None:
        if isinstance(tensor, gs.Constant):
            return tuple(int(d) for d in tensor.shape)
        if tensor.shape is not None and all(isinstance(d, (int, str)) and d != "" for d in tensor.shape):
            if not any(isinstance(d, int) and d < 0 for d in tensor.shape):
                return tuple(tensor.shape)
        return self.dims.get(tensor.name)


def infer_shapes(graph: gs.Graph, ctx: PassContext) -> Shapes:
    """onnx shape inference (with data propagation) keeping symbolic dim names; empty on failure."""
    from onnxforge.passes.cleanup.common import export_for_inference

    try:
        proto = export_for_inference(graph, ctx)
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)
    except Exception as exc:  # inference is an aid: without it rules refuse, never guess
        ctx.warn(f"fusion: onnx shape inference failed ({type(exc).__name__}); shape-dependent fusions refused")
        return Shapes({})
    dims: dict[str, tuple | None] = {}
    infos = list(inferred.graph.input) + list(inferred.graph.output) + list(inferred.graph.value_info)
    for info in infos:
        tt = info.type.tensor_type
        if not info.type.HasField("tensor_type") or not tt.HasField("shape"):
            continue
        dims[info.name] = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim
        )
    return Shapes(dims)


def same_known_shape(a: tuple | None, b: tuple | None) -> bool:
    return a is not None and b is not None and len(a) == len(b) and all(x is not None and x == y for x, y in zip(a, b))


DIM_VALUES = ((3, 5, 7, 11, 13, 17, 19, 23), (29, 31, 37, 41, 43, 47, 53, 59))


def concrete_shapes(graph: gs.Graph, ctx: PassContext, values: tuple[int, ...]) -> dict[str, tuple]:
    """Inferred shapes with every symbolic input dim set to a distinct value of ``values``.

    onnx's inference loses symbolic dims across Shape/Concat/Reshape chains; with
    concrete input dims its data propagation follows them. Two runs with different
    distinct primes make accidental equalities of different dims practically
    impossible. Large initializers are declared as inputs so their bytes are not copied."""
    from onnxforge.passes.cleanup.common import export_for_inference

    try:
        proto = export_for_inference(graph, ctx)
        _declare_large_initializers(proto.graph)
        _stand_in_for_contrib_ops(proto.graph)
        free = iter(values)
        assigned: dict[str, int] = {}
        for inp in proto.graph.input:
            for d in inp.type.tensor_type.shape.dim:
                if d.dim_param or not d.HasField("dim_value"):
                    key = d.dim_param or f"?{inp.name}{id(d)}"
                    if key not in assigned:
                        assigned[key] = next(free)
                    d.dim_value = assigned[key]
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)
    except Exception as exc:  # an aid only: without shapes, shape-dependent rules refuse
        ctx.warn(f"fusion: shape inference failed ({type(exc).__name__}); shape-dependent fusions refused")
        return {}
    shapes: dict[str, tuple] = {}
    for info in list(inferred.graph.input) + list(inferred.graph.output) + list(inferred.graph.value_info):
        tt = info.type.tensor_type
        if info.type.HasField("tensor_type") and tt.HasField("shape"):
            if all(d.HasField("dim_value") for d in tt.shape.dim):
                shapes[info.name] = tuple(d.dim_value for d in tt.shape.dim)
        if info.type.HasField("tensor_type") and tt.elem_type:
            shapes[f"dtype:{info.name}"] = tt.elem_type
    return shapes


# Ops whose outputs (all of them that are used) have the shape of input 0.
SAME_SHAPE_OPS = {
    (MS_DOMAIN, "Gelu"), (MS_DOMAIN, "BiasGelu"), (MS_DOMAIN, "FastGelu"), (MS_DOMAIN, "QuickGelu"),
    ("", "SimplifiedLayerNormalization"),
}


def _stand_in_for_contrib_ops(graph: onnx.GraphProto) -> None:
    """onnx cannot infer through onnxruntime's ops: give the shape-preserving ones an Identity
    stand-in (inference only; the model is not changed)."""
    nodes = []
    for node in graph.node:
        nodes.append(node)
        pre17_layernorm = node.op_type == "LayerNormalization" and not node.domain and len(node.output) == 1
        if (node.domain, node.op_type) in SAME_SHAPE_OPS or pre17_layernorm:
            node.op_type, node.domain = "Identity", ""
            del node.input[1:]
            del node.output[1:]
            del node.attribute[:]
        elif (node.domain, node.op_type) in ((MS_DOMAIN, "SkipLayerNormalization"),
                                             (MS_DOMAIN, "SkipSimplifiedLayerNormalization")):
            outputs = list(node.output)
            node.op_type, node.domain = "Add", ""
            del node.input[2:]
            del node.output[1:]
            del node.attribute[:]
            if len(outputs) > 3 and outputs[3]:
                nodes.append(onnx.helper.make_node("Identity", [outputs[0]], [outputs[3]]))
    del graph.node[:]
    graph.node.extend(nodes)


def _declare_large_initializers(graph: onnx.GraphProto, limit: int = 4096) -> None:
    keep, declared = [], {i.name for i in graph.input}
    for init in graph.initializer:
        if init.name in declared or init.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) or _elements(init) <= limit:
            keep.append(init)
        else:
            graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    del graph.initializer[:]
    graph.initializer.extend(keep)


def _elements(init: onnx.TensorProto) -> int:
    return int(np.prod(init.dims, dtype=np.int64)) if init.dims else 1


class ShapeOracle:
    """Answers "do these tensors surely have the same shape?" from two concrete inferences."""

    def __init__(self, graph: gs.Graph, ctx: PassContext):
        self.runs = [concrete_shapes(graph, ctx, values) for values in DIM_VALUES]

    def shape(self, tensor: gs.Tensor) -> tuple | None:
        if isinstance(tensor, gs.Constant):
            return tuple(int(d) for d in tensor.shape)
        return self.runs[0].get(tensor.name)

    def dtype(self, tensor: gs.Tensor) -> int | None:
        return self.runs[0].get(f"dtype:{tensor.name}")

    def same(self, a: gs.Tensor, b: gs.Tensor) -> bool:
        for run in self.runs:
            sa = tuple(a.shape) if isinstance(a, gs.Constant) else run.get(a.name)
            sb = tuple(b.shape) if isinstance(b, gs.Constant) else run.get(b.name)
            if sa is None or sa != sb:
                return False
        return True
