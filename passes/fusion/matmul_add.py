"""MatMul + Add -> Gemm, MatMul + 0 -> MatMul, Transpose folded into Gemm (fuse-matmul-add).

  MatMul(A, B) + C = Gemm(A, B, C)               A and B 2-D, C broadcasts to [M, N]
                                                 unidirectionally (1-D [N], [1, N] or [M, N])
  Gemm(Transpose(A), B) = Gemm(A, B, transA=!transA)    (perm [1, 0]; same for B)
  MatMul(A, B) + 0 = MatMul(A, B)                 any rank; the zero broadcasts without
                                                 enlarging the output ([N], [1, .., N], scalar)
The last is exact except for the sign of zero (-0.0 + 0.0 = +0.0; the two compare equal),
which is why the lossless cleanup keeps x + 0.0 and this tolerance-checked pass drops it:
randomly initialised exports (zero biases) otherwise pay a full elementwise pass per layer.
Preconditions: A's rank is known to be 2 for Gemm (Gemm is 2-D only); constants are
floating point of the weight's type; the intermediate tensor is read only by the pair.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.passes.base import Match, RulePass

from ._match import FusionRule, const_value, either_order, fresh_constant, producer, replace


def rank_of(t: gs.Tensor) -> int | None:
    value = const_value(t)
    if value is not None:
        return value.ndim
    return len(t.shape) if t.shape is not None else None


@dataclasses.dataclass(frozen=True)
class MatMulAddMatch:
    mm: gs.Node
    c: gs.Tensor  # the addend
    outputs: tuple[gs.Tensor, ...]


@dataclasses.dataclass(frozen=True)
class ZeroBiasMatch:
    mm: gs.Node
    zero: np.ndarray  # the all-zero addend's value
    outputs: tuple[gs.Tensor, ...]


@dataclasses.dataclass(frozen=True)
class GemmTransposeMatch:
    index: int  # the Gemm input (0: A, 1: B) a Transpose makes
    outputs: tuple[gs.Tensor, ...]


class MatMulAdd(FusionRule):
    name = "matmul-add"
    anchor_ops = ("Add",)

    def match(self, graph, node):
        for y, c in either_order(node):
            mm = producer(y)
            if mm is not None and mm.op == "MatMul" and not mm.domain:
                return Match([node, mm], MatMulAddMatch(mm, c, (node.outputs[0],)))
        return None

    def preconditions(self, graph, match, ctx):
        mm, c = match.info.mm, match.info.c
        a, b = mm.inputs
        if rank_of(a) != 2 or rank_of(b) != 2:
            return "MatMul inputs are not known to be 2-D"
        value = const_value(c)
        if value is None:
            return "bias not constant"
        w = const_value(b)
        if value.dtype.kind != "f" or (w is not None and w.dtype != value.dtype):
            return "not a floating-point MatMul"
        n = w.shape[1] if w is not None else (b.shape[1] if isinstance(b.shape[1], int) else None)
        if value.ndim > 2 or (value.ndim >= 1 and n is not None and value.shape[-1] not in (1, n)):
            return "bias does not broadcast to the MatMul output"
        rows = a.shape[0] if a.shape is not None else None
        if value.ndim == 2 and value.shape[0] != 1 and (not isinstance(rows, int) or rows != value.shape[0]):
            return "bias rows differ from the MatMul output rows"
        return None

    def rewrite(self, graph, match, ctx):
        mm, c = match.info.mm, match.info.c
        bias = c if isinstance(c, gs.Constant) else fresh_constant(graph, f"{c.name}_gemm_bias", const_value(c))
        replace(graph, match, "Gemm", [*mm.inputs, bias], name=mm.name)


class MatMulZeroBias(FusionRule):
    name = "matmul-zero-bias"
    anchor_ops = ("Add",)

    def match(self, graph, node):
        for y, c in either_order(node):
            mm = producer(y)
            value = const_value(c)
            is_zero = value is not None and value.dtype.kind == "f" and not np.any(value)
            if mm is not None and mm.op == "MatMul" and not mm.domain and is_zero:  # the pattern is "+ 0"
                return Match([node, mm], ZeroBiasMatch(mm, value, (node.outputs[0],)))
        return None

    def preconditions(self, graph, match, ctx):
        mm, zero = match.info.mm, match.info.zero
        w = const_value(mm.inputs[1])
        if w is None or w.ndim < 2:
            return "MatMul weight not a constant matrix"
        a_rank = rank_of(mm.inputs[0])
        # the output has at least w's rank, or one less when A is (or may be) 1-D
        out_rank = max(a_rank, w.ndim) if a_rank is not None and a_rank >= 2 else w.ndim - 1
        leading, last = zero.shape[:-1], (zero.shape[-1:] or (1,))[0]
        if zero.ndim > out_rank or any(d != 1 for d in leading) or last not in (1, w.shape[-1]):
            return "zero broadcasts beyond the MatMul output"
        return None

    def rewrite(self, graph, match, ctx):
        mm = match.info.mm
        replace(graph, match, "MatMul", list(mm.inputs), name=mm.name)


class GemmTranspose(FusionRule):
    name = "gemm-transpose"
    anchor_ops = ("Gemm",)

    def match(self, graph, node):
        for index in (0, 1):
            t = producer(node.inputs[index])
            if t is not None and t.op == "Transpose" and not t.domain:
                return Match([node, t], GemmTransposeMatch(index, (node.outputs[0],)))
        return None

    def preconditions(self, graph, match, ctx):
        perm = match.nodes[1].attrs.get("perm")
        return None if perm is None or list(perm) == [1, 0] else f"transpose perm {perm} is not [1, 0]"

    def rewrite(self, graph, match, ctx):
        gemm, t = match.nodes
        key = "transA" if match.info.index == 0 else "transB"
        attrs = dict(gemm.attrs)
        attrs[key] = 1 - int(attrs.get(key, 0))
        inputs = list(gemm.inputs)
        inputs[match.info.index] = t.inputs[0]
        replace(graph, match, "Gemm", inputs, attrs, name=gemm.name)


class FuseMatMulAdd(RulePass):
    name = "fuse-matmul-add"
    description = "2-D MatMul + constant Add -> Gemm; MatMul + 0 -> MatMul; Transpose folded into Gemm"
    tolerance = (1e-5, 1e-6)
    rules = (MatMulAdd, MatMulZeroBias, GemmTranspose)


PASSES = (FuseMatMulAdd,)
