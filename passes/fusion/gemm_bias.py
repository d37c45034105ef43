"""Gemm's constant C of shape [1, N] stored as [N].

  Gemm(A, B, C[1, N]) = Gemm(A, B, C[N])      (both broadcast over the M rows)

onnxruntime's MatMul+Add fusion writes C as [1, N]; its QDQ quantizer then compares a row
of the per-channel bias with a scalar and fails ("truth value of an array ... is
ambiguous", magika_v3_3). Precondition: C is read by this Gemm only (another reader may
need the 2-D shape). The quantizer's float baseline runs this pass; it is not in an -O level.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.passes.base import Match, Rule, RulePass
from onnxforge.passes.matching import DEFAULT_DOMAINS


@dataclasses.dataclass(frozen=True)
class RowBiasMatch:
    c: gs.Constant  # the [1, N] bias


class GemmRowBias(Rule):
    name = "gemm-row-bias"
    anchor_ops = ("Gemm",)

    def match(self, graph, node):
        c = node.inputs[2] if len(node.inputs) > 2 else None
        if node.domain not in DEFAULT_DOMAINS or not isinstance(c, gs.Constant):
            return None
        shape = tuple(c.shape)
        return Match([node], RowBiasMatch(c)) if len(shape) == 2 and shape[0] == 1 else None

    def check(self, graph, match, ctx):
        if len(match.info.c.outputs) != 1:
            return self.refusal(f"bias {match.info.c.name} is read by other nodes too", match)
        return None

    def rewrite(self, graph, match, ctx):
        node, c = match.nodes[0], match.info.c
        node.inputs[2] = gs.Constant(c.name, np.asarray(c.values).reshape(-1))


class GemmBiasVector(RulePass):
    name = "gemm-bias-vector"
    description = "Gemm's constant bias of shape [1, N] stored as [N] (onnxruntime's quantizer needs it 1-D)"
    tolerance = (0.0, 0.0)
    rules = (GemmRowBias,)


PASSES = (GemmBiasVector,)
