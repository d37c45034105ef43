"""A constant zero Pad folded into the Conv or pooling op that reads it.

  Conv(Pad(x, p, 0)) = Conv(x, pads = conv_pads + p)           Conv pads with zeros itself
  AveragePool(Pad(x, p, 0)) = AveragePool(x, pads + p, count_include_pad=1)
      exact when the pool already counts padding or has no padding of its own
  MaxPool(Pad(x, p, v)) = MaxPool(x, pads + p)
      exact when v = -inf (MaxPool's implicit padding), or v = 0 and x >= 0 (x from Relu)
Preconditions: Pad mode "constant", pads constant, non-negative, zero on the batch and
channel axes, no ``axes`` input; the consumer has auto_pad NOTSET or VALID; the padded tensor is
read only by that consumer; for pooling, every total pad stays below the kernel size
(ONNX's bound).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.passes.base import Match, RulePass

from ._match import FusionRule, const_value, producer, replace, scalar

CONSUMERS = ("Conv", "AveragePool", "MaxPool")


def pad_amounts(pad) -> np.ndarray | None:
    if "pads" in pad.attrs:  # opset < 11
        return np.asarray(pad.attrs["pads"], np.int64)
    value = const_value(pad.inputs[1]) if len(pad.inputs) > 1 else None
    return value.astype(np.int64).reshape(-1) if value is not None else None


def pad_value(pad) -> float | None:
    if "value" in pad.attrs:
        return float(pad.attrs["value"])
    if len(pad.inputs) > 2 and pad.inputs[2].name:
        return scalar(pad.inputs[2])
    return 0.0


@dataclasses.dataclass(frozen=True)
class PadMatch:
    pad: gs.Node
    consumer: gs.Node  # the Conv / pool reading the Pad
    outputs: tuple[gs.Tensor, ...]


class PadInto(FusionRule):
    name = "pad-into-conv-pool"
    anchor_ops = CONSUMERS

    def match(self, graph, node):
        pad = producer(node.inputs[0])
        if pad is None or pad.op != "Pad" or pad.domain:
            return None
        return Match([node, pad], PadMatch(pad, node, (node.outputs[0],)))

    def preconditions(self, graph, match, ctx):
        pad, node = match.info.pad, match.info.consumer
        if pad.attrs.get("mode", "constant") != "constant":
            return f"pad mode {pad.attrs.get('mode')} is not constant"
        if len(pad.inputs) > 3 and pad.inputs[3].name:
            return "pad has an axes input"
        p = pad_amounts(pad)
        if p is None:
            return "pads not constant"
        half = p.size // 2
        if (p < 0).any() or half < 3 or p[[0, 1, half, half + 1]].any():
            return "pads negative or on the batch/channel axes"
        if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return "consumer uses SAME auto_pad"
        value = pad_value(pad)
        if value is None:
            return "pad value not constant"
        return self._consumer_reason(match, p, value)

    def _consumer_reason(self, match, p, value) -> str | None:
        node = match.info.consumer
        if node.op == "Conv":
            return None if value == 0.0 else "pad value is not 0"
        total = self._pads(node, p)
        kernel = list(node.attrs.get("kernel_shape", []))
        spatial = len(kernel)
        if any(total[i] >= kernel[i % spatial] for i in range(len(total))):
            return "combined pads reach the kernel size"
        if node.op == "AveragePool":
            own = any(int(v) for v in node.attrs.get("pads", ()))
            if value != 0.0:
                return "pad value is not 0"
            if own and not int(node.attrs.get("count_include_pad", 0)):
                return "pool excludes its own padding from the average"
            return None
        if value == -math.inf:
            return None
        x_nonneg = producer(match.info.pad.inputs[0])
        if value == 0.0 and x_nonneg is not None and x_nonneg.op == "Relu":
            return None
        return "MaxPool pad value is neither -inf nor 0 after a Relu"

    @staticmethod
    def _pads(node, p: np.ndarray) -> list[int]:
        half = p.size // 2
        spatial = [int(v) for v in p[2:half]] + [int(v) for v in p[half + 2:]]
        own = [int(v) for v in node.attrs.get("pads", [0] * len(spatial))]
        return [a + b for a, b in zip(own, spatial)]

    def rewrite(self, graph, match, ctx):
        pad, node = match.info.pad, match.info.consumer
        attrs = dict(node.attrs)
        attrs["pads"] = self._pads(node, pad_amounts(pad))
        attrs.pop("auto_pad", None)  # VALID means no own padding: explicit pads replace it
        if node.op == "AveragePool":
            attrs["count_include_pad"] = 1
        replace(graph, match, node.op, [pad.inputs[0], *node.inputs[1:]], attrs, name=node.name)


class FusePad(RulePass):
    name = "fuse-pad"
    description = "constant Pad folded into the pads of the Conv/AveragePool/MaxPool after it"
    tolerance = (1e-6, 1e-6)
    rules = (PadInto,)


PASSES = (FusePad,)
