"""Constant scalar scales around a MatMul/Gemm folded into its weights or alpha (fold-matmul-scale).

  MatMul(A, W) * s = MatMul(A, W * s),  MatMul(A, W) / s = MatMul(A, W / s),
  MatMul(A * s, W) = MatMul(A, W * s)             W constant, s a constant scalar
  Gemm(A, B, C) * s = Gemm(A, B, C, alpha * s, beta * s)
Preconditions: constants are floating point of the weight's type; the intermediate tensor
is read only by the pair; the scale does not broadcast the output to a higher rank.
A scale is not folded out of an activation: the 0.5 of GELU's 0.5 * x * (1 + erf(..))
(or tanh) and the 1/6 of HardSwish's x * clip(..) / 6 stay, so that the activation
fusions of -O3 still see their pattern (a fused GELU is worth more than one Mul).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.passes.base import Match, RulePass

from ._match import FusionRule, const_value, fresh_constant, producer, producer_op, replace, scalar, split_const
from .matmul_add import rank_of


def activation_product(t: gs.Tensor) -> bool:
    """Is ``t`` x * (1 + erf(..)) / x * (1 + tanh(..)) (GELU before its 0.5) or x * clip(..)
    (HardSwish before its 1/6)?"""
    mul = producer_op(t, "Mul")
    if mul is None:
        return False
    for factor in mul.inputs:
        if producer_op(factor, "Clip") is not None:
            return True
        shift = producer_op(factor, "Add")
        if shift is not None and any(producer_op(i, "Erf", "Tanh") is not None for i in shift.inputs):
            return True
    return False


@dataclasses.dataclass(frozen=True)
class ScaleMatch:
    lin: gs.Node  # the MatMul / Gemm
    a: gs.Tensor  # its activation input (the scaled one for MatMul(A * s, W))
    s: gs.Tensor  # the scalar
    div: bool  # the scale divides
    outputs: tuple[gs.Tensor, ...]


class MatMulScale(FusionRule):
    """Scalar Mul/Div after (or Mul before) a MatMul/Gemm with constant weights."""

    name = "matmul-scale"
    anchor_ops = ("Mul", "Div", "MatMul")

    def match(self, graph, node):
        if node.op == "MatMul":  # MatMul(A * s, W)
            pre = producer(node.inputs[0])
            if pre is None or pre.op != "Mul" or split_const(pre) is None:
                return None
            a, s = split_const(pre)
            return Match([node, pre], ScaleMatch(node, a, s, False, (node.outputs[0],)))
        split = split_const(node)
        if split is None:
            return None
        y, s = split
        lin = producer(y)
        if lin is None or lin.op not in ("MatMul", "Gemm") or lin.domain:
            return None
        if lin.op == "MatMul" and const_value(lin.inputs[1]) is None:
            return None  # activations times activations (attention scores): nothing to fold into
        if node.op == "Div" and node.inputs[0] is not y:
            return None
        return Match([node, lin], ScaleMatch(lin, lin.inputs[0], s, node.op == "Div", (node.outputs[0],)))

    def preconditions(self, graph, match, ctx):
        lin = match.info.lin
        s = const_value(match.info.s)
        if s is None or s.size != 1:
            return "scale is not a constant scalar"
        if match.nodes[0] is lin and activation_product(match.info.a):
            return "the scale belongs to a GELU/HardSwish pattern (kept for the activation fusion)"
        if s.ndim > 0 and lin.op == "Gemm" and s.ndim > 2:
            return "scale would broadcast the output's rank"
        w = const_value(lin.inputs[1])
        if lin.op == "MatMul" and w is None:
            return "weights not constant"
        if w is not None and (w.dtype.kind != "f" or s.dtype != w.dtype):
            return "weights and scale are not the same floating type"
        if lin.op == "MatMul" and s.ndim > max(rank_of(lin.inputs[0]) or 0, w.ndim):
            return "scale would broadcast the output's rank"
        return None

    def rewrite(self, graph, match, ctx):
        lin, info = match.info.lin, match.info
        s = scalar(info.s)
        factor = 1.0 / s if info.div else s
        if lin.op == "Gemm":
            attrs = dict(lin.attrs)
            attrs["alpha"] = float(attrs.get("alpha", 1.0)) * factor
            attrs["beta"] = float(attrs.get("beta", 1.0)) * factor
            replace(graph, match, "Gemm", list(lin.inputs), attrs, name=lin.name)
            return
        w = const_value(lin.inputs[1])
        w2 = (w.astype(np.float64) * factor).astype(w.dtype)
        replace(graph, match, "MatMul", [info.a, fresh_constant(graph, f"{lin.name}_scaled_w", w2)], name=lin.name)


class FoldMatMulScale(RulePass):
    name = "fold-matmul-scale"
    description = "constant scalar Mul/Div around a MatMul/Gemm folded into its weights or alpha"
    tolerance = (1e-5, 1e-6)
    rules = (MatMulScale,)


PASSES = (FoldMatMulScale,)
