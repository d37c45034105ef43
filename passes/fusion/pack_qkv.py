"""Self-attention's three projections packed into onnxruntime's Attention (pack-qkv).

With q = x Wq + bq, k = x Wk + bk, v = x Wv + bv (one input x, bias terms optional)
and MultiHeadAttention's own packed bias c = [cq | ck | cv] (optional, zero when absent):

    MultiHeadAttention(q, k, v, c [, attention_bias], num_heads=N, scale=s)
  = com.microsoft Attention(x, W, b [, attention_bias at input 5], num_heads=N, scale=s)
    with W = [Wq | Wk | Wv] (columns concatenated) and b = [bq + cq | bk + ck | bv + cv]

Attention computes the one [D, 3H] product and splits it into Q, K, V itself: the same
sums, so only floating-point reassociation of the bias terms differs. It is the other
packed form onnxruntime offers for self-attention (benchmarks/fusion_transformers.py
--packing-check times it against MultiHeadAttention); it is in no -O level.

Preconditions: the provider runs onnxruntime's contrib ops (cpu, cuda); Q, K, V are
MatMul [+ Add] of one input with constant float32 2-D weights of one width and constant
bias vectors over that width; MHA's own bias, when given, a constant vector of 3 x width;
no key padding mask (Attention's mask_index reads masks differently) and no KV cache
(past inputs, or present / QK outputs that are read); the projections are read by this
MHA only, or only for their shape (a Shape reading one, as fuse-attention's mask sizes read
Shape(x Wq), Shape(x Wk), or reading one plus a constant vector that only Shapes read) when the
weights are square: the projection then has its input's shape, and those Shapes read x instead.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.passes.base import Match, RulePass

from ._match import (
    MS_DOMAIN,
    FusionRule,
    const_value,
    either_order,
    fresh_constant,
    is_graph_output,
    need_ms_domain,
    other_input,
    producer_op,
    replace,
)

# MultiHeadAttention's inputs by position (onnxruntime contrib op).
MHA_BIAS, MHA_KEY_PADDING_MASK, MHA_ATTENTION_BIAS = 3, 4, 5
# The attributes both ops take with one meaning.
SHARED_ATTRS = ("num_heads", "scale", "mask_filter_value", "unidirectional")


@dataclasses.dataclass(frozen=True)
class Projection:
    """x W [+ b]: ``bias`` the Add's other operand (None without an Add)."""

    x: gs.Tensor
    weight: gs.Tensor
    bias: gs.Tensor | None
    nodes: tuple[gs.Node, ...]


@dataclasses.dataclass(frozen=True)
class PackMatch:
    projections: tuple[Projection, Projection, Projection]  # query, key, value
    shape_reads: tuple[gs.Node, ...]  # Shape nodes reading only a projection's shape
    shape_adds: tuple[gs.Node, ...]  # the constant-vector Adds between those and the projection
    outputs: tuple[gs.Tensor, ...]  # all of MHA's (the present / QK ones are checked unread)


@dataclasses.dataclass(frozen=True)
class PackPlan:
    weight: np.ndarray  # [D, 3H]
    bias: np.ndarray  # [3H]


def projection(tensor: gs.Tensor) -> Projection | None:
    """MatMul(x, W) or MatMul(x, W) + b (either operand order), by structure only."""
    add = producer_op(tensor, "Add")
    if add is not None:
        for main, other in either_order(add):
            matmul = producer_op(main, "MatMul")
            if matmul is not None:
                return Projection(matmul.inputs[0], matmul.inputs[1], other, (add, matmul))
        return None
    matmul = producer_op(tensor, "MatMul")
    return Projection(matmul.inputs[0], matmul.inputs[1], None, (matmul,)) if matmul is not None else None


def shape_reads(projections: list[Projection]) -> tuple[tuple[gs.Node, ...], tuple[gs.Node, ...]]:
    """(Shape nodes, Adds) that read only the shape of a projection's tensors: a Shape reading one,
    or Shapes reading ``t + c`` (c a constant of rank <= 1: the shape stays t's) that only Shapes read."""
    inside = {id(n) for p in projections for n in p.nodes}
    shapes: dict[int, gs.Node] = {}
    adds: dict[int, gs.Node] = {}
    for t in (t for p in projections for n in p.nodes for t in n.outputs):
        for reader in t.outputs:
            if id(reader) in inside or reader.domain:
                continue
            if reader.op == "Shape":
                shapes[id(reader)] = reader
            elif reader.op == "Add" and _vector_addend(reader, t):
                readers = reader.outputs[0].outputs
                if readers and all(r.op == "Shape" and not r.domain for r in readers):
                    adds[id(reader)] = reader
                    shapes.update((id(r), r) for r in readers)
    return tuple(shapes.values()), tuple(adds.values())


