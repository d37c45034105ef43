"""Residual Add + norm -> onnxruntime's Skip op (fuse-skip-layernorm).

    LayerNormalization(a + b [+ bias]) = com.microsoft SkipLayerNormalization(a, b, gamma, beta, bias)
    SimplifiedLayerNormalization(a + b) = com.microsoft SkipSimplifiedLayerNormalization(a, b, gamma)
the sum a + b, when read elsewhere, is the fused op's 4th output.

Preconditions: the two summands have the same, known shape of rank 3 (what onnxruntime
accepts); the norm is over the last axis in float32 with constant scale/bias; a bias is a
constant vector over the hidden axis read only by the sum; a Cast between the sum and the
norm is a no-op (TorchScript's Llama casts the sum to float).

Pass order: fuse-skip-layernorm must run before the attention fusions. It proves the
summands' shapes by onnx shape inference, which cannot see through MultiHeadAttention /
Attention: run after them it refuses every layer (minilm_l6_real: 0 of 12). The
provider FUSIONS tuples keep norms and activations first (tested).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.passes.base import Match, RulePass

from ._match import (
    MS_DOMAIN,
    FusionRule,
    ShapeOracle,
    const_value,
    either_order,
    fresh_constant,
    is_const,
    is_graph_output,
    need_ms_domain,
    producer_op,
    replace,
    split_const,
)


@dataclasses.dataclass(frozen=True)
class SkipMatch:
    """residual a + b (+ bias) -> [Cast] -> norm; ``total`` is the sum the norm reads, also an
    output of the fused op when read elsewhere (``keep_sum``)."""

    a: gs.Tensor
    b: gs.Tensor
    bias: gs.Tensor | None
    cast: gs.Node | None
    total: gs.Tensor
    keep_sum: bool


class SkipLayerNorm(FusionRule):
    """(a + b [+ bias]) -> LayerNormalization / SimplifiedLayerNormalization  ->  Skip* op."""

    name = "skip-layernorm"
    anchor_ops = ("LayerNormalization", "SimplifiedLayerNormalization")

    def __init__(self):
        self._shapes: ShapeOracle | None = None  # inferred once per run, on first need

    def match(self, graph, node):
        if node.domain or any(o.outputs or is_graph_output(graph, o) for o in node.outputs[1:]):
            return None
        cast = producer_op(node.inputs[0], "Cast")  # TorchScript's Llama casts the sum to float
        add = producer_op(cast.inputs[0] if cast is not None else node.inputs[0], "Add")
        if add is None or any(is_const(t) for t in add.inputs):
            return None
        a, b = add.inputs
        nodes, bias = [node, add] + ([cast] if cast is not None else []), None
        for side, other in either_order(add):
            bias_add = producer_op(side, "Add")
            if bias_add is not None and len(side.outputs) == 1 and split_const(bias_add) is not None:
                value = const_value(split_const(bias_add)[1])
                if value is not None and value.ndim == 1:
                    a, b, bias = split_const(bias_add)[0], other, split_const(bias_add)[1]
                    nodes.append(bias_add)
                    break
        total = cast.outputs[0] if cast is not None else add.outputs[0]  # a Cast to check: a no-op's output is the sum
        keep_sum = len(total.outputs) > 1 or is_graph_output(graph, total)
        return Match(nodes, SkipMatch(a, b, bias, cast, total, keep_sum))

    def check(self, graph, match, ctx):
        node, add, info = match.nodes[0], match.nodes[1], match.info
        if self._shapes is None:
            self._shapes = ShapeOracle(graph, ctx)
        if info.cast is not None:
            if self._shapes.dtype(add.outputs[0]) != int(info.cast.attrs["to"]):
                return self.refusal("a Cast between the residual sum and the norm changes the type", match)
            if add.outputs[0].outputs != [info.cast] or is_graph_output(graph, add.outputs[0]):
                return self.refusal("the residual sum is read both before and after its Cast", match)
        bias_add = next((n for n in match.nodes[2:] if n.op == "Add"), None)
        if bias_add is not None and bias_add.outputs[0].outputs != [add]:
            return self.refusal(f"bias output {match.nodes[2].outputs[0].name} has other consumers", match)
        if int(node.attrs.get("axis", -1)) not in (-1, 2) or int(node.attrs.get("stash_type", 1)) != 1:
            return self.refusal("norm is not over the last axis of a 3-D input", match)
        if len(node.inputs) < 2 or not all(is_const(t) for t in node.inputs[1:] if t.name):
            return self.refusal("norm scale/bias not constant", match)
        sa = self._shapes.shape(info.a)
        if not (self._shapes.same(info.a, info.b) and len(sa) == 3):
            return self.refusal(f"residual inputs do not surely have the same 3-D shape ({sa} vs "
                                f"{self._shapes.shape(info.b)})", match)
        if info.bias is not None and const_value(info.bias).shape[0] != sa[-1]:
            return self.refusal("bias is not over the hidden axis", match)
        return None

    def rewrite(self, graph, match, ctx):
        need_ms_domain(ctx)
        node, info = match.nodes[0], match.info
        simplified = node.op == "SimplifiedLayerNormalization"
        params = [t for t in node.inputs[1:] if t.name]
        if simplified:
            op, params = "SkipSimplifiedLayerNormalization", params[:1]
        else:
            op = "SkipLayerNormalization"
            if len(params) == 1:
                gamma = const_value(params[0])
                params.append(fresh_constant(graph, f"{node.name}_zero_bias", np.zeros_like(gamma)))
        inputs = [info.a, info.b, *params]
        if info.bias is not None:
            bias = info.bias
            inputs.append(bias if isinstance(bias, gs.Constant) else fresh_constant(graph, f"{node.name}_bias",
                                                                                 const_value(bias)))
        outputs = [node.outputs[0]]
        if info.keep_sum:
            outputs += [gs.Variable.empty(), gs.Variable.empty(), info.total]
        eps = float(node.attrs.get("epsilon", 1e-5))
        replace(graph, match, op, inputs, {"epsilon": eps}, domain=MS_DOMAIN, outputs=outputs)


class FuseSkipLayerNorm(RulePass):
    name = "fuse-skip-layernorm"
    description = "residual Add + (Simplified)LayerNormalization -> com.microsoft Skip(Simplified)LayerNormalization"
    # The fused kernel adds and normalises in one sweep with its own accumulation order.
    tolerance = (1e-4, 1e-5)
    rules = (SkipLayerNorm,)


PASSES = (FuseSkipLayerNorm,)
