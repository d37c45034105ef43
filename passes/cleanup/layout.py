"""sink-transposes: move a Transpose past elementwise ops so it meets its partner.

NHWC exports (Keras/TF through tf2onnx, PyTorch channels-last) wrap elementwise work in
Transpose pairs: ``Transpose(p) -> Relu -> Transpose(q)``. collapse-chains composes two
adjacent Transposes (cancelling them when q undoes p), but not across the Relu.

Identities (p a permutation of the rank-r axes, U an elementwise op):
  * U(Transpose(x, p)) = Transpose(U(x), p): an elementwise op computes each element from
    the element at the same index, so it commutes with any relabelling of the axes. The
    Transpose is moved after U when a chain of single-reader elementwise ops from U ends in
    another Transpose (collapse-chains then composes the two); the count drops there.
  * B(Transpose(a, p), Transpose(b, p)) = Transpose(B(a, b), p) for a binary elementwise B
    when a and b have the same rank r (numpy broadcasting aligns trailing axes, and with
    equal ranks it pairs axis i with axis i on both sides, which p relabels alike): one
    Transpose fewer.
Preconditions: default-domain nodes in one graph; the transposed tensors have no other
reader and are no graph outputs (else the Transpose stays and one is added); Clip's min/max
are scalars (elementwise).
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxforge.passes.base import Match, Pass
from onnxforge.passes.matching import producer_op

from .common import DEFAULT_DOMAINS, IndexedRule, IndexedRulePass, infer_types

UNARY = ("Relu", "Sigmoid", "Tanh", "Neg", "Abs", "Exp", "Log", "Sqrt", "Erf", "Cast", "Clip", "LeakyRelu",
         "HardSigmoid", "HardSwish", "Softplus", "Softsign", "Elu", "Selu", "Celu", "Not", "Floor", "Ceil",
         "Round", "Reciprocal", "Sign", "Sin", "Cos", "Gelu", "Mish")
BINARY = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Equal", "Less", "Greater", "And", "Or", "Where")


def _perm(node: gs.Node | None) -> list[int] | None:
    if node is None or "perm" not in node.attrs:
        return None
    return [int(p) for p in node.attrs["perm"]]


def _moved_transpose(rule, graph, node: gs.Node, source: gs.Tensor) -> gs.Node | None:
    first = producer_op(source, "Transpose")
    if first is None or rule.index.graph_of(first) is not graph or _perm(first) is None:
        return None
    return first


def _private(rule, tensor: gs.Tensor) -> bool:
    return len(tensor.outputs) == 1 and not rule.index.is_graph_output(tensor)


def _move_after(node: gs.Node, transpose: gs.Node, sources: list[gs.Tensor]) -> None:
    """``node`` reads ``sources`` (untransposed) and ``transpose`` now transposes its result."""
    result = node.outputs[0]
    inner = gs.Variable(f"{result.name}_untransposed", dtype=result.dtype)
    for i, tensor in enumerate(sources):
        node.inputs[i] = tensor
    node.outputs[0] = inner
    transpose.inputs[0] = inner
    transpose.outputs[0] = result


class SinkThroughUnary(IndexedRule):
    name = "transpose-past-elementwise"
    anchor_ops = UNARY

    def match(self, graph, node):
        if node.domain not in DEFAULT_DOMAINS or len(node.outputs) != 1 or not node.inputs:
            return None
        first = _moved_transpose(self, graph, node, node.inputs[0])
        if first is None or not self.ends_in_transpose(node):
            return None
        return Match([node, first])

    @staticmethod
    def ends_in_transpose(node: gs.Node) -> bool:
        """Whether a chain of single-reader elementwise ops from ``node`` reaches a Transpose
        (moving the Transpose along it then lets it meet that one)."""
        for _ in range(64):
            readers = node.outputs[0].outputs
            if len(readers) != 1:
                return False
            node = readers[0]
            if node.op == "Transpose":
                return True
            if node.op not in UNARY or node.domain not in DEFAULT_DOMAINS or len(node.outputs) != 1:
                return False
        return False

    def check(self, graph, match, ctx):
        node, first = match.nodes
        if not _private(self, first.outputs[0]):
            return self.refusal("the transposed tensor has other readers", match)
        if self.index.is_graph_output(node.outputs[0]):
            return self.refusal("its output is a graph output", match)
        if any(self.types.shape(t) not in ((), None) and self.types.shape(t) != (1,) for t in node.inputs[1:]
               if not t.is_empty()):
            return self.refusal("an extra input is not a scalar (not elementwise)", match)
        return None

    def rewrite(self, graph, match, ctx):
        node, first = match.nodes
        _move_after(node, first, [first.inputs[0]])


class SinkThroughBinary(IndexedRule):
    name = "transpose-pair-past-binary"
    anchor_ops = BINARY

    def match(self, graph, node):
        if node.domain not in DEFAULT_DOMAINS or len(node.outputs) != 1 or len(node.inputs) < 2:
            return None
        firsts = [_moved_transpose(self, graph, node, t) for t in node.inputs]
        if any(f is None for f in firsts) or len({tuple(_perm(f)) for f in firsts}) != 1:
            return None
        if len({id(f) for f in firsts}) != len(firsts):
            return None  # one Transpose read twice: a unary case in disguise
        return Match([node, *firsts])

    def check(self, graph, match, ctx):
        node, *firsts = match.nodes
        if any(not _private(self, f.outputs[0]) for f in firsts):
            return self.refusal("a transposed operand has other readers", match)
        ranks = {len(s) if (s := self.types.shape(f.inputs[0])) is not None else None for f in firsts}
        if None in ranks or len(ranks) != 1:
            return self.refusal("the operands' ranks are unknown or differ (broadcasting would pair other axes)",
                                match)
        return None

    def rewrite(self, graph, match, ctx):
        node, *firsts = match.nodes
        _move_after(node, firsts[0], [f.inputs[0] for f in firsts])


class SinkTransposes(IndexedRulePass):
    name = "sink-transposes"
    description = "move Transposes past elementwise ops (so collapse-chains cancels NHWC round trips)"
    tolerance = (0.0, 0.0)
    rules = (SinkThroughBinary, SinkThroughUnary)

    def types(self, graph, ctx):
        return infer_types(graph, ctx)


PASSES: tuple[type[Pass], ...] = (SinkTransposes,)
