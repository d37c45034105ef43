"""HardSwish and HardSigmoid written out as several ops -> one op (fuse-hardswish).

Identities (x is the activation input):
  * HardSwish       x * clip(x + 3, 0, 6) / 6                         -> HardSwish(x) (opset >= 14), else
                                                                         x * HardSigmoid(x, 1/6, 1/2)
  * HardSigmoid     clip(a * x + b, 0, h) / h                          -> HardSigmoid(x, a/h, b/h)
                    x * HardSigmoid(x, 1/6, 1/2)                       -> HardSwish(x) (opset >= 14)

Preconditions: every constant named above is a constant of that value (within 1e-4
relative), the Clip bounds are constants, no intermediate tensor is read outside the
pattern. The product and the division may be associated in any order.
"""
from __future__ import annotations

import dataclasses

import onnx_graphsurgeon as gs

from onnxforge.context import PassContext
from onnxforge.passes.base import Match, RulePass

from ._match import (
    FusionRule,
    consumer_op,
    is_const,
    model_opset,
    near,
    other_input,
    producer_op,
    replace,
    scalar,
    split_const,
)


def clip_bounds(node: gs.Node) -> tuple[float | None, float | None, bool]:
    """(min, max, constant?) of a Clip in either the attribute (< 11) or input form."""
    if "min" in node.attrs or "max" in node.attrs:
        return node.attrs.get("min"), node.attrs.get("max"), True
    lo = node.inputs[1] if len(node.inputs) > 1 and node.inputs[1].name else None
    hi = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    ok = all(t is None or scalar(t) is not None for t in (lo, hi))
    return (scalar(lo) if lo is not None else None, scalar(hi) if hi is not None else None, ok)


@dataclasses.dataclass(frozen=True)
class HardSwishClipMatch:
    """x * clip(x + three, lo, hi) / six (or * six when not ``divides``)"""

    x: gs.Tensor
    three: gs.Tensor
    six: gs.Tensor
    divides: bool
    outputs: tuple[gs.Tensor, ...]


@dataclasses.dataclass(frozen=True)
class HardSigmoidMatch:
    """clip(a*x + b, lo, hi) [/ h]"""

    x: gs.Tensor
    a: gs.Tensor | None  # None: no Mul (a = 1)
    b: gs.Tensor
    h: gs.Node | None  # the Div/Mul by the clip's top, None when there is none
    outputs: tuple[gs.Tensor, ...]


@dataclasses.dataclass(frozen=True)
class HardSwishMulMatch:
    """x * HardSigmoid(x)"""

    x: gs.Tensor
    outputs: tuple[gs.Tensor, ...]


def _emit_hardswish(graph: gs.Graph, match: Match, ctx: PassContext) -> None:
    x = match.info.x
    if model_opset(graph, ctx) >= 14:
        replace(graph, match, "HardSwish", [x])
        return
    hs = gs.Variable(f"{x.name}_hardsigmoid", dtype=x.dtype)
    graph.nodes.append(gs.Node("HardSigmoid", name=f"{match.nodes[0].name}_HardSigmoid",
                               attrs={"alpha": 1.0 / 6.0, "beta": 0.5}, inputs=[x], outputs=[hs]))
    replace(graph, match, "Mul", [x, hs])


def _added_constant(clip: gs.Node):
    """The Add feeding a Clip and its (variable, constant) inputs, or (add, None)."""
    add = producer_op(clip.inputs[0], "Add")
    return add, (split_const(add) if add is not None else None)


class HardSwishClip(FusionRule):
    """x * clip(x + 3, 0, 6) / 6 in any association (Div by 6 or Mul by 1/6) -> HardSwish."""

    name = "hardswish-clip"
    anchor_ops = ("Clip",)

    def match(self, graph, node):
        add, split = _added_constant(node)
        if split is None:
            return None
        x, three = split
        clipped = node.outputs[0]
        first = consumer_op(clipped, "Mul", "Div")
        if first is None:
            return None
        if first.op == "Mul" and other_input(first, clipped) is x:  # (x * clip) / 6
            second = consumer_op(first.outputs[0], "Div", "Mul")
            if second is None or (second.op == "Div" and second.inputs[0] is not first.outputs[0]):
                return None
            six, divides = other_input(second, first.outputs[0]), second.op == "Div"
        else:  # (clip / 6) * x
            if first.op == "Div" and first.inputs[0] is not clipped:
                return None
            six, divides = other_input(first, clipped), first.op == "Div"
            second = consumer_op(first.outputs[0], "Mul")
            if second is None or other_input(second, first.outputs[0]) is not x:
                return None
        if six is None:
            return None
        return Match([node, add, first, second],
                     HardSwishClipMatch(x, three, six, divides, (second.outputs[0],)))

    def preconditions(self, graph, match, ctx):
        lo, hi, ok = clip_bounds(match.nodes[0])
        if not ok:
            return "clip bounds are not constants"
        six = scalar(match.info.six)
        scale = six if match.info.divides else (1.0 / six if six else None)
        if not (near(scalar(match.info.three), 3.0) and lo == 0.0 and near(hi, 6.0) and near(scale, 6.0)):
            return "not x * clip(x + 3, 0, 6) / 6"
        return None

    def rewrite(self, graph, match, ctx):
        _emit_hardswish(graph, match, ctx)


