"""eliminate-noop: ops that return their data input unchanged, bit for bit.

Identities (x is the data input, shapes read from onnx shape inference):
  * Reshape(x, s) = x when s has rank(x) entries, each a copy (0, allowzero=0), the
    same static dim, or a single -1 standing for the one remaining dim;
  * Cast(x, to=T) = x and CastLike(x, t) = x when x already has type T;
  * Transpose(x, perm) = x when perm = 0..r-1;
  * Pad(x, pads) = x when every pad is 0 (mode and value then never apply);
  * Expand(x, s) = x when s broadcasts into shape(x): rank(s) <= rank(x) and each
    aligned entry is 1 or the same static dim;
  * Slice(x, ...) = x when every sliced axis has step 1, starts at 0 (or at/before
    -dim) and ends at or past its dim (INT32_MAX or more counts as past any real dim);
  * Concat(x) = x for a single input;
  * x * 1 = 1 * x = x, x / 1 = x, x - (+0) = x, x + (-0) = (-0) + x = x for floats;
    + and - with 0 for integers. x + (+0) is not exact for floats: -0.0 + 0.0 = +0.0,
    which flips the sign seen by a later division or copysign, so it stays.
    The constant must broadcast into shape(x) (it must not enlarge the output).

Precondition for all: when the output is a graph output its name is kept (see
``common.bypass``), otherwise the node stays.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx

from onnxforge.passes.base import Match, Pass

from .common import DEFAULT_DOMAINS, IndexedRule, IndexedRulePass, bypass, bypass_refusal, infer_types, int_list, small_value

FLOAT_TYPES = frozenset(
    {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
)
INT_TYPES = frozenset(
    {
        onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
        onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64,
    }
)
# Slice ends at or beyond this reach the end of any real axis.
END_OF_AXIS = 2**31 - 1


class NoopRule(IndexedRule):
    """Subclasses say whether ``node`` returns its first input unchanged (``why_not`` -> None)."""

    def match(self, graph, node):
        if node.domain not in DEFAULT_DOMAINS or not node.inputs or len(node.outputs) != 1:
            return None
        if node.inputs[0].is_empty() or not self.candidate(node):
            return None
        return Match([node])

    def candidate(self, node) -> bool:
        return True

    def why_not(self, node) -> str | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def check(self, graph, match, ctx):
        node = match.nodes[0]
        reason = self.why_not(node) or bypass_refusal(node, node.inputs[0], node.outputs[0], self.index)
        return self.refusal(reason, match) if reason else None

    def rewrite(self, graph, match, ctx):
        node = match.nodes[0]
        bypass(node, node.inputs[0], node.outputs[0], self.index)


class ReshapeNoop(NoopRule):
    name = "removed-reshape"
    anchor_ops = ("Reshape",)

    def candidate(self, node):
        return len(node.inputs) == 2 and int_list(node.inputs[1]) is not None

    def why_not(self, node):
        shape = self.types.shape(node.inputs[0])
        target = int_list(node.inputs[1])
        if shape is None:
            return "input rank unknown"
        if len(target) != len(shape):
            return "changes the rank"
        allowzero = int(node.attrs.get("allowzero", 0))
        loose = 0
        for want, have in zip(target, shape):
            if want == 0 and not allowzero:
                continue
            if want == -1:
                loose += 1
            elif have is None or want != have:
                return "target shape differs from (or is not provably) the input shape"
        return None if loose <= 1 else "more than one -1"


class CastNoop(NoopRule):
    name = "removed-cast"
    anchor_ops = ("Cast", "CastLike")

    def why_not(self, node):
        have = self.types.dtype(node.inputs[0])
        if node.op == "Cast":
            want = int(node.attrs.get("to", -1))
        else:
            want = self.types.dtype(node.inputs[1]) if len(node.inputs) > 1 else None
        if have is None or want is None:
            return "input type unknown"
        return None if have == want else "changes the type"


class TransposeNoop(NoopRule):
    name = "removed-transpose"
    anchor_ops = ("Transpose",)

    def candidate(self, node):
        perm = node.attrs.get("perm")
        return perm is None or list(perm) == list(range(len(perm)))

    def why_not(self, node):
        if node.attrs.get("perm") is not None:
            return None
        shape = self.types.shape(node.inputs[0])
        if shape is None:
            return "no perm and input rank unknown"
        return None if len(shape) <= 1 else "reverses the axes"


class PadNoop(NoopRule):
    name = "removed-pad"
    anchor_ops = ("Pad",)

    def candidate(self, node):
        pads = node.attrs.get("pads") if "pads" in node.attrs else None
        if pads is None and len(node.inputs) > 1:
            pads = int_list(node.inputs[1])
        return pads is not None and all(int(p) == 0 for p in pads)

    def why_not(self, node):
        return None


class ExpandNoop(NoopRule):
    name = "removed-expand"
    anchor_ops = ("Expand",)

    def candidate(self, node):
        return len(node.inputs) == 2 and int_list(node.inputs[1]) is not None

    def why_not(self, node):
        return broadcast_keeps(self.types.shape(node.inputs[0]), tuple(int_list(node.inputs[1])))


class SliceNoop(NoopRule):
    name = "removed-slice"
    anchor_ops = ("Slice",)

    def candidate(self, node):
        return self.params(node) is not None

    @staticmethod
    def params(node):
        if len(node.inputs) >= 3:
            starts, ends = int_list(node.inputs[1]), int_list(node.inputs[2])
            axes = int_list(node.inputs[3]) if len(node.inputs) > 3 and not node.inputs[3].is_empty() else None
            steps = int_list(node.inputs[4]) if len(node.inputs) > 4 and not node.inputs[4].is_empty() else None
            if starts is None or ends is None:
                return None
            if len(node.inputs) > 3 and not node.inputs[3].is_empty() and axes is None:
                return None
            if len(node.inputs) > 4 and not node.inputs[4].is_empty() and steps is None:
                return None
        else:
            starts, ends = node.attrs.get("starts"), node.attrs.get("ends")
            axes, steps = node.attrs.get("axes"), None
            if starts is None or ends is None:
                return None
        axes = list(axes) if axes is not None else list(range(len(starts)))
        steps = list(steps) if steps is not None else [1] * len(starts)
        return list(starts), list(ends), axes, steps

    def why_not(self, node):
        starts, ends, axes, steps = self.params(node)
        shape = self.types.shape(node.inputs[0])
        for start, end, axis, step in zip(starts, ends, axes, steps):
            if step != 1:
                return "a step is not 1"
            dim = None
            if shape is not None and -len(shape) <= axis < len(shape):
                dim = shape[axis]
            elif axis < 0:
                return "negative axis and input rank unknown"
            if not (start == 0 or (dim is not None and start <= -dim)):
                return "a start is not the beginning of its axis"
            if not (end >= END_OF_AXIS or (dim is not None and end >= dim)):
                return "an end is not provably past its axis"
        return None


class ConcatNoop(NoopRule):
    name = "removed-concat"
    anchor_ops = ("Concat",)

    def candidate(self, node):
        return len(node.inputs) == 1

    def why_not(self, node):
        return None


@dataclasses.dataclass(frozen=True)
class NeutralMatch:
    data: int  # the input that passes through
    value: np.ndarray  # the other input's (neutral) value


class ArithmeticNoop(IndexedRule):
    """x*1, 1*x, x/1, x-(+0), x+(-0) for floats; x+0, 0+x, x-0, x*1, x/1 for integers."""

    name = "removed-neutral-arithmetic"
    anchor_ops = ("Mul", "Add", "Sub", "Div")

    def match(self, graph, node):
        if node.domain not in DEFAULT_DOMAINS or len(node.inputs) != 2 or len(node.outputs) != 1:
            return None
        positions = (0, 1) if node.op in ("Mul", "Add") else (1,)
        for pos in positions:
            value = small_value(node.inputs[pos], 1 << 16)
            if value is not None and value.size and neutral_kind(node.op, value) is not None:
                return Match([node], NeutralMatch(1 - pos, value))
        return None

    def check(self, graph, match, ctx):
        node = match.nodes[0]
        value = match.info.value
        data = node.inputs[match.info.data]
        kind = neutral_kind(node.op, value)
        if kind == "positive_zero_add" and value.dtype.kind == "f":
            return self.refusal("x + 0.0 is not exact: it turns -0.0 into +0.0", match)
        if kind == "negative_zero_sub":
            return self.refusal("x - (-0.0) is not exact: it turns -0.0 into +0.0", match)
        reason = broadcast_keeps(self.types.shape(data), value.shape)
        if reason is None:
            reason = bypass_refusal(node, data, node.outputs[0], self.index)
        return self.refusal(reason, match) if reason else None

    def rewrite(self, graph, match, ctx):
        node = match.nodes[0]
        bypass(node, node.inputs[match.info.data], node.outputs[0], self.index)


def neutral_kind(op: str, value: np.ndarray) -> str | None:
    """Which neutral element ``value`` is for ``op`` (None when it is none)."""
    if value.dtype.kind not in "fiu":
        return None
    flat = value.reshape(-1)
    if op in ("Mul", "Div"):
        return "one" if bool(np.all(flat == 1)) else None
    if not bool(np.all(flat == 0)):
        return None
    if value.dtype.kind != "f":
        return "zero"
    negative = np.signbit(flat)
    if op == "Add":
        return "negative_zero_add" if bool(np.all(negative)) else "positive_zero_add"
    return "positive_zero_sub" if not bool(np.any(negative)) else "negative_zero_sub"


def broadcast_keeps(shape: tuple | None, other: tuple) -> str | None:
    """None when broadcasting ``other`` against ``shape`` leaves ``shape`` unchanged."""
    if len(other) == 0:
        return None
    if shape is None:
        return "input rank unknown"
    if len(other) > len(shape):
        return "broadcasting adds dimensions"
    for want, have in zip(reversed(other), reversed(shape)):
        if want != 1 and (have is None or want != have):
            return "broadcasting may enlarge the input"
    return None


class EliminateNoop(IndexedRulePass):
    name = "eliminate-noop"
    description = "remove Reshape/Cast/Transpose/Pad/Expand/Slice/Concat/arithmetic nodes that change nothing"
    tolerance = (0.0, 0.0)
    rules = (ReshapeNoop, CastNoop, TransposeNoop, PadNoop, ExpandNoop, SliceNoop, ConcatNoop, ArithmeticNoop)

    def types(self, graph, ctx):
        return infer_types(graph, ctx)


PASSES: tuple[type[Pass], ...] = (EliminateNoop,)
