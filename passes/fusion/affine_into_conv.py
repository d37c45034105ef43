"""A constant per-channel affine *before* a Conv folded into the Conv (PP-OCR's
learnable affine after HardSwish, scale-then-shift normalizations).

With y = a * h + b (a, b scalars or per input channel) read only by Conv(W, bias):
  * no padding:  Conv_W(a h + b) = Conv_{W a}(h) + B,  B[o] = sum_{i, k} W[o, i, k] b_i
    (Mul and Add both disappear);
  * padding:     the Conv pads y with 0, not with b, so only the scale moves:
    a h + b = a (h + b / a)  gives  Add(h, b / a) -> Conv_{W a}  (needs a != 0; one
    elementwise op instead of two);
  * Mul alone:   Conv_W(pad(a h)) = Conv_{W a}(pad(h)), padding or not.
W a scales input channel i of W (for grouped convs, the channels of its group).
Preconditions: the Mul is not the 0.5 of a GELU or the 1/6 of a HardSwish still being
matched (x * (1 + erf(..)) * 0.5 before a Conv: Whisper's conv stem); Conv in the default domain with constant floating weights (and bias),
the intermediate tensors read only inside the pattern, constants of the weights' type
that broadcast per input channel only (scalar or [C, 1, 1] / [1, C, 1, 1]).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.passes.base import Match, RulePass

from ._match import FusionRule, const_value, fresh_constant, producer, replace, split_const
from .matmul_scale import activation_product


def input_channel_vector(c: np.ndarray, channels: int) -> np.ndarray | None:
    """c as a per-input-channel vector of an NCHW activation, or None."""
    if c.size == 1:
        return np.full(channels, float(c.reshape(-1)[0]))
    if c.ndim >= 3 and c.shape[-3] == channels and c.size == channels:
        return c.reshape(-1).astype(np.float64)
    return None


def padded(conv: gs.Node) -> bool:
    auto = conv.attrs.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto not in ("NOTSET", "VALID"):
        return True
    return auto != "VALID" and any(conv.attrs.get("pads", []))


@dataclasses.dataclass(frozen=True)
class AffineConvMatch:
    """conv(h * a [+ b])"""

    conv: gs.Node
    mul: gs.Node
    add: gs.Node | None
    h: gs.Tensor
    a: gs.Tensor
    b: gs.Tensor | None
    outputs: tuple[gs.Tensor, ...]


class AffineIntoNextConv(FusionRule):
    name = "affine-into-conv"
    anchor_ops = ("Conv",)

    def match(self, graph, node):
        if node.domain or len(node.inputs) < 2:
            return None
        first = producer(node.inputs[0])
        add = b = None
        if first is not None and first.op == "Add":
            split = split_const(first)
            if split is None:
                return None
            add, b = first, split[1]
            first = producer(split[0])
        if first is None or first.op != "Mul" or split_const(first) is None:
            return None
        h, a = split_const(first)
        nodes = [n for n in (add, first) if n is not None] + [node]
        return Match(nodes, AffineConvMatch(node, first, add, h, a, b, (node.outputs[0],)))

    def _vectors(self, match: Match):
        conv = match.info.conv
        w = const_value(conv.inputs[1])
        channels = w.shape[1] * int(conv.attrs.get("group", 1))
        a = input_channel_vector(const_value(match.info.a), channels)
        b = None if match.info.b is None else input_channel_vector(const_value(match.info.b), channels)
        return w, a, b

    def preconditions(self, graph, match, ctx):
        conv = match.info.conv
        w = const_value(conv.inputs[1])
        if w is None or w.dtype.kind != "f" or (len(conv.inputs) > 2 and conv.inputs[2].name and const_value(conv.inputs[2]) is None):
            return "weights not constant floating point"
        if activation_product(match.info.h):
            return "the scale belongs to a GELU/HardSwish pattern (kept for the activation fusion)"
        for t in (match.info.a, match.info.b):
            c = const_value(t) if t is not None else None
            if t is not None and (c is None or c.dtype != w.dtype):
                return "affine constant not of the weights' type"
        _, a, b = self._vectors(match)
        if a is None or (match.info.b is not None and b is None):
            return "affine constant does not act per input channel"
        if b is not None and padded(conv) and np.any(a == 0):
            return "zero scale before a padded Conv (the shift b / a does not exist)"
        return None

    def rewrite(self, graph, match, ctx):
        conv = match.info.conv
        w, a, b = self._vectors(match)
        group = int(conv.attrs.get("group", 1))
        per_in = w.shape[1]
        scale = a.reshape(group, 1, per_in).repeat(w.shape[0] // group, axis=1).reshape(w.shape[0], per_in)
        w2 = w.astype(np.float64) * scale.reshape(*scale.shape, *([1] * (w.ndim - 2)))
        bias = const_value(conv.inputs[2]).astype(np.float64) if len(conv.inputs) > 2 and conv.inputs[2].name \
            else np.zeros(w.shape[0])
        x = match.info.h
        if b is not None and not padded(conv):
            per_tap = w.astype(np.float64).reshape(w.shape[0], per_in, -1).sum(axis=2)
            b_in = b.reshape(group, per_in).repeat(w.shape[0] // group, axis=0)
            bias = bias + (per_tap * b_in).sum(axis=1)
        elif b is not None:
            shift = fresh_constant(graph, f"{conv.name}_shift", (b / a).reshape(-1, 1, 1).astype(w.dtype))
            x = gs.Variable(f"{conv.name}_shifted_input", dtype=match.info.h.dtype)
            graph.nodes.append(gs.Node("Add", name=f"{conv.name}_shift_add", inputs=[match.info.h, shift], outputs=[x]))
        inputs = [x, fresh_constant(graph, f"{conv.name}_w", w2.astype(w.dtype)), fresh_constant(graph, f"{conv.name}_b", bias.astype(w.dtype))]
        replace(graph, match, "Conv", inputs, dict(conv.attrs), name=conv.name)


class FuseAffineIntoConv(RulePass):
    name = "fuse-affine-into-conv"
    description = "constant per-channel Mul [+ Add] before a Conv folded into its weights and bias"
    tolerance = (1e-4, 1e-5)
    rules = (AffineIntoNextConv,)


PASSES = (FuseAffineIntoConv,)
