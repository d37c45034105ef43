"""The rule that writes bias correction into the float model: the pass ``bias-correction``
(bias_correct.apply_deltas runs it; bias_correct.py measures the corrections).

For a layer y = W * x + b whose quantized output channels are off by a mean shift d_c
(measured by ``correct_biases``), the corrected float bias is b_c + d_c; the QDQ model
rebuilt from it quantizes the corrected bias. The bias keeps its name (the rebuilds and
the corrections refer to it by name) and is changed once, whichever layers read it.

Refused (``--explain``): a layer with no correction for its bias (the caller corrects
only layers that stay int8: a correction for rounding is an error in a float layer), a
correction whose shape is not the bias's, a bias another layer of this run corrected
already (it is shared).
"""
from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Mapping

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.passes.base import Match, Rule, RulePass
from onnxforge.passes.matching import DEFAULT_DOMAINS

PASS_NAME = "bias-correction"


@dataclasses.dataclass(frozen=True)
class BiasMatch:
    bias: gs.Constant


class AddBiasCorrection(Rule):
    name = "add-bias-correction"
    anchor_ops = ("Conv", "ConvTranspose", "Gemm")

    def __init__(self):
        self._corrected: set[str] = set()  # biases this sweep changed (a shared bias changes once)

    def match(self, graph, node):
        if node.domain not in DEFAULT_DOMAINS or len(node.inputs) < 3 or not isinstance(node.inputs[2], gs.Constant):
            return None
        return Match([node], BiasMatch(node.inputs[2]))

    def check(self, graph, match, ctx):
        bias = match.info.bias
        delta = (ctx.option(PASS_NAME, "deltas") or {}).get(bias.name)
        if delta is None:
            return self.refusal(f"no correction for its bias {bias.name}", match)
        if np.shape(delta) != tuple(bias.shape):
            return self.refusal(f"the correction has shape {np.shape(delta)}, bias {bias.name} {tuple(bias.shape)}", match)
        if bias.name in self._corrected:
            return self.refusal(f"bias {bias.name} is shared with a layer corrected already", match)
        return np.asarray(delta)

    def rewrite(self, graph, match, ctx):
        bias = match.info.bias
        bias.values = (np.asarray(bias.values).astype(np.float32) + match.plan).astype(np.float32)
        self._corrected.add(bias.name)


class BiasCorrection(RulePass):
    name = PASS_NAME
    description = "measured bias corrections of quantized layers added to the float model's biases"
    tolerance = (float("inf"), float("inf"))  # changes outputs by design: the corrections of int8 rounding
    rules = (AddBiasCorrection,)
    options: Mapping = MappingProxyType({
        "deltas": (dict, "bias name -> correction per output channel (bias_correct.correct_biases)"),
    })


PASSES = (BiasCorrection,)
