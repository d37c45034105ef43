"""eliminate-common-subexpressions: two nodes with the same op, domain, attributes and
inputs compute the same outputs, so the later one is dropped and its readers read the first.

Identity: a deterministic op is a function of its inputs and attributes.

Preconditions:
  * not a random op (Random*, Multinomial, Bernoulli) and no subgraph attribute;
  * inputs are the same tensors, or constants of at most ``SMALL_CONSTANT_BYTES``
    with the same type, shape (a scalar is not a 1-element vector) and bytes (-0.0 and NaN payloads compare by bits);
  * both nodes live in the same graph (no value moves between scopes);
  * none of the dropped node's outputs is a graph output.
"""
from __future__ import annotations

import struct

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.context import PassContext, Refusal
from onnxforge.passes.base import Pass, PassResult

from .common import NONDETERMINISTIC_OPS, GraphIndex, const_nbytes, finish, has_subgraph, onnx_dtype, remove_node, replace_uses

SMALL_CONSTANT_BYTES = 4096


class Unkeyable(Exception):
    """An attribute or input this pass does not compare."""


def constant_key(tensor: gs.Constant) -> tuple:
    if const_nbytes(tensor) > SMALL_CONSTANT_BYTES:
        return ("tensor", id(tensor))
    # np.asarray keeps a scalar 0-d (ascontiguousarray would make it [1], so a scalar index and
    # a 1-element one would key alike); tobytes() is C order whatever the layout
    array = np.asarray(tensor.values)
    return ("const", onnx_dtype(tensor), tuple(array.shape), array.tobytes())


def attr_key(value) -> object:
    if isinstance(value, bool) or isinstance(value, (int, str, bytes)):
        return (type(value).__name__, value)
    if isinstance(value, float):
        return ("float", struct.pack("<d", value))
    if isinstance(value, gs.Constant):
        return constant_key(value)
    if isinstance(value, (list, tuple)):
        return ("list", tuple(attr_key(v) for v in value))
    if isinstance(value, np.ndarray):
        return ("array", value.dtype.str, value.shape, value.tobytes())
    raise Unkeyable(type(value).__name__)


def input_key(tensor: gs.Tensor) -> tuple:
    if tensor.is_empty():
        return ("empty",)
    if isinstance(tensor, gs.Constant):
        return constant_key(tensor)
    return ("tensor", id(tensor))


def node_key(node: gs.Node) -> tuple | None:
    if node.op in NONDETERMINISTIC_OPS or has_subgraph(node):
        return None
    try:
        attrs = tuple(sorted((k, attr_key(v)) for k, v in node.attrs.items()))
    except Unkeyable:
        return None
    return (node.op, node.domain or "", attrs, tuple(input_key(t) for t in node.inputs), len(node.outputs))


def eliminate_in_graph(graph: gs.Graph, index: GraphIndex, ctx: PassContext) -> int:
    first_by_key: dict[tuple, gs.Node] = {}
    removed = 0
    for node in list(graph.nodes):
        key = node_key(node)
        if key is None:
            continue
        first = first_by_key.get(key)
        if first is None:
            first_by_key[key] = node
            continue
        if any(index.is_graph_output(t) for t in node.outputs if not t.is_empty()):
            ctx.refuse(Refusal("merged_node", "the duplicate's output is a graph output", (node.name or node.op,)))
            continue
        for keep, drop in zip(first.outputs, node.outputs):
            if not drop.is_empty():
                replace_uses(drop, keep, index)
        remove_node(node, graph)
        removed += 1
    return removed


class EliminateCommonSubexpressions(Pass):
    name = "eliminate-common-subexpressions"
    description = "merge nodes with the same op, attributes and inputs"
    tolerance = (0.0, 0.0)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        index = GraphIndex(graph)
        removed = 0
        for g in index.graphs:
            g.toposort(recurse_subgraphs=False)
            removed += eliminate_in_graph(g, index, ctx)
        finish(graph)
        return PassResult.from_counts({"merged_node": removed})


PASSES: tuple[type[Pass], ...] = (EliminateCommonSubexpressions,)