def _vector_addend(add: gs.Node, tensor: gs.Tensor) -> bool:
    value = const_value(other_input(add, tensor))  # an initializer, or a Constant / Identity of one
    return value is not None and value.ndim <= 1 and len(add.outputs) == 1


def _given(node: gs.Node, index: int) -> bool:
    return len(node.inputs) > index and bool(node.inputs[index].name)


class PackQkvAttention(FusionRule):
    """MultiHeadAttention over three projections of one input -> Attention with packed weights."""

    name = "pack-qkv-attention"
    anchor_ops = ("MultiHeadAttention",)

    def match(self, graph, node):
        if node.domain != MS_DOMAIN or len(node.inputs) < 3:
            return None
        found = [projection(t) for t in node.inputs[:3]]
        if None in found:
            return None
        inner = list({id(n): n for p in found for n in p.nodes}.values())
        shapes, adds = shape_reads(found)
        return Match([node, *inner], PackMatch(tuple(found), shapes, adds, tuple(node.outputs)))

    def check(self, graph, match, ctx):
        # As FusionRule.check, except the readers of shapes only: preconditions decide on those.
        info = match.info
        allowed = {id(n) for n in (*match.nodes, *info.shape_reads, *info.shape_adds)}
        for tensor in (t for n in match.nodes[1:] for t in n.outputs):
            if is_graph_output(graph, tensor) or any(id(r) not in allowed for r in tensor.outputs):
                return self.refusal(f"intermediate tensor {tensor.name} has other consumers", match)
        verdict = self.preconditions(graph, match, ctx)
        return self.refusal(verdict, match) if isinstance(verdict, str) else verdict

    def preconditions(self, graph, match, ctx):
        node, (q, k, v) = match.nodes[0], match.info.projections
        if ctx.provider not in ("cpu", "cuda"):
            return f"Attention is an onnxruntime op (provider {ctx.provider})"
        if not (q.x is k.x is v.x):
            return "query, key and value are not projections of one input"
        weights = [const_value(p.weight) for p in (q, k, v)]
        if any(w is None or w.ndim != 2 or w.dtype != np.float32 for w in weights):
            return "a projection weight is not a constant float32 2-D matrix"
        width = weights[0].shape[1]
        if any(w.shape != weights[0].shape for w in weights):
            return "the query, key and value projections differ in shape"
        if match.info.shape_reads and weights[0].shape[0] != width:
            return "a Shape reads a projection whose width differs from its input's"
        biases = [np.zeros(width, np.float32) if p.bias is None else const_value(p.bias) for p in (q, k, v)]
        if any(b is None or b.shape != (width,) or b.dtype != np.float32 for b in biases):
            return "a projection bias is not a constant float32 vector over its output"
        bias = np.concatenate(biases)
        if _given(node, MHA_BIAS):
            own = const_value(node.inputs[MHA_BIAS])
            if own is None or own.shape != bias.shape or own.dtype != np.float32:
                return "MultiHeadAttention's bias is not a constant float32 vector of 3 x the projection width"
            bias = bias + own
        if _given(node, MHA_KEY_PADDING_MASK):
            return "a key padding mask (Attention's mask_index reads masks differently)"
        if any(_given(node, i) for i in range(MHA_ATTENTION_BIAS + 1, len(node.inputs))):
            return "a past key/value input (KV cache)"
        if any(o.outputs or is_graph_output(graph, o) for o in node.outputs[1:]):
            return "MultiHeadAttention's present key/value or QK output is read (Attention has no such outputs)"
        return PackPlan(np.concatenate(weights, axis=1), bias)

    def rewrite(self, graph, match, ctx):
        need_ms_domain(ctx)
        node, plan = match.nodes[0], match.plan
        prefix = node.name or node.outputs[0].name
        inputs = [match.info.projections[0].x, fresh_constant(graph, f"{prefix}/qkv_weight", plan.weight),
                  fresh_constant(graph, f"{prefix}/qkv_bias", plan.bias)]
        if _given(node, MHA_ATTENTION_BIAS):
            inputs += [gs.Variable.empty(), gs.Variable.empty(), node.inputs[MHA_ATTENTION_BIAS]]
        for reader in match.info.shape_reads:  # square weights: the projection has x's shape
            reader.inputs[0] = match.info.projections[0].x
        attrs = {key: node.attrs[key] for key in SHARED_ATTRS if key in node.attrs}
        replace(graph, match, "Attention", inputs, attrs, domain=MS_DOMAIN, outputs=[node.outputs[0]],
                name=f"{prefix}/Attention")


class PackQkv(RulePass):
    name = "pack-qkv"
    description = ("MultiHeadAttention over Q/K/V projections of one input -> com.microsoft Attention with "
                   "packed weights (the other packed form; in no -O level)")
    # One [D, 3H] product instead of three, the bias terms summed in another order.
    tolerance = (1e-4, 1e-5)
    rules = (PackQkvAttention,)


PASSES = (PackQkv,)
