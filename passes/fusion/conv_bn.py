"""BatchNormalization folded into the neighbouring linear op's weights.

Inference BatchNormalization is y = s * (x - mean) + beta with s = gamma / sqrt(var + eps),
per channel (axis 1). Hence:
  * Conv(x, W, b) -> BN:           W'[o] = W[o] * s[o],  b' = (b - mean) * s + beta
  * ConvTranspose(x, W, b) -> BN:  W is [C_in, C_out/group, k...]; output channel
                                   o = g * C_out/group + j scales W[g*C_in/group:(g+1)*.., j]
  * Gemm(A, B, C) -> BN (2-D):     B' = B * s (per output column), C' = s * (beta_g * C - mean) + beta,
                                   with Gemm's alpha kept and its beta folded into C'
  * MatMul(A, W) -> BN (2-D):      MatMul(A, W * s) + (beta - mean * s)
  * BN -> Conv (no padding):       Conv(s*x + t) = Conv_{W * s[in]}(x) + sum_{i,k} W[o,i,k] t[i]
                                   exact only without zero padding (a padded border would
                                   see 0, not t), so Conv pads must all be 0.
Preconditions: BN in inference mode with one output, all BN parameters and the
weights constant, the intermediate tensor read only by the pair, float weights.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.passes.base import Match, RulePass

from ._match import FusionRule, const_value, fresh_constant, producer, replace


def bn_scale_shift(bn: gs.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """(s, t) with BN(x) = s * x + t per channel, in float64; None when not constant."""
    values = [const_value(t) for t in bn.inputs[1:5]]
    if len(values) != 4 or any(v is None for v in values):
        return None
    gamma, beta, mean, var = (v.astype(np.float64).reshape(-1) for v in values)
    s = gamma / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
    return s, beta - mean * s


def _bn_reason(bn: gs.Node) -> str | None:
    if int(bn.attrs.get("training_mode", 0)) != 0 or sum(1 for o in bn.outputs if o.outputs) > 1:
        return "BatchNormalization in training mode"
    if bn_scale_shift(bn) is None:
        return "BatchNormalization parameters not constant"
    return None


@dataclasses.dataclass(frozen=True)
class LinearBnMatch:
    lin: gs.Node  # the Conv / Gemm / MatMul the BatchNormalization reads
    bn: gs.Node
    outputs: tuple[gs.Tensor, ...]


@dataclasses.dataclass(frozen=True)
class BnConvMatch:
    bn: gs.Node
    conv: gs.Node  # reads the BatchNormalization
    outputs: tuple[gs.Tensor, ...]


class _AfterLinear(FusionRule):
    """Shared matching of BN right after a linear op."""

    anchor_ops = ("BatchNormalization",)
    producers: tuple[str, ...] = ()

    def match(self, graph, node):
        prev = producer(node.inputs[0])
        if prev is None or prev.op not in self.producers or prev.domain:
            return None
        return Match([node, prev], LinearBnMatch(prev, node, (node.outputs[0],)))

    def preconditions(self, graph, match, ctx):
        reason = _bn_reason(match.info.bn)
        if reason:
            return reason
        lin = match.info.lin
        w = const_value(lin.inputs[1])
        if w is None or (len(lin.inputs) > 2 and lin.inputs[2].name and const_value(lin.inputs[2]) is None):
            return "weights not constant"
        if w.dtype.kind != "f":
            return "weights are not floating point"
        return self.shape_reason(match, w)

    def shape_reason(self, match: Match, w: np.ndarray) -> str | None:
        return None

    def bias(self, lin: gs.Node, channels: int, dtype) -> np.ndarray:
        if len(lin.inputs) > 2 and lin.inputs[2].name:
            return const_value(lin.inputs[2]).astype(np.float64)
        return np.zeros(channels, np.float64)


class ConvBatchNorm(_AfterLinear):
    name = "conv-bn"
    producers = ("Conv", "ConvTranspose")

    def shape_reason(self, match, w):
        s, _ = bn_scale_shift(match.info.bn)
        lin = match.info.lin
        out_channels = w.shape[0] if lin.op == "Conv" else w.shape[1] * int(lin.attrs.get("group", 1))
        return None if s.size == out_channels else "BN channels differ from the conv's output channels"

    def rewrite(self, graph, match, ctx):
        lin, bn = match.info.lin, match.info.bn
        w = const_value(lin.inputs[1])
        s, t = bn_scale_shift(bn)
        if lin.op == "Conv":
            w2 = w * s.reshape(-1, *([1] * (w.ndim - 1)))
        else:
            group = int(lin.attrs.get("group", 1))
            per = w.reshape(group, w.shape[0] // group, *w.shape[1:])
            w2 = (per * s.reshape(group, 1, w.shape[1], *([1] * (w.ndim - 2)))).reshape(w.shape)
        b2 = self.bias(lin, s.size, w.dtype) * s + t
        inputs = [lin.inputs[0], fresh_constant(graph, f"{lin.name}_bn_w", w2.astype(w.dtype)),
                  fresh_constant(graph, f"{lin.name}_bn_b", b2.astype(w.dtype))]
        replace(graph, match, lin.op, inputs, dict(lin.attrs), name=lin.name)


class GemmBatchNorm(_AfterLinear):
    """BN over axis 1 of a 2-D Gemm/MatMul output: fold into the weight columns and bias."""

    name = "gemm-bn"
    producers = ("Gemm", "MatMul")

    def shape_reason(self, match, w):
        lin = match.info.lin
        s, _ = bn_scale_shift(match.info.bn)
        if w.ndim != 2:
            return "weights are not 2-D"
        if lin.op == "MatMul" and (lin.inputs[0].shape is None or len(lin.inputs[0].shape) != 2):
            return "MatMul input is not known to be 2-D (BN's channel axis must be the output's last)"
        columns = w.shape[0] if lin.attrs.get("transB", 0) else w.shape[1]
        return None if s.size == columns else "BN channels differ from the output columns"

    def rewrite(self, graph, match, ctx):
        lin, bn = match.info.lin, match.info.bn
        w = const_value(lin.inputs[1])
        s, t = bn_scale_shift(bn)
        trans_b = int(lin.attrs.get("transB", 0))
        w2 = w * (s.reshape(-1, 1) if trans_b else s.reshape(1, -1))
        attrs = dict(lin.attrs) if lin.op == "Gemm" else {}
        c = self.bias(lin, s.size, w.dtype) * float(attrs.get("beta", 1.0))
        c = np.broadcast_to(c, s.shape) if c.ndim <= 1 else c
        c2 = c * s + t  # alpha stays on A*B', beta is folded into C' (beta' = 1)
        attrs["beta"] = 1.0
        inputs = [lin.inputs[0], fresh_constant(graph, f"{lin.name}_bn_w", w2.astype(w.dtype)),
                  fresh_constant(graph, f"{lin.name}_bn_b", c2.astype(w.dtype))]
        replace(graph, match, "Gemm", inputs, attrs, name=lin.name)


class BatchNormConv(FusionRule):
    """A standalone BN followed by an unpadded Conv: fold into the Conv's input side."""

    name = "bn-conv"
    anchor_ops = ("Conv",)

    def match(self, graph, node):
        bn = producer(node.inputs[0])
        if bn is None or bn.op != "BatchNormalization" or bn.domain:
            return None
        return Match([node, bn], BnConvMatch(bn, node, (node.outputs[0],)))

    def preconditions(self, graph, match, ctx):
        bn, conv = match.info.bn, match.info.conv
        reason = _bn_reason(bn)
        if reason:
            return reason
        if const_value(conv.inputs[1]) is None:
            return "weights not constant"
        if any(int(p) for p in conv.attrs.get("pads", ())) or conv.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return "conv pads its input: folding the BN shift is not exact at the borders"
        w = const_value(conv.inputs[1])
        if bn_scale_shift(bn)[0].size != w.shape[1] * int(conv.attrs.get("group", 1)):
            return "BN channels differ from the conv's input channels"
        return None

    def rewrite(self, graph, match, ctx):
        bn, conv = match.info.bn, match.info.conv
        w = const_value(conv.inputs[1]).astype(np.float64)
        s, t = bn_scale_shift(bn)
        group, cin = int(conv.attrs.get("group", 1)), w.shape[1]
        out_per_group = w.shape[0] // group
        s_in = np.stack([s[(o // out_per_group) * cin:(o // out_per_group + 1) * cin] for o in range(w.shape[0])])
        t_in = np.stack([t[(o // out_per_group) * cin:(o // out_per_group + 1) * cin] for o in range(w.shape[0])])
        spatial = (1,) * (w.ndim - 2)
        w2 = w * s_in.reshape(*s_in.shape, *spatial)
        b = const_value(conv.inputs[2]).astype(np.float64) if len(conv.inputs) > 2 and conv.inputs[2].name else 0.0
        b2 = b + (w * t_in.reshape(*t_in.shape, *spatial)).reshape(w.shape[0], -1).sum(axis=1)
        dtype = const_value(conv.inputs[1]).dtype
        inputs = [bn.inputs[0], fresh_constant(graph, f"{conv.name}_bn_w", w2.astype(dtype)),
                  fresh_constant(graph, f"{conv.name}_bn_b", np.asarray(b2).astype(dtype))]
        replace(graph, match, "Conv", inputs, dict(conv.attrs), name=conv.name)


class FuseConvBn(RulePass):
    name = "fuse-conv-bn"
    description = "BatchNormalization folded into the Conv/ConvTranspose/Gemm/MatMul before it or the unpadded Conv after it"
    # Refolding weights rounds W*s once in float32 instead of rounding at every op.
    tolerance = (1e-4, 1e-5)
    rules = (ConvBatchNorm, GemmBatchNorm, BatchNormConv)


PASSES = (FuseConvBn,)
