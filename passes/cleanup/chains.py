"""collapse-chains: two consecutive ops that compose into one (or none).

Identities:
  * Transpose(Transpose(x, p), q) = Transpose(x, r) with r[i] = p[q[i]]; when r is
    0..n-1 the pair is x. The second node is rewritten in place; the first stays
    only if something else reads it.
  * Reshape(Reshape(x, s1), s2) = Reshape(x, s2): a reshape only reads the element
    count, which the first keeps. Needs s2 constant without 0 entries copying from
    the middle tensor (unless allowzero=1), and the middle tensor read by nobody else.
  * Cast(Cast(x, B), C) = x when C is x's type, and = Cast(x, C) when x's type A
    converts exactly into both B and C (every A value is a B value and a C value,
    so both paths convert the same number once). Never when the first Cast narrows.
  * Squeeze(Unsqueeze(x, a), a) = x and Unsqueeze(Squeeze(x, a), a) = x for the
    same explicit axes (Squeeze only removes size-1 dims, Unsqueeze puts them back at
    the same places; negative axes count from the middle tensor's rank in both).

Precondition for removals: the graph output name rule of ``common.bypass``.
Only the second node is rewritten (the first is read, never changed), so one first
node can feed several collapses in one sweep.
"""
from __future__ import annotations

import dataclasses

import onnx
import onnx_graphsurgeon as gs

from onnxforge.passes.base import Match, Pass
from onnxforge.passes.matching import producer_op

from .common import DEFAULT_DOMAINS, IndexedRule, IndexedRulePass, bypass, bypass_refusal, infer_types, int_list

T = onnx.TensorProto
# A -> set of types that hold every value of A exactly.
EXACT_WIDENING = {
    T.BOOL: {T.INT8, T.INT16, T.INT32, T.INT64, T.UINT8, T.UINT16, T.UINT32, T.UINT64,
             T.FLOAT16, T.FLOAT, T.DOUBLE},
    T.INT8: {T.INT16, T.INT32, T.INT64, T.FLOAT16, T.FLOAT, T.DOUBLE},
    T.UINT8: {T.UINT16, T.UINT32, T.UINT64, T.INT16, T.INT32, T.INT64, T.FLOAT16, T.FLOAT, T.DOUBLE},
    T.INT16: {T.INT32, T.INT64, T.FLOAT, T.DOUBLE},
    T.UINT16: {T.UINT32, T.UINT64, T.INT32, T.INT64, T.FLOAT, T.DOUBLE},
    T.INT32: {T.INT64, T.DOUBLE},
    T.UINT32: {T.UINT64, T.INT64, T.DOUBLE},
    T.FLOAT16: {T.FLOAT, T.DOUBLE},
    T.BFLOAT16: {T.FLOAT, T.DOUBLE},
    T.FLOAT: {T.DOUBLE},
}


def single_reader(tensor: gs.Tensor, rule: IndexedRule) -> bool:
    return len(tensor.outputs) == 1 and not rule.index.is_graph_output(tensor)


@dataclasses.dataclass(frozen=True)
class ChainMatch:
    first: gs.Node  # the node the anchor reads


@dataclasses.dataclass(frozen=True)
class TransposeChainMatch:
    first: gs.Node
    perm: tuple[int, ...]  # the two permutations composed


class CollapseTranspose(IndexedRule):
    name = "collapsed-transpose"
    anchor_ops = ("Transpose",)

    def match(self, graph, node):
        first = producer_op(node.inputs[0], "Transpose")
        if first is None or self.index.graph_of(first) is not graph:
            return None
        outer, inner = node.attrs.get("perm"), first.attrs.get("perm")
        if outer is None or inner is None or len(outer) != len(inner):
            return None
        return Match([node], TransposeChainMatch(first, tuple(int(inner[i]) for i in outer)))

    def check(self, graph, match, ctx):
        second, first = match.nodes[0], match.info.first
        if match.info.perm == tuple(range(len(match.info.perm))):
            reason = bypass_refusal(second, first.inputs[0], second.outputs[0], self.index)
            return self.refusal(reason, match) if reason else None
        return None

    def rewrite(self, graph, match, ctx):
        second, first = match.nodes[0], match.info.first
        perm = match.info.perm
        if perm == tuple(range(len(perm))):
            bypass(second, first.inputs[0], second.outputs[0], self.index)
        else:
            second.inputs[0] = first.inputs[0]
            second.attrs["perm"] = list(perm)


