"""Learned rounding stored: the codes a weight's DequantizeLinear reads replaced by other roundings of
the same weight on the same grid (quant/rounding.py learns them).

  DQ(q, s, z) -> Conv/Gemm/MatMul   becomes   DQ(q', s, z) -> Conv/Gemm/MatMul,  |q' - q| <= 1

Scales, zero points, dtype and shape stay, so the integer kernels onnxruntime picks are the same; each
code moves at most one step (floor or ceiling of W / s instead of the nearest), which is what makes the
result a rounding of the same weight. Preconditions: the DQ reads a constant that nothing else reads and
feeds the weight input (1) of a Conv, Gemm or MatMul; the option ``codes`` (codes initializer name ->
array) holds codes of the same shape and dtype. The quantizer runs this pass (quant/plan.py) and judges
the result with its accuracy budget; it is not in an -O level.
"""
from __future__ import annotations

import dataclasses
from types import MappingProxyType

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.passes.base import Match, Rule, RulePass
from onnxforge.passes.matching import DEFAULT_DOMAINS

PASS_NAME = "learned-weight-rounding"
WEIGHTED = ("Conv", "Gemm", "MatMul")


@dataclasses.dataclass(frozen=True)
class CodesMatch:
    codes: gs.Constant  # the integer weight the DequantizeLinear reads


class LearnedWeightCodes(Rule):
    name = "learned-weight-codes"
    anchor_ops = ("DequantizeLinear",)

    def match(self, graph, node):
        if node.domain not in DEFAULT_DOMAINS or not node.inputs or not isinstance(node.inputs[0], gs.Constant):
            return None
        out = node.outputs[0]
        readers = [r for r in out.outputs if r.op in WEIGHTED and len(r.inputs) > 1 and r.inputs[1] is out]
        return Match([node], CodesMatch(node.inputs[0])) if readers else None

    def check(self, graph, match, ctx):
        const = match.info.codes
        new = ctx.option(PASS_NAME, "codes", {}).get(const.name)
        if new is None:
            return self.refusal(f"no learned codes for {const.name} (nearest rounding kept)", match)
        old = np.asarray(const.values)
        new = np.asarray(new)
        if new.shape != old.shape or new.dtype != old.dtype:
            return self.refusal(f"learned codes {new.dtype}{list(new.shape)} do not fit {old.dtype}{list(old.shape)}", match)
        if len(const.outputs) != 1:
            return self.refusal(f"{const.name} is read by other nodes too", match)
        diff = np.abs(new.astype(np.int32) - old.astype(np.int32))
        if diff.max(initial=0) > 1:
            return self.refusal("learned codes move more than one step from the stored rounding", match)
        if not diff.any():
            return self.refusal("the stored codes already are the learned ones", match)
        return None

    def rewrite(self, graph, match, ctx):
        const = match.info.codes
        const.values = np.array(ctx.option(PASS_NAME, "codes", {})[const.name], dtype=np.asarray(const.values).dtype)


class LearnedWeightRounding(RulePass):
    name = PASS_NAME
    description = "INT8 weight codes replaced by a learned rounding of the same weight (floor or ceiling, same grid)"
    tolerance = (float("inf"), float("inf"))  # a different rounding: judged by the quantizer's accuracy budget
    rules = (LearnedWeightCodes,)
    options = MappingProxyType({
        "codes": (dict, "codes initializer name -> learned codes (quantize --rounding learned computes them)"),
    })


PASSES = (LearnedWeightRounding,)
