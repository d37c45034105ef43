"""Per-channel scales [N, C, 1, 1] of a quantized Mul/Add widened to [N, C, 1, W] (in NHWC:
[N, 1, W, C]) by an Expand of their integers.

Identity: x * s with s constant over H and W equals x * Expand(s, W) (the broadcast is the
same; Expand copies integers, exact). onnxruntime's QLinearMul/QLinearAdd broadcast an
[N, 1, 1, C] operand in NHWC one row of C values at a time (a kernel call per pixel: 1.9 ms
for 160x160x96 in PP-OCRv4 det, 5x an unbroadcast product); [N, 1, W, C] makes each call a
whole row of W*C. Squeeze-and-excitation blocks are this pattern.

  DQ(s_q) -> op  becomes  Transpose(s_q, NHWC) -> Expand([1, 1, W, 1]) -> Transpose(NCHW) -> DQ -> op
(W a constant when known, else read from the other operand's shape; the new DQ is the
op's own: the original may have other readers or be a graph output).
Preconditions: both inputs DequantizeLinear of activations, both of known rank 4, one of
them [N, C, 1, 1] with C > 1, the other neither one row nor one column high/wide. The
quantizer keeps the result only where onnxruntime's layout transposes cancel (layout.py).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.passes.base import Match, Rule, RulePass
from onnxforge.passes.fusion._match import either_order, infer_shapes
from onnxforge.passes.matching import DEFAULT_DOMAINS

from .common import activation_dq, fresh_name, i64

TO_NHWC, TO_NCHW = [0, 2, 3, 1], [0, 3, 1, 2]


@dataclasses.dataclass(frozen=True)
class WideScaleMatch:
    dqs: tuple[gs.Node, gs.Node]  # the DequantizeLinear of each operand


class WideChannelScale(Rule):
    name = "wide-channel-scale"
    anchor_ops = ("Mul", "Add")

    def __init__(self):
        self._shapes = None  # inferred once per sweep, on the first check

    def match(self, graph, node):
        if node.domain not in DEFAULT_DOMAINS or len(node.inputs) != 2:
            return None
        dqs = [activation_dq(t) for t in node.inputs]
        return Match([node], WideScaleMatch(tuple(dqs))) if all(dqs) else None

    def check(self, graph, match, ctx):
        if self._shapes is None:
            self._shapes = infer_shapes(graph, ctx)
        node = match.nodes[0]
        dims = {id(t): self._shapes.of(t) for t in node.inputs}
        if any(d is None or len(d) != 4 for d in dims.values()):
            return self.refusal("operand shapes are not known to be 4-D", match)
        dims = {key: [d if isinstance(d, int) else None for d in ds] for key, ds in dims.items()}
        reason = "no operand is a per-channel [N, C, 1, 1] scale with C > 1"
        for small, (scale, other) in enumerate(either_order(node)):  # small: the scale's input index
            scale_dims, other_dims = dims[id(scale)], dims[id(other)]
            if scale_dims[2:] == [1, 1] and scale_dims[1] != 1:
                if other_dims[2] != 1 and other_dims[3] != 1:
                    return small, other_dims[3]  # the plan: which input is the scale, and W when known
                reason = "the other operand is one row high or one column wide"
        return self.refusal(reason, match)

    def rewrite(self, graph, match, ctx):
        node = match.nodes[0]
        small, width = match.plan
        small_dq, big_dq = match.info.dqs[small], match.info.dqs[1 - small]
        base = fresh_name(graph, f"{node.name or node.outputs[0].name}_wide_scale")
        q = small_dq.inputs[0]
        if isinstance(width, int) and width > 0:
            target = i64(f"{base}_target", [1, 1, width, 1])
        else:
            shape, w = gs.Variable(f"{base}_big_shape", dtype=np.int64), gs.Variable(f"{base}_w", dtype=np.int64)
            target = gs.Variable(f"{base}_target", dtype=np.int64)
            graph.nodes += [
                gs.Node("Shape", f"{base}_big_shape", inputs=[big_dq.inputs[0]], outputs=[shape]),
                gs.Node("Slice", f"{base}_w", inputs=[shape, i64(f"{base}_w_from", [3]), i64(f"{base}_w_to", [4])],
                        outputs=[w]),
                gs.Node("Concat", f"{base}_target", {"axis": 0},
                        inputs=[i64(f"{base}_ones", [1, 1]), w, i64(f"{base}_one", [1])], outputs=[target]),
            ]
        nhwc, wide, nchw = (gs.Variable(f"{base}_{s}", dtype=q.dtype) for s in ("nhwc", "nhwc_wide", "nchw"))
        out = gs.Variable(f"{base}_dq", dtype=small_dq.outputs[0].dtype)
        graph.nodes += [
            gs.Node("Transpose", f"{base}_to_nhwc", {"perm": TO_NHWC}, [q], [nhwc]),
            gs.Node("Expand", f"{base}_expand", inputs=[nhwc, target], outputs=[wide]),
            gs.Node("Transpose", f"{base}_to_nchw", {"perm": TO_NCHW}, [wide], [nchw]),
            gs.Node("DequantizeLinear", f"{base}_dq", dict(small_dq.attrs), [nchw, *small_dq.inputs[1:]], [out],
                    domain=small_dq.domain),
        ]
        node.inputs[small] = out


class WideChannelScales(RulePass):
    name = "wide-channel-scales"
    description = "per-channel [N, C, 1, 1] scales of a quantized Mul/Add expanded along W (onnxruntime's NHWC int8 kernels)"
    tolerance = (0.0, 0.0)  # integers copied: bit-exact
    rules = (WideChannelScale,)


PASSES = (WideChannelScales,)
