"""A constant per-channel affine after a Conv or ConvTranspose folded into its weights and bias.

  Conv(x, W, b) * c  = Conv(x, W * c[o], b * c)        (Mul; Div is Mul by 1/c)
  Conv(x, W, b) + c  = Conv(x, W, b + c)               (Add; Sub of a constant is Add of -c)
The same holds for ConvTranspose, whose weight is laid out [C_in, C_out/group, k...]: output
channel o = g * C_out/group + j is scaled through W[g * C_in/group : (g+1) * C_in/group, j].
(Paddle exports ConvTranspose without bias and adds it afterwards, which hides a following
BatchNormalization from fuse-conv-bn.)
where c is a constant that broadcasts over the output channels only: a scalar, or a
tensor whose only non-1 dim is the channel axis (shapes [C], [C,1,1], [1,C,1,1]; a
trailing-aligned [C] on a 4-D output would be the width axis, so a 1-D c must have size 1).
Preconditions: Conv weights (and bias) constant and floating point, the Conv output read
only by the Mul/Add, c of the same element type.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.passes.base import Match, RulePass

from ._match import FusionRule, const_value, fresh_constant, producer, replace, split_const


def channel_vector(c: np.ndarray, channels: int, out_rank: int) -> np.ndarray | None:
    """c as a per-output-channel vector, or None when it varies along another axis."""
    if c.size == 1:
        return np.full(channels, float(c.reshape(-1)[0]))
    if c.ndim > out_rank:
        return None
    shape = (1,) * (out_rank - c.ndim) + c.shape  # numpy aligns trailing dims
    if shape[1] != channels or any(d != 1 for i, d in enumerate(shape) if i != 1):
        return None
    return c.reshape(-1).astype(np.float64)


CONV_OPS = ("Conv", "ConvTranspose")


def out_channels(conv, w: np.ndarray) -> int:
    return w.shape[0] if conv.op == "Conv" else w.shape[1] * int(conv.attrs.get("group", 1))


def scale_weights(conv, w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """W with output channel o multiplied by scale[o]."""
    if conv.op == "Conv":
        return w * scale.reshape(-1, *([1] * (w.ndim - 1)))
    group = int(conv.attrs.get("group", 1))
    per_group = w.reshape(group, w.shape[0] // group, *w.shape[1:])
    return (per_group * scale.reshape(group, 1, w.shape[1], *([1] * (w.ndim - 2)))).reshape(w.shape)


@dataclasses.dataclass(frozen=True)
class ConvAffineMatch:
    conv: gs.Node
    c: gs.Tensor  # the constant the Mul/Add/Div/Sub applies to the conv's output
    outputs: tuple[gs.Tensor, ...]


class ConvAffine(FusionRule):
    name = "conv-affine"
    anchor_ops = ("Mul", "Add", "Div", "Sub")

    def match(self, graph, node):
        split = split_const(node)
        if split is None:
            return None
        x, c = split
        conv = producer(x)
        if conv is None or conv.op not in CONV_OPS or conv.domain:
            return None
        if node.op in ("Div", "Sub") and node.inputs[0] is not x:
            return None  # c / conv and c - conv are not affine in the weights' sense
        return Match([node, conv], ConvAffineMatch(conv, c, (node.outputs[0],)))

    def _vector(self, match: Match) -> np.ndarray | None:
        conv = match.info.conv
        w = const_value(conv.inputs[1])
        c = const_value(match.info.c)
        rank = w.ndim  # the conv output has the weight's rank
        return channel_vector(c, out_channels(conv, w), rank)

    def preconditions(self, graph, match, ctx):
        conv = match.info.conv
        w = const_value(conv.inputs[1])
        if w is None or (len(conv.inputs) > 2 and conv.inputs[2].name and const_value(conv.inputs[2]) is None):
            return "weights not constant"
        c = const_value(match.info.c)
        if w.dtype.kind != "f" or c.dtype != w.dtype:
            return "weights and constant are not the same floating type"
        if self._vector(match) is None:
            return f"constant of shape {list(c.shape)} does not act per output channel"
        return None

    def rewrite(self, graph, match, ctx):
        conv, op = match.info.conv, match.nodes[0].op
        w = const_value(conv.inputs[1])
        b = const_value(conv.inputs[2]).astype(np.float64) if len(conv.inputs) > 2 and conv.inputs[2].name \
            else np.zeros(out_channels(conv, w))
        v = self._vector(match)
        w2 = w.astype(np.float64)
        if op in ("Mul", "Div"):
            scale = v if op == "Mul" else 1.0 / v
            w2 = scale_weights(conv, w2, scale)
            b = b * scale
        else:
            b = b + (v if op == "Add" else -v)
        inputs = [conv.inputs[0], fresh_constant(graph, f"{conv.name}_w", w2.astype(w.dtype)),
                  fresh_constant(graph, f"{conv.name}_b", b.astype(w.dtype))]
        replace(graph, match, conv.op, inputs, dict(conv.attrs), name=conv.name)


class FuseConvAffine(RulePass):
    name = "fuse-conv-affine"
    description = "constant per-channel Mul/Div/Add/Sub after a Conv/ConvTranspose folded into its weights and bias"
    tolerance = (1e-4, 1e-5)
    rules = (ConvAffine,)


PASSES = (FuseConvAffine,)
