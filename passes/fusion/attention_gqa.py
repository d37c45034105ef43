"""Llama self-attention -> com.microsoft RotaryEmbedding + GroupQueryAttention.

Identities (x4 = heads of x3 in BNSH, h = D/2, cos/sin of shape [B|1, S, D]):

  rotate_half:  x4 * cos + Concat(-x4[..., h:], x4[..., :h]) * sin
                == heads of RotaryEmbedding(x3, pos, cos_cache, sin_cache)
  when cos[..., :h] == cos[..., h:] (true when cos = f(Concat(a, a)) elementwise),
  with cos_cache = Reshape(Expand(cos, [B, 1, 1])[..., :h], [B*S, h]) and
  pos[b, s] = b*S + s: row b*S + s of the cache is the model's own cos for that
  batch row and position, whatever positions the model used.

  repeat_kv:    Reshape(Expand(Unsqueeze(k4, 2), [B, Nkv, r, T, D]), [B, Nkv*r, T, D])
                gives query head n the kv head n // r, exactly GroupQueryAttention's grouping.

  GroupQueryAttention(q, k, v, seqlens_k = T-1, total_sequence_length = T,
                      attention_bias = Expand(M, [1, 1, S, T]), causal=0)
                == Softmax(scale * Q K^T + M) V  (no KV cache; the mask, causal and
  padding, is the model's own additive mask, so left padding and holes keep their meaning).

Preconditions (checked): those of ``attention.py``; on CUDA a float16/bfloat16
model (the CUDA kernel has no float32 path); rotate_half slice bounds
evaluate to D/2 and D; cos and sin have equal halves; the repeat Expand has r =
N / Nkv at axis 2 and keeps the other axes; the merge Reshape keeps B, T and D.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.context import PassContext, Refusal
from onnxforge.passes.base import Match

from ._match import MS_DOMAIN
from .attention import (
    BlockRule,
    is_scalar_constant,
    expanded_mask,
    mask_is_finite,
    softmax_is_last_axis,
)
from .attention_match import Core, HeadSplit, head_split, match_core, merges_heads, scale_value
from .llama_match import (
    Repeat,
    Rotary,
    halves_equal,
    match_repeat,
    match_rotary,
    projection_dtype,
    repeat_is_exact,
    slices_halves,
)


# ------------------------------------------------------------------ the rule

def head_layout_problem(core: Core, q: HeadSplit, k: HeadSplit, v: HeadSplit, rotaries) -> str | None:
    """Why the heads and rotations of a matched Llama block do not fit GroupQueryAttention +
    RotaryEmbedding (None when they do): shared by the rules with and without a KV cache."""
    if scale_value(core.factors) is None or any(not is_scalar_constant(f.factor) for f in core.factors):
        return "scale not constant"
    heads, kv_heads, head_size = q.num_heads(), k.num_heads(), q.head_size
    if heads is None or kv_heads is None or head_size is None:
        return "num_heads not derivable from reshape constant"
    if k.head_size != head_size or v.head_size != head_size or v.num_heads() != kv_heads:
        return "key/value head shapes differ"
    if heads % kv_heads:
        return f"{heads} query heads not a multiple of {kv_heads} kv heads"
    if not all(s.keeps_batch_and_sequence() for s in (q, k, v)):
        return "head-split reshape does not keep batch and sequence"
    if not merges_heads(core, heads, head_size):
        return "output reshape does not merge heads to [B, S, N*D]"
    for rotary in rotaries:
        if not slices_halves(rotary, head_size):
            return "rotate_half slices are not [0, D/2) and [D/2, D)"
        if not (halves_equal(rotary.cos) and halves_equal(rotary.sin)):
            return "cos/sin halves not provably equal (interleaved or partial rotary)"
    return None


@dataclasses.dataclass(frozen=True)
class GqaMatch:
    """A Llama block: its core, the Q/K/V head splits, rotary on Q and K, repeat_kv on K and V."""

    core: Core
    q: HeadSplit
    k: HeadSplit
    v: HeadSplit
    q_rot: Rotary
    k_rot: Rotary
    k_rep: Repeat
    v_rep: Repeat


class GqaRotaryAttention(BlockRule):
    """Llama (TorchScript): rotate_half rotary on Q and K, repeat_kv on K and V, additive mask."""

    name = "gqa-rotary-attention"

    def match(self, graph: gs.Graph, node: gs.Node) -> Match | None:
        core = match_core(node)
        if core is None or core.key.form != "swap":
            return None
        q_rot = match_rotary(core.q4)
        k_rep, v_rep = match_repeat(core.key.k4), match_repeat(core.v4)
        if q_rot is None or k_rep is None or v_rep is None:
            return None
        k_rot = match_rotary(k_rep.x4)
        q = head_split(q_rot.x4, (0, 2, 1, 3))
        k = head_split(k_rot.x4, (0, 2, 1, 3)) if k_rot is not None else None
        v = head_split(v_rep.x4, (0, 2, 1, 3))
        if q is None or k is None or v is None:
            return None
        parts = core.nodes + q_rot.nodes + k_rot.nodes + k_rep.nodes + v_rep.nodes + q.nodes + k.nodes + v.nodes
        unique = list({id(n): n for n in parts if n is not None}.values())
        nodes = [node] + [n for n in unique if n is not node]
        return Match(nodes, GqaMatch(core, q, k, v, q_rot, k_rot, k_rep, v_rep))

    def check(self, graph: gs.Graph, match: Match, ctx: PassContext) -> Refusal | None:
        core: Core = match.info.core
        q: HeadSplit = match.info.q
        k: HeadSplit = match.info.k
        v: HeadSplit = match.info.v
        if not softmax_is_last_axis(graph, core.softmax):
            return self.refusal("softmax axis not last", match)
        problem = head_layout_problem(core, q, k, v, (match.info.q_rot, match.info.k_rot))
        if problem is not None:
            return self.refusal(problem, match)
        heads, kv_heads = q.num_heads(), k.num_heads()
        for repeat in (match.info.k_rep, match.info.v_rep):
            if not repeat_is_exact(repeat, heads // kv_heads):
                return self.refusal("repeat_kv Expand/Reshape does not repeat kv heads N/Nkv times", match)
        if core.nan_guard and not mask_is_finite(core.bias):
            return self.refusal("NaN guard kept: mask is not a Where of finite constants", match)
        if ctx.provider == "cuda" and projection_dtype(q.x3) not in (np.float16, "bfloat16"):
            return self.refusal("CUDA GroupQueryAttention runs float16/bfloat16 only", match)
        if any(n.op == "Cast" and int(n.attrs.get("to", 1)) != 1 for n in core.between):
            return self.refusal("cast after softmax changes precision", match)
        return self.leak_refusal(graph, match, core)

    def rewrite(self, graph: gs.Graph, match: Match, ctx: PassContext) -> None:
        core: Core = match.info.core
        q, k, v = match.info.q, match.info.k, match.info.v
        prefix = core.softmax.name or core.output.name
        head_size = q.head_size
        b = _Builder(graph, prefix)
        batch, seq = b.dim(q.x3, 0), b.dim(q.x3, 1)
        positions = b.positions(batch, seq)
        q_rot, k_rot = match.info.q_rot, match.info.k_rot
        caches = {}
        for label, table in (("cos", q_rot.cos), ("sin", q_rot.sin)):
            caches[label] = b.rotary_cache(table, batch, head_size // 2, label)
        query = b.rotary(q.x3, positions, caches["cos"], caches["sin"], "q")
        if k_rot.cos is q_rot.cos and k_rot.sin is q_rot.sin:
            key_caches = caches
        else:
            key_caches = {lbl: b.rotary_cache(t, batch, head_size // 2, f"k_{lbl}")
                          for lbl, t in (("cos", k_rot.cos), ("sin", k_rot.sin))}
        key = b.rotary(k.x3, positions, key_caches["cos"], key_caches["sin"], "k")
        total = b.dim(k.x3, 1)
        seqlens = b.seqlens(batch, total)
        total32 = b.op("Cast", [b.op("Squeeze", [total, b.const("axis0", [0])], "total_scalar")],
                       "total_i32", to=6, dtype=np.int32)
        inputs = [query, key, v.x3, gs.Variable.empty(), gs.Variable.empty(), seqlens, total32]
        if core.bias is not None:
            inputs += [gs.Variable.empty()] * 3 + [expanded_mask(graph, core.bias, q.x3, k.x3, prefix)]
        graph.nodes.append(gs.Node(
            "GroupQueryAttention", f"{prefix}/GroupQueryAttention", domain=MS_DOMAIN,
            attrs={"num_heads": int(q.num_heads()), "kv_num_heads": int(k.num_heads()),
                   "scale": float(scale_value(core.factors)), "causal": 0},
            inputs=inputs, outputs=[core.output]))
        core.merge_reshape.outputs.clear()
        if ctx.model is not None:
            ctx.model.ensure_domain(MS_DOMAIN, 1)


class _Builder:
    """Small helper that appends the index arithmetic the fused ops need."""

    def __init__(self, graph: gs.Graph, prefix: str):
        self.graph, self.prefix = graph, prefix

    def const(self, label: str, values) -> gs.Constant:
        return gs.Constant(f"{self.prefix}/{label}", np.asarray(values, dtype=np.int64))

    def op(self, op: str, inputs, label: str, dtype=np.int64, **attrs) -> gs.Variable:
        out = gs.Variable(f"{self.prefix}/{label}", dtype=dtype)
        self.graph.nodes.append(gs.Node(op, f"{self.prefix}/{label}_{op}", attrs=attrs, inputs=list(inputs),
                                        outputs=[out]))
        return out

    def dim(self, tensor: gs.Tensor, axis: int) -> gs.Variable:
        shape = self.op("Shape", [tensor], f"{tensor.name}_shape{axis}")
        return self.op("Gather", [shape, self.const(f"axis{axis}_{tensor.name}", [axis])],
                       f"{tensor.name}_dim{axis}", axis=0)

    def positions(self, batch, seq) -> gs.Variable:
        """pos[b, s] = b*S + s, shape [B, S]."""
        count = self.op("Mul", [batch, seq], "rows")
        flat = self.op("Range", [gs.Constant(f"{self.prefix}/zero", np.array(0, np.int64)),
                                 self.op("Squeeze", [count, self.const("sq_axis", [0])], "rows_scalar"),
                                 gs.Constant(f"{self.prefix}/one", np.array(1, np.int64))], "positions_flat")
        return self.op("Reshape", [flat, self.op("Concat", [batch, seq], "pos_shape", axis=0)], "positions")

    def rotary_cache(self, table: gs.Tensor, batch, half: int, label: str) -> gs.Variable:
        """Reshape(Expand(table, [B, 1, 1])[..., :half], [-1, half]): one cache row per (b, s)."""
        target = self.op("Concat", [batch, self.const(f"{label}_ones", [1, 1])], f"{label}_expand_shape", axis=0)
        full = self.op("Expand", [table, target], f"{label}_expanded", dtype=table.dtype or np.float32)
        sliced = self.op("Slice", [full, self.const(f"{label}_start", [0]), self.const(f"{label}_end", [half]),
                                   self.const(f"{label}_axis", [2])], f"{label}_half", dtype=table.dtype or np.float32)
        return self.op("Reshape", [sliced, self.const(f"{label}_rows", [-1, half])], f"{label}_cache",
                       dtype=table.dtype or np.float32)

    def rotary(self, x3, positions, cos, sin, label: str) -> gs.Variable:
        out = gs.Variable(f"{self.prefix}/{label}_rotary", dtype=x3.dtype or np.float32)
        self.graph.nodes.append(gs.Node("RotaryEmbedding", f"{self.prefix}/{label}_RotaryEmbedding",
                                        domain=MS_DOMAIN, inputs=[x3, positions, cos, sin], outputs=[out]))
        return out

    def seqlens(self, batch, total) -> gs.Variable:
        """seqlens_k = T - 1 for every batch row (int32): no KV cache, the mask does the rest."""
        last = self.op("Sub", [total, self.const("one_vec", [1])], "total_minus_one")
        rows = self.op("Expand", [last, batch], "seqlens_i64")
        return self.op("Cast", [rows], "seqlens_k", dtype=np.int32, to=6)
