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
  * A(Transpose(x, p), axes a) = Transpose(A(x, axes p[a]), p) for an op A that works along
    given axes and keeps the rank: axis a of the transposed tensor is axis p[a] of x. So
    Concat's axis, Pad's per-axis pads (begin and end) and Reduce*'s axes (keepdims=1) are
    relabelled through p. Concat needs every input transposed by the same p (one Transpose
    replaces k); Pad and Reduce* move when the chain after them ends in a Transpose.
  * Resize(Transpose(x, p), scales s) = Transpose(Resize(x, s'), p) with s'[p[a]] = s[a]
    (sizes and roi's begin/end alike; with an ``axes`` attribute the listed axes relabel
    instead) when each output index depends on one axis's scale and coordinate transform
    alone: mode ``nearest``, any coordinate transform. Linear and cubic interpolate axis
    after axis, so the other layout sums in another order: refused. The
    pass is bit-exact, so of the float reductions only ReduceMax/ReduceMin move (a sum
    over another memory layout adds in another order); integer ones all move.
Preconditions: default-domain nodes in one graph; the transposed tensors have no other
reader and are no graph outputs (else the Transpose stays and one is added); Clip's min/max
are scalars (elementwise); the pads and axes are constants, Pad has no ``axes`` input, a
Reduce* keeps its dims (keepdims=0 drops axes, so the permutation would change); Resize's
roi, scales and sizes are constants.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxforge.passes.base import Match, Pass
from onnxforge.passes.matching import producer_op

from .common import DEFAULT_DOMAINS, IndexedRule, IndexedRulePass, infer_types, int_list, small_value

UNARY = ("Relu", "Sigmoid", "Tanh", "Neg", "Abs", "Exp", "Log", "Sqrt", "Erf", "Cast", "Clip", "LeakyRelu",
         "HardSigmoid", "HardSwish", "Softplus", "Softsign", "Elu", "Selu", "Celu", "Not", "Floor", "Ceil",
         "Round", "Reciprocal", "Sign", "Sin", "Cos", "Gelu", "Mish")
BINARY = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Equal", "Less", "Greater", "And", "Or", "Where")
REDUCE = ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
          "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")
AXIS_OPS = ("Concat", "Pad", "Resize", *REDUCE)
# Resize modes whose output element depends on each axis alone, in one step (bit-exact in any layout).
PER_AXIS_MODES = ("nearest",)
T = onnx.TensorProto
INTEGER_TYPES = {T.INT8, T.INT16, T.INT32, T.INT64, T.UINT8, T.UINT16, T.UINT32, T.UINT64}


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
            # Not through Concat: it moves a Transpose only when all its inputs have one.
            if node.op not in UNARY + AXIS_OPS or node.op == "Concat" or node.domain not in DEFAULT_DOMAINS \
                    or len(node.outputs) != 1:
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


class SinkThroughAxisOp(IndexedRule):
    name = "transpose-past-axis-op"
    anchor_ops = AXIS_OPS

    def match(self, graph, node):
        if node.domain not in DEFAULT_DOMAINS or len(node.outputs) != 1 or not node.inputs:
            return None
        data = list(node.inputs) if node.op == "Concat" else [node.inputs[0]]
        firsts = [_moved_transpose(self, graph, node, t) for t in data]
        if any(f is None for f in firsts) or len({tuple(_perm(f)) for f in firsts}) != 1:
            return None
        if len({id(f) for f in firsts}) != len(firsts):
            return None
        if len(firsts) == 1 and not SinkThroughUnary.ends_in_transpose(node):
            return None  # moving it saves nothing unless it meets another Transpose
        return Match([node, *firsts])

    def check(self, graph, match, ctx):
        node, *firsts = match.nodes
        if any(not _private(self, f.outputs[0]) for f in firsts):
            return self.refusal("a transposed input has other readers", match)
        found = self.relabelled(node, _perm(firsts[0]))
        return self.refusal(found, match) if isinstance(found, str) else None

    def relabelled(self, node: gs.Node, perm: list[int]):
        """The node's axis settings for the untransposed input: (attrs, {input index: values}) or why not."""
        r = len(perm)
        if node.op == "Concat":
            axis = int(node.attrs.get("axis", 0))
            return {"axis": perm[axis % r]}, {}
        if node.op == "Pad":
            if len(node.inputs) > 3 and not node.inputs[3].is_empty():
                return "Pad has an axes input"
            attr = "pads" in node.attrs
            pads = [int(v) for v in node.attrs["pads"]] if attr else (
                int_list(node.inputs[1]) if len(node.inputs) > 1 else None)
            if pads is None or len(pads) != 2 * r:
                return "the pads are not a constant of 2 x rank values"
            new = [0] * (2 * r)
            for a in range(r):
                new[perm[a]], new[r + perm[a]] = pads[a], pads[r + a]
            return ({"pads": new}, {}) if attr else ({}, {1: new})
        if node.op == "Resize":
            return self.resize_relabelled(node, perm)
        if node.op not in ("ReduceMax", "ReduceMin") and self.types.dtype(node.inputs[0]) not in INTEGER_TYPES:
            return "a floating-point sum in the other layout adds in another order (not bit-exact)"
        if int(node.attrs.get("keepdims", 1)) != 1:
            return "keepdims=0 drops the reduced axes (the permutation would change)"
        from_input = len(node.inputs) > 1 and not node.inputs[1].is_empty()
        axes = int_list(node.inputs[1]) if from_input else [int(a) for a in node.attrs.get("axes", [])]
        if axes is None:
            return "the axes are not a constant"
        new = sorted(perm[a % r] for a in axes)
        return ({}, {1: new}) if from_input else ({"axes": new} if axes else {}, {})

    def resize_relabelled(self, node: gs.Node, perm: list[int]):
        """Resize's roi, scales or sizes (and ``axes``) for the untransposed input, or why not.
        Only ``nearest``: each output index then comes from that axis's scale and
        coordinate transform alone; linear and cubic interpolate axis after axis, so the
        other layout adds the same terms in another order (not bit-exact)."""
        r = len(perm)
        mode = node.attrs.get("mode", "nearest")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode not in PER_AXIS_MODES:
            return f"mode {mode!r} interpolates axis after axis (not bit-exact in the other layout)"
        axes = [int(a) % r for a in node.attrs["axes"]] if "axes" in node.attrs else list(range(r))
        attrs = {"axes": [perm[a] for a in axes]} if "axes" in node.attrs else {}
        n = len(axes)
        opset = self.index.graph_of(node).opset
        # Resize-10 reads (X, scales); from 11 on (X, roi, scales, sizes).
        slots = {1: ("scales", n)} if opset is not None and opset < 11 else {
            1: ("roi", 2 * n), 2: ("scales", n), 3: ("sizes", n)}
        inputs = {}
        for i, (what, count) in slots.items():
            if i >= len(node.inputs) or node.inputs[i].is_empty():
                continue
            values = small_value(node.inputs[i], 1 << 16)
            if values is None:
                return f"its {what} input is not a constant"
            values = values.reshape(-1).tolist()
            if what != "roi" and not values:
                continue  # an empty scales next to sizes
            if len(values) != count:
                return f"its {what} input does not hold {count} values"
            if attrs:  # given per listed axis: the list relabels, the values stay in order
                continue
            new = [None] * count
            for a in range(n):
                new[perm[a]] = values[a]
                if what == "roi":
                    new[n + perm[a]] = values[n + a]
            inputs[i] = new
        return attrs, inputs

    def rewrite(self, graph, match, ctx):
        node, *firsts = match.nodes
        attrs, inputs = self.relabelled(node, _perm(firsts[0]))
        node.attrs.update(attrs)
        for i, values in inputs.items():
            old = node.inputs[i]
            dtype = old.values.dtype if isinstance(old, gs.Constant) else np.int64
            node.inputs[i] = gs.Constant(f"{node.name or node.op}_{i}_untransposed", np.array(values, dtype))
        sources = [f.inputs[0] for f in firsts]
        _move_after(node, firsts[0], sources + list(node.inputs[len(sources):]))


class SinkTransposes(IndexedRulePass):
    name = "sink-transposes"
    description = ("move Transposes past elementwise ops, Concat, Pad, Reduce* and nearest Resize (so "
                   "collapse-chains cancels NHWC round trips)")
    tolerance = (0.0, 0.0)
    rules = (SinkThroughBinary, SinkThroughAxisOp, SinkThroughUnary)

    def types(self, graph, ctx):
        return infer_types(graph, ctx)


PASSES: tuple[type[Pass], ...] = (SinkTransposes,)
