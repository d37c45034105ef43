"""A pooling window that covers the whole input becomes the global pool.

  AveragePool(x; kernel k, strides s)  = GlobalAveragePool(x)
  MaxPool(x; kernel k, strides s)      = GlobalMaxPool(x)
when there is exactly one window per axis and it holds exactly the H x W input values:
pads 0, dilations 1, and per axis kernel == size, or kernel > size with ceil_mode and
kernel - size < stride (ceil_mode only decides that there is one window; count_include_pad
has no pad to count). Preconditions: a 2-D window on a 4-D input of static height and width.

Exporters write torch's ``AvgPool2d(k, ceil_mode=True)`` with k far above the input
(EfficientNet: 1280 on 7x7); onnxruntime's QLinearAveragePool computes such a window
wrongly (outputs the zero point), its QLinearGlobalAveragePool is right and faster. The
quantizer's float baseline runs this pass; it is not in an -O level.
"""
from __future__ import annotations

from onnxforge.passes.base import Match, Rule, RulePass
from onnxforge.passes.matching import DEFAULT_DOMAINS

from ._match import infer_shapes

POOLS = ("AveragePool", "MaxPool")


def one_window(kernel, sizes, strides, ceil_mode: bool) -> bool:
    """Each axis has exactly one window, covering the whole axis."""
    return all(k >= d and (k == d or (ceil_mode and k - d < s)) for k, d, s in zip(kernel, sizes, strides))


class WholeWindowPool(Rule):
    name = "whole-window-pool"
    anchor_ops = POOLS

    def __init__(self):
        self._shapes = None  # inferred once per sweep, on the first check

    def match(self, graph, node):
        if node.domain not in DEFAULT_DOMAINS or len(node.outputs) != 1:
            return None
        return Match([node])

    def check(self, graph, match, ctx):
        node = match.nodes[0]
        kernel = list(node.attrs.get("kernel_shape", []))
        if len(kernel) != 2:
            return self.refusal("not a 2-D window", match)
        if any(node.attrs.get("pads", [])) or node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return self.refusal("padded window", match)
        if any(d != 1 for d in node.attrs.get("dilations", [])):
            return self.refusal("dilated window", match)
        if self._shapes is None:
            self._shapes = infer_shapes(graph, ctx)
        shape = self._shapes.of(node.inputs[0])
        if shape is None or len(shape) != 4 or not all(isinstance(d, int) for d in shape[2:]):
            return self.refusal("input is not 4-D with static height and width", match)
        strides = list(node.attrs.get("strides", [1, 1]))
        if not one_window(kernel, shape[2:], strides, bool(node.attrs.get("ceil_mode", 0))):
            return self.refusal("the window does not cover the whole input once", match)
        return None

    def rewrite(self, graph, match, ctx):
        node = match.nodes[0]
        node.op = "Global" + node.op  # same input and output, no attributes
        node.attrs.clear()


class GlobalPool(RulePass):
    name = "global-pool"
    description = "AveragePool/MaxPool whose one window covers the whole (static) input -> GlobalAveragePool/GlobalMaxPool"
    tolerance = (1e-5, 1e-6)  # the same sum, possibly in another order
    rules = (WholeWindowPool,)


PASSES = (GlobalPool,)