class HardSigmoidClip(FusionRule):
    """clip(a*x + b, 0, h) [/ h] -> HardSigmoid(alpha=a/h, beta=b/h) (h = 1 without a division)."""

    name = "hardsigmoid-clip"
    anchor_ops = ("Clip",)

    def match(self, graph, node):
        add, split = _added_constant(node)
        if split is None:
            return None
        scaled, b = split
        nodes = [node, add]
        a = None
        mul = producer_op(scaled, "Mul")
        if mul is not None and split_const(mul) is not None:
            x, a = split_const(mul)
            nodes.append(mul)
        else:
            x = scaled
        out, h = node.outputs[0], None
        div = consumer_op(out, "Div", "Mul")
        if div is not None and len(out.outputs) == 1 and div.inputs[0] is out and is_const(div.inputs[1]):
            h = div
            nodes.append(div)
            out = div.outputs[0]
        elif clip_bounds(node)[1] != 1.0:
            return None  # a plain clipped ramp (ReLU6-like), not a hard sigmoid
        return Match(nodes, HardSigmoidMatch(x, a, b, h, (out,)))

    def _params(self, match: Match) -> tuple[float, float] | None:
        lo, hi, ok = clip_bounds(match.nodes[0])
        a = 1.0 if match.info.a is None else scalar(match.info.a)
        b = scalar(match.info.b)
        if not ok or lo != 0.0 or hi is None or a is None or b is None:
            return None
        h = match.info.h
        if h is None:
            return (a, b) if hi == 1.0 else None
        d = scalar(h.inputs[1])
        d = d if h.op == "Div" else (1.0 / d if d else None)
        return (a / hi, b / hi) if d is not None and near(d, hi) else None

    def preconditions(self, graph, match, ctx):
        return None if self._params(match) else "not clip(a*x + b, 0, h) / h with constant a, b, h"

    def rewrite(self, graph, match, ctx):
        alpha, beta = self._params(match)
        replace(graph, match, "HardSigmoid", [match.info.x], {"alpha": float(alpha), "beta": float(beta)})


class HardSwishFromHardSigmoid(FusionRule):
    """x * HardSigmoid(x, 1/6, 1/2) -> HardSwish(x) (opset >= 14)."""

    name = "hardswish-hardsigmoid"
    anchor_ops = ("HardSigmoid",)

    def match(self, graph, node):
        x = node.inputs[0]
        mul = consumer_op(node.outputs[0], "Mul")
        if mul is None or other_input(mul, node.outputs[0]) is not x or (graph.opset or 0) < 14:
            return None  # below opset 14 x * HardSigmoid(x) is already the shortest form
        return Match([node, mul], HardSwishMulMatch(x, (mul.outputs[0],)))

    def preconditions(self, graph, match, ctx):
        node = match.nodes[0]
        if not (near(node.attrs.get("alpha", 0.2), 1 / 6, 1e-5) and near(node.attrs.get("beta", 0.5), 0.5, 1e-6)):
            return "hard sigmoid is not alpha=1/6, beta=1/2"
        return None

    def rewrite(self, graph, match, ctx):
        replace(graph, match, "HardSwish", [match.info.x])


class FuseHardSwish(RulePass):
    name = "fuse-hardswish"
    description = "written-out HardSwish / HardSigmoid (Add/Clip/Div/Mul) -> HardSwish / HardSigmoid"
    # Exact up to rounding (x/6 + 1/2 vs (x + 3)/6), but one-ulp differences grow through
    # the ~60 convolutions of PP-OCR's detector to ~1.5e-5 relative.
    tolerance = (1e-4, 1e-5)
    rules = (HardSwishClip, HardSigmoidClip, HardSwishFromHardSigmoid)


PASSES = (FuseHardSwish,)