class CollapseReshape(IndexedRule):
    name = "collapsed-reshape"
    anchor_ops = ("Reshape",)

    def match(self, graph, node):
        first = producer_op(node.inputs[0], "Reshape")
        if first is None or self.index.graph_of(first) is not graph or len(node.inputs) != 2:
            return None
        return Match([node], ChainMatch(first))

    def check(self, graph, match, ctx):
        second, first = match.nodes[0], match.info.first
        target = int_list(second.inputs[1])
        if target is None:
            return self.refusal("the second shape is not a constant", match)
        if 0 in target and not int(second.attrs.get("allowzero", 0)):
            return self.refusal("the second shape copies dims (0) from the middle tensor", match)
        if not single_reader(first.outputs[0], self):
            return self.refusal("the middle tensor has other readers", match)
        return None

    def rewrite(self, graph, match, ctx):
        second, first = match.nodes[0], match.info.first
        second.inputs[0] = first.inputs[0]


class CollapseCast(IndexedRule):
    name = "collapsed-cast"
    anchor_ops = ("Cast",)

    def match(self, graph, node):
        first = producer_op(node.inputs[0], "Cast")
        if first is None or self.index.graph_of(first) is not graph:
            return None
        return Match([node], ChainMatch(first))

    def check(self, graph, match, ctx):
        second, first = match.nodes[0], match.info.first
        source = self.types.dtype(first.inputs[0])
        middle, target = int(first.attrs["to"]), int(second.attrs["to"])
        if source is None:
            return self.refusal("the source type is unknown", match)
        widened = EXACT_WIDENING.get(source, set())
        if source != middle and middle not in widened:
            return self.refusal("the first Cast is not an exact widening", match)
        if target != source and target not in widened:
            return self.refusal("the direct Cast would not be exact", match)
        if target == source:
            reason = bypass_refusal(second, first.inputs[0], second.outputs[0], self.index)
            return self.refusal(reason, match) if reason else None
        return None

    def rewrite(self, graph, match, ctx):
        second, first = match.nodes[0], match.info.first
        if int(second.attrs["to"]) == self.types.dtype(first.inputs[0]):
            bypass(second, first.inputs[0], second.outputs[0], self.index)
        else:
            second.inputs[0] = first.inputs[0]


def squeeze_axes(node: gs.Node) -> list[int] | None:
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    if len(node.inputs) > 1 and not node.inputs[1].is_empty():
        return int_list(node.inputs[1])
    return None


class CancelSqueezePair(IndexedRule):
    name = "cancelled-squeeze-pair"
    anchor_ops = ("Squeeze", "Unsqueeze")

    def match(self, graph, node):
        partner = "Unsqueeze" if node.op == "Squeeze" else "Squeeze"
        first = producer_op(node.inputs[0], partner)
        if first is None or self.index.graph_of(first) is not graph:
            return None
        axes, first_axes = squeeze_axes(node), squeeze_axes(first)
        if axes is None or first_axes is None or sorted(axes) != sorted(first_axes):
            return None
        return Match([node], ChainMatch(first))

    def check(self, graph, match, ctx):
        second, first = match.nodes[0], match.info.first
        reason = bypass_refusal(second, first.inputs[0], second.outputs[0], self.index)
        return self.refusal(reason, match) if reason else None

    def rewrite(self, graph, match, ctx):
        second, first = match.nodes[0], match.info.first
        bypass(second, first.inputs[0], second.outputs[0], self.index)


class CollapseChains(IndexedRulePass):
    name = "collapse-chains"
    description = "compose Transpose/Reshape/Cast pairs and cancel Squeeze/Unsqueeze pairs"
    tolerance = (0.0, 0.0)
    rules = (CollapseTranspose, CollapseReshape, CollapseCast, CancelSqueezePair)

    def types(self, graph, ctx):
        return infer_types(graph, ctx)


PASSES: tuple[type[Pass], ...] = (CollapseChains,)
