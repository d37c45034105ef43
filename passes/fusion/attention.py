"""Self-attention blocks -> com.microsoft MultiHeadAttention / GroupQueryAttention.

Identity: for Q4, K4, V4 the heads of q3, k3, v3 ([B, S, N*D] -> [B, N, S, D]),

    Reshape(Transpose(Softmax(s * Q4 K4^T + M) V4)) == MultiHeadAttention(q3, k3, v3,
                                                      attention_bias=M', num_heads=N, scale=s)

where M' = Expand(M, [1, 1, S, T]) is the same additive mask with its query axis
spelled out (the op wants (B|1, N|1, S, T)); the mask keeps its exact meaning, so
left-padded and holey masks behave as in the original model. Scalar factors on
q3, Q4, K4^T and the scores are all folded into ``s`` (floating-point
reassociation only). When q3, k3, v3 are ``MatMul(x, W) + b`` with constant
vectors b, the Adds go into MHA's ``bias`` input (the op adds them itself).

Preconditions checked by every rule: softmax over the last axis; every scale
factor a constant scalar; N and D readable from the head-split Reshape constants
(N = hidden / D when the constant is -1); the split keeps batch and sequence; the
final Reshape merges heads back to [B, S, N*D]; no intermediate tensor is used
outside the block (else fusing would duplicate work); and for the dynamo form,
the NaN guard ``Where(IsNaN(P), 0, P)`` is dropped only when the mask is a Where
of two finite constants (a row then never becomes all -inf, so P has no NaN for
finite inputs).

Which exporter form each pass owns:
  * ``fuse-attention``: TorchScript BERT / DistilBERT / ViT / Whisper: separate
    Q/K/V projections, K transposed by perm (0,2,3,1) or (0,1,3,2).
  * ``fuse-causal-attention``: GPT-2: Q/K/V split from one packed projection,
    causal (+padding) mask added to the scores.
  * ``fuse-sdpa``: the dynamo exporter's decomposed scaled_dot_product_attention:
    sqrt(scale) on Q and K, K transposed through Reshape/Transpose/Reshape, NaN guard.
  * ``fuse-gqa-rotary`` (attention_gqa.py, attention_gqa_cache.py): Llama, without and with a KV cache.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.context import PassContext, Refusal
from onnxforge.passes.base import Match, Rule, RulePass

from ._match import MS_DOMAIN, const_value, either_order, escaping, is_const, producer
from .attention_match import (
    Core,
    HeadSplit,
    ScaleFactor,
    head_split,
    last_dim,
    match_core,
    merges_heads,
    peel_scales,
    scale_value,
)


# ------------------------------------------------------------------ shared checks

def softmax_is_last_axis(graph: gs.Graph, softmax: gs.Node) -> bool:
    default = -1 if (graph.opset or 13) >= 13 else 1
    return int(softmax.attrs.get("axis", default)) in (-1, 3)


def mask_is_finite(bias: gs.Tensor | None) -> bool:
    """The additive mask is ``Where(c, a, b)`` of two finite constants (the HF/dynamo mask)."""
    if bias is None:
        return True
    where = producer(bias, "Where")
    if where is None:
        return False
    values = [const_value(t) for t in where.inputs[1:]]
    return all(v is not None and v.size == 1 and np.isfinite(v).all() for v in values)


def peeled_projection(split: HeadSplit) -> tuple[gs.Tensor, list]:
    """The projection output under scalar constant factors (folded into the scale)."""
    base, factors = peel_scales(split.x3)
    if factors and scale_value(factors) is not None and all(is_scalar_constant(f.factor) for f in factors):
        return base, factors
    return split.x3, []


def is_scalar_constant(tensor: gs.Tensor) -> bool:
    value = const_value(tensor)
    return value is not None and value.size == 1


# ------------------------------------------------------------------ rule base

@dataclasses.dataclass(frozen=True)
class AttentionMatch:
    """The block around a Softmax: its core, the Q/K/V head splits, the Q and K projection
    outputs under scalar factors (``q3``, ``k3``) and those factors (folded into the scale)."""

    core: Core
    q: HeadSplit
    k: HeadSplit
    v: HeadSplit
    q3: gs.Tensor
    k3: gs.Tensor
    proj_factors: tuple[ScaleFactor, ...]


class BlockRule(Rule):
    """A rule anchored on the Softmax of an attention block."""

    anchor_ops = ("Softmax",)

    def refusal(self, reason: str, match: Match) -> Refusal:
        # The softmax and the two attention MatMuls locate the block; the full list is noise.
        return Refusal(self.name, reason, match.names[:3])

    def leak_refusal(self, graph: gs.Graph, match: Match, core: Core) -> Refusal | None:
        """Refuse when a block node other than the head merge feeds something outside the
        block or makes one of the block's outputs (the fused op replaces them all)."""
        # Shape readers don't count: they keep their producer alive, the fused op is still exact.
        leaked = [node.name for node, _ in escaping(graph, match.nodes, keep_nodes=(core.merge_reshape,),
                                                    ignore_readers=("Shape",))]
        if leaked:
            return Refusal(self.name, "intermediate result used outside the attention block",
                           match.names[:1] + tuple(dict.fromkeys(leaked)))
        return None


