"""The compute precision of onnxruntime's MatMulNBits as a registered pass: ``matmulnbits-accuracy-level``,
rule ``set-matmulnbits-accuracy-level`` (``--bits auto`` runs it for its int4-acc4 candidate).

MatMulNBits y = x dequant(W) takes ``accuracy_level`` (onnxruntime's contrib op): 0 computes in the
input's float type; 4 quantizes each block of x to int8 inside the kernel (s8 x s4 dot products: faster on
CPUs, slightly less accurate). The weights, scales and zero points are not touched; only how the kernel
multiplies changes, so the candidate is judged on accuracy like the others (auto_bits.py).

Refused (``--explain``): no level given, a node already at the level.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

from onnxforge.passes.base import Match, Rule, RulePass
from onnxforge.passes.fusion._match import MS_DOMAIN

PASS_NAME = "matmulnbits-accuracy-level"


class SetAccuracyLevel(Rule):
    name = "set-matmulnbits-accuracy-level"
    anchor_ops = ("MatMulNBits",)

    def match(self, graph, node):
        return Match([node]) if node.domain == MS_DOMAIN else None

    def check(self, graph, match, ctx):
        level = ctx.option(PASS_NAME, "level")
        if level is None:
            return self.refusal("no accuracy_level given (option level)", match)
        if match.nodes[0].attrs.get("accuracy_level", 0) == level:
            return self.refusal(f"accuracy_level is {level} already", match)
        return level

    def rewrite(self, graph, match, ctx):
        match.nodes[0].attrs["accuracy_level"] = match.plan


class MatMulNBitsAccuracyLevel(RulePass):
    name = PASS_NAME
    description = "MatMulNBits accuracy_level set (4: int8 activations per block inside the kernel)"
    tolerance = (float("inf"), float("inf"))  # int8 activations by design: judged on the model's accuracy
    rules = (SetAccuracyLevel,)
    options: Mapping = MappingProxyType({
        "level": (int, "accuracy_level for every MatMulNBits (0: float, 1 fp32, 2 fp16, 3 bf16, 4 int8)"),
    })


PASSES = (MatMulNBitsAccuracyLevel,)
