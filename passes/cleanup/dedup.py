"""merge-duplicate-initializers: constants with the same type, shape and bytes become one.

Identity: a constant is its bytes; two tensors with equal dtype, shape and bytes are
interchangeable wherever they are read (GPT-2 exports store the tied embedding twice).

Preconditions:
  * both are read by nodes of the same single graph (merging across scopes would make
    gs copy the survivor into every scope that reads it);
  * neither is a graph input (an overridable initializer) nor a graph output;
  * bytes compare by SHA-256: weights in external data are streamed, never loaded whole;
    only tensors that share dtype and shape with another are hashed at all.
"""
from __future__ import annotations

import hashlib

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.context import PassContext
from onnxforge.model import ExternalValues
from onnxforge.passes.base import Pass, PassResult

from .common import GraphIndex, const_nbytes, finish, onnx_dtype


def digest(tensor: gs.Constant) -> str:
    h = hashlib.sha256()
    values = tensor._values
    if isinstance(values, ExternalValues):
        for block in values.read_bytes():
            h.update(block)
    else:
        array = np.ascontiguousarray(tensor.values)
        h.update(array.tobytes() if array.dtype.kind == "O" else array)  # a numeric array's own bytes
    return h.hexdigest()


def constants_by_graph(index: GraphIndex, defaults: frozenset = frozenset()) -> dict[int, list[gs.Constant]]:
    """Merge candidates of each graph (keyed by id(graph)), in first-read order. ``defaults``:
    names of graph inputs' default initializers (graph-surgeon holds them as constants; the
    user may feed another value, so a constant equal to one today is not the same tensor)."""
    graphs_of: dict[int, set[int]] = {}
    order: list[gs.Constant] = []
    protected: set[int] = set()
    for g in index.graphs:
        protected.update(id(t) for t in list(g.inputs) + list(g.outputs))
        for node in g.nodes:
            for tensor in node.inputs:
                if isinstance(tensor, gs.Constant):
                    if id(tensor) not in graphs_of:
                        graphs_of[id(tensor)] = set()
                        order.append(tensor)
                    graphs_of[id(tensor)].add(id(g))
    grouped: dict[int, list[gs.Constant]] = {}
    for tensor in order:
        owners = graphs_of[id(tensor)]
        if len(owners) == 1 and id(tensor) not in protected and tensor.name not in defaults:
            grouped.setdefault(next(iter(owners)), []).append(tensor)
    return grouped


def merge_group(tensors: list[gs.Constant]) -> tuple[int, int]:
    """Merge equal tensors of one graph; return (tensors merged, bytes saved)."""
    by_type: dict[tuple, list[gs.Constant]] = {}
    for tensor in tensors:
        by_type.setdefault((onnx_dtype(tensor), tuple(tensor.shape)), []).append(tensor)
    merged = saved = 0
    for same_type in by_type.values():
        if len(same_type) < 2:
            continue
        keep_by_digest: dict[str, gs.Constant] = {}
        for tensor in same_type:
            key = digest(tensor)
            keep = keep_by_digest.setdefault(key, tensor)
            if keep is tensor:
                continue
            for consumer in list(tensor.outputs):
                for i, t in enumerate(consumer.inputs):
                    if t is tensor:
                        consumer.inputs[i] = keep
            merged += 1
            saved += const_nbytes(tensor)
    return merged, saved


class MergeDuplicateInitializers(Pass):
    name = "merge-duplicate-initializers"
    description = "store constants with equal dtype, shape and bytes once"
    tolerance = (0.0, 0.0)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        index = GraphIndex(graph)
        merged = saved = 0
        defaults = frozenset(ctx.model.overridable_inputs) if ctx.model is not None else frozenset()
        for tensors in constants_by_graph(index, defaults).values():
            m, s = merge_group(tensors)
            merged += m
            saved += s
        finish(graph)
        return PassResult.from_counts({"merged_initializer": merged, "bytes_saved": saved})


PASSES: tuple[type[Pass], ...] = (MergeDuplicateInitializers,)