class AttentionRule(BlockRule):
    """Matches the block around a Softmax; subclasses say which exporter form they own."""

    def owns(self, core: Core, q: HeadSplit, k: HeadSplit, v: HeadSplit) -> bool:  # pragma: no cover
        raise NotImplementedError

    def match(self, graph: gs.Graph, node: gs.Node) -> Match | None:
        core = match_core(node)
        if core is None:
            return None
        q = head_split(core.q4, (0, 2, 1, 3))
        k = core.key.split or head_split(core.key.k4, (0, 2, 1, 3))
        v = head_split(core.v4, (0, 2, 1, 3))
        if q is None or k is None or v is None or not self.owns(core, q, k, v):
            return None
        nodes = core.nodes + [n for s in (q, k, v) for n in s.nodes]
        nodes = list({id(n): n for n in nodes}.values())
        q3, q_factors = peeled_projection(q)
        k3, k_factors = peeled_projection(k)
        return Match([node] + [n for n in nodes if n is not node],
                     AttentionMatch(core, q, k, v, q3, k3, tuple(q_factors + k_factors)))

    def check(self, graph: gs.Graph, match: Match, ctx: PassContext) -> Refusal | None:
        core: Core = match.info.core
        q, k, v = match.info.q, match.info.k, match.info.v
        if not softmax_is_last_axis(graph, core.softmax):
            return self.refusal("softmax axis not last", match)
        if scale_value(core.factors) is None or any(not is_scalar_constant(f.factor) for f in core.factors):
            return self.refusal("scale not constant", match)
        heads, head_size = q.num_heads(), q.head_size
        if heads is None or head_size is None:
            return self.refusal("num_heads not derivable from reshape constant", match)
        if (k.num_heads(), k.head_size) != (heads, head_size):
            return self.refusal(f"key heads {k.num_heads()}x{k.head_size} differ from query "
                                f"heads {heads}x{head_size}", match)
        if v.num_heads() != heads or v.head_size is None:
            return self.refusal("value heads differ from query heads", match)
        if not all(s.keeps_batch_and_sequence() for s in (q, k, v)):
            return self.refusal("head-split reshape does not keep batch and sequence", match)
        if not merges_heads(core, heads, v.head_size):
            return self.refusal("output reshape does not merge heads to [B, S, N*D]", match)
        if core.nan_guard and not mask_is_finite(core.bias):
            return self.refusal("NaN guard kept: mask is not a Where of finite constants", match)
        if any(n.op == "Cast" and int(n.attrs.get("to", 1)) != 1 for n in core.between):
            return self.refusal("cast after softmax changes precision", match)
        if core.bias is not None and core.bias.shape and len(core.bias.shape) == 4 \
                and core.bias.shape[1] not in (1, heads) and isinstance(core.bias.shape[1], int):
            return self.refusal("mask not broadcast over heads", match)
        return self.leak_refusal(graph, match, core)

    def rewrite(self, graph: gs.Graph, match: Match, ctx: PassContext) -> None:
        core: Core = match.info.core
        q, v = match.info.q, match.info.v
        scale = scale_value(core.factors + list(match.info.proj_factors))
        heads = q.num_heads()
        q3, k3, v3 = match.info.q3, match.info.k3, v.x3
        prefix = core.softmax.name or core.output.name
        projections = [projection_bias(t) for t in (q3, k3, v3)]
        # The mask's sizes read the bias-free products where there are some: MatMul(x, W) + b has
        # the shape of MatMul(x, W), and a Shape of the sum would keep the Add alive for its shape only.
        sized = [p[0] if p is not None else t for p, t in zip(projections[:2], (q3, k3))]
        mask = expanded_mask(graph, core.bias, *sized, prefix) if core.bias is not None else None
        packed_bias = None
        if None not in projections and any(b is not None for _, b in projections):
            # MHA adds the Q/K/V projection biases itself: three Adds fewer per layer.
            q3, k3, v3 = (t for t, _ in projections)
            sizes = [last_dim(t) for t in (q3, k3, v3)]
            values = [b if b is not None else np.zeros(n, np.float32) for (_, b), n in zip(projections, sizes)]
            packed_bias = gs.Constant(f"{prefix}/qkv_bias", np.concatenate(values).astype(np.float32))
        emit_mha(graph, prefix, q3, k3, v3, mask, core.output, heads, scale, packed_bias)
        core.merge_reshape.outputs.clear()
        if ctx.model is not None:
            ctx.model.ensure_domain(MS_DOMAIN, 1)


def projection_bias(tensor: gs.Tensor) -> tuple[gs.Tensor, np.ndarray | None] | None:
    """(MatMul output, bias) for ``MatMul(x, W) + b`` with a constant float32 vector b;
    (tensor, None) for a bare MatMul with constant 2-D weights; None otherwise."""
    add = producer(tensor, "Add")
    if add is None:
        matmul = producer(tensor, "MatMul")
        ok = matmul is not None and is_const(matmul.inputs[1]) and last_dim(tensor) is not None
        return (tensor, None) if ok else None
    for main, other in either_order(add):
        matmul = producer(main, "MatMul")
        if matmul is None or not is_const(other) or len(main.outputs) != 1:
            continue
        values = const_value(other)
        size = last_dim(main)
        if values is not None and values.dtype == np.float32 and values.ndim == 1 and values.size == size:
            return main, values
    return None


def expanded_mask(graph: gs.Graph, mask: gs.Tensor, q3: gs.Tensor, k3: gs.Tensor, prefix: str) -> gs.Tensor:
    """Expand(mask, [1, 1, S, T]): the additive mask with query and key axes spelled out."""
    ones = gs.Constant(f"{prefix}/mask_ones", np.ones(2, dtype=np.int64))
    index = gs.Constant(f"{prefix}/mask_seq_axis", np.array([1], dtype=np.int64))
    dims = []
    for label, tensor in (("q", q3), ("k", k3)):
        shape = gs.Variable(f"{prefix}/{label}_shape", dtype=np.int64)
        length = gs.Variable(f"{prefix}/{label}_len", dtype=np.int64)
        graph.nodes.append(gs.Node("Shape", f"{prefix}/{label}_Shape", inputs=[tensor], outputs=[shape]))
        graph.nodes.append(gs.Node("Gather", f"{prefix}/{label}_Gather", attrs={"axis": 0},
                                   inputs=[shape, index], outputs=[length]))
        dims.append(length)
    target = gs.Variable(f"{prefix}/mask_shape", dtype=np.int64)
    graph.nodes.append(gs.Node("Concat", f"{prefix}/mask_Concat", attrs={"axis": 0},
                               inputs=[ones] + dims, outputs=[target]))
    out = gs.Variable(f"{prefix}/attention_bias", dtype=mask.dtype)
    graph.nodes.append(gs.Node("Expand", f"{prefix}/mask_Expand", inputs=[mask, target], outputs=[out]))
    return out


def emit_mha(graph: gs.Graph, prefix: str, q3, k3, v3, mask, output, heads: int, scale: float,
             qkv_bias: gs.Constant | None = None) -> gs.Node:
    inputs = [q3, k3, v3]
    if qkv_bias is not None or mask is not None:
        inputs.append(qkv_bias if qkv_bias is not None else gs.Variable.empty())
    if mask is not None:
        inputs += [gs.Variable.empty(), mask]
    node = gs.Node("MultiHeadAttention", f"{prefix}/MultiHeadAttention", domain=MS_DOMAIN,
                   attrs={"num_heads": int(heads), "scale": float(scale)}, inputs=inputs, outputs=[output])
    graph.nodes.append(node)
    return node


def _from_split(x3: gs.Tensor) -> bool:
    return producer(x3, "Split") is not None


class BertAttention(AttentionRule):
    """TorchScript BERT/DistilBERT/ViT/Whisper: separate Q, K, V projections."""

    name = "bert-attention"

    def owns(self, core, q, k, v) -> bool:
        return core.key.form in ("direct", "swap") and not core.nan_guard \
            and not any(_from_split(s.x3) for s in (q, k, v))


class CausalAttention(AttentionRule):
    """GPT-2: Q, K, V split from one packed (Conv1D) projection; causal mask added to the scores."""

    name = "causal-attention"

    def owns(self, core, q, k, v) -> bool:
        return core.key.form in ("direct", "swap") and not core.nan_guard \
            and all(_from_split(s.x3) for s in (q, k, v))


class SdpaAttention(AttentionRule):
    """dynamo's decomposed scaled_dot_product_attention (sqrt-scale on Q and K, NaN guard)."""

    name = "sdpa-attention"

    def owns(self, core, q, k, v) -> bool:
        return core.key.form == "reshape" or core.nan_guard


class FuseAttention(RulePass):
    name = "fuse-attention"
    description = "BERT-like self-attention (TorchScript) -> com.microsoft MultiHeadAttention"
    tolerance = (1e-4, 1e-5)
    rules = (BertAttention,)


class FuseCausalAttention(RulePass):
    name = "fuse-causal-attention"
    description = "GPT-2 self-attention with packed QKV projection and causal mask -> MultiHeadAttention"
    tolerance = (1e-4, 1e-5)
    rules = (CausalAttention,)


class FuseSdpa(RulePass):
    name = "fuse-sdpa"
    description = "dynamo-exported scaled_dot_product_attention -> MultiHeadAttention"
    tolerance = (1e-4, 1e-5)
    rules = (SdpaAttention,)


PASSES = (FuseAttention, FuseCausalAttention, FuseSdpa)
