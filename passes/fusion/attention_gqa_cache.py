"""Llama self-attention with a KV cache -> com.microsoft RotaryEmbedding + GroupQueryAttention.

The decoder-with-past form Hugging Face exporters write (TorchScript, eager attention):

  K = Concat(past_key, rotary(k4), axis=2)     -> present.key    [B, Nkv, P+S, D]
  V = Concat(past_value, v4, axis=2)           -> present.value
  y = Softmax(scale * rotary(q4) repeat_kv(K)^T + M) repeat_kv(V)   (M: [B|1, 1, S, P+S] additive)

Identity (T = P + S, for every batch row):

  GroupQueryAttention(q3', k3', v3, past_key, past_value,
                      seqlens_k = T - 1, total_sequence_length = T,
                      attention_bias = Expand(M, [1, 1, S, T]), causal = 0)
    == (y, present.key, present.value)

with q3', k3' the RotaryEmbedding of q3, k3 exactly as in ``attention_gqa.py`` (the cache rows are
the model's own cos/sin per (batch, position), so left padding's per-row positions are kept). With
seqlens_k = T - 1 on every row the kernel appends the new keys after the P past ones (``Concat``
along axis 2) and attends over all T; with causal = 0 the model's own mask M is the only mask, so
causal masking, left padding and holes keep their meaning at every query position. Prefill is
P = 0 (an empty past), decode S = 1; the present outputs keep the model's names and [B, Nkv, T, D]
layout, so generation loops that feed presents back as past are unchanged.

Why not GQA's own rotary (do_rotary=1): the kernel rotates by position past + s of each row, while
a left-padded row's positions are cumsum(mask) - 1; a separate RotaryEmbedding fed the model's own
cos/sin is exact for any position_ids.

A chunk of S > 1 new tokens on a non-empty past at B > 1 (left-padded batched chunked prefill, or
speculative decoding) is refused by the kernel at run time (onnxruntime 1.31: "batch_size must be 1
when sequence_length > 1 and past context is given"). The rewrite therefore moves the past into the
new tokens whenever S > 1: with M = P * (S > 1),

  past'  = past[:, :, :P - M]                       (all of it in decode, nothing in a chunk)
  k'     = Concat(past[:, :, P - M:] as [B, M, Nkv*D], k3'),  v' likewise
  q'     = Concat(zeros [B, M, N*D], q3'),  bias' = Pad(Expand(M_mask), M rows of 0 before)
  y      = GroupQueryAttention(q', k', v', past', ...)[:, M:]

so a chunk runs as a prompt over all T = P + S positions (the M blank queries attend with a zero bias
and are dropped), and present = Concat(past, new) as before; decode (S = 1, M = 0) and prefill (P = 0)
run as they did. The past's rows are already rotated (the cache holds rotated keys), so moving them
is exact.

Preconditions (checked): those of ``attention_gqa.py`` (repeat_kv's shapes from inferred shapes where
the exporter computes them from other tensors' dims, as dynamo does); the cache Concats join along the sequence
axis (2) with the past first; present tensors are not read by other nodes of the block.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.context import PassContext, Refusal
from onnxforge.passes.base import Match, RulePass

from ._match import MS_DOMAIN, ShapeOracle, const_value, escaping, producer
from .attention import BlockRule, mask_is_finite, softmax_is_last_axis
from .attention_gqa import GqaMatch, GqaRotaryAttention, _Builder, head_layout_problem
from .attention_match import Core, HeadSplit, head_split, match_core, scale_value
from .llama_match import Repeat, match_repeat, match_rotary, projection_dtype, repeat_is_exact


def cache_concat(tensor: gs.Tensor) -> gs.Node | None:
    """``Concat(past, new)`` with two inputs: the cache append."""
    node = producer(tensor, "Concat")
    return node if node is not None and len(node.inputs) == 2 else None


def reshape_reuses_entries(repeat: Repeat) -> bool:
    """The merge Reshape's target is Concat(b, n, t, d) with b, t, d the very tensors (or equal constants)
    of the Expand target Concat(b, kv, r, t, d): then [B, Nkv, r, T, D] -> [B, n, T, D] and n = Nkv * r
    by element count (for when shape inference cannot follow the Reshape, as with dynamo's
    T = Reshape(Add(Squeeze(Shape(past)[2]), Squeeze(Shape(input_ids)[1])), [-1]))."""
    expand, merge = (producer(node.inputs[1], "Concat") for node in (repeat.expand, repeat.reshape))
    if expand is None or merge is None or len(expand.inputs) != 5 or len(merge.inputs) != 4:
        return False
    for a, b in ((merge.inputs[0], expand.inputs[0]), (merge.inputs[2], expand.inputs[3]),
                 (merge.inputs[3], expand.inputs[4])):
        if a is b:
            continue
        va, vb = const_value(a), const_value(b)
        if va is None or vb is None or va.reshape(-1).tolist() != vb.reshape(-1).tolist() or va.size != 1:
            return False
    return True


@dataclasses.dataclass(frozen=True)
class GqaCacheMatch(GqaMatch):
    """A Llama block with past_key_values: also the Concats that append K and V to the past."""

    k_cat: gs.Node
    v_cat: gs.Node


class GqaRotaryCacheAttention(BlockRule):
    """Llama with past_key_values: rotary on Q and K, K/V appended to the past, repeat_kv, additive mask."""

    name = "gqa-rotary-cache-attention"

    def __init__(self):
        self._shapes: ShapeOracle | None = None  # inferred once per run, on first need

    def match(self, graph: gs.Graph, node: gs.Node) -> Match | None:
        core = match_core(node)
        # "swap": TorchScript's Transpose(K, 0,1,3,2); "reshape": dynamo's K^T through Reshape/Transpose/Reshape.
        if core is None or core.key.form not in ("swap", "reshape"):
            return None
        q_rot = match_rotary(core.q4)
        k_rep, v_rep = match_repeat(core.key.k4), match_repeat(core.v4)
        if q_rot is None or k_rep is None or v_rep is None:
            return None
        k_cat, v_cat = cache_concat(k_rep.x4), cache_concat(v_rep.x4)
        if k_cat is None or v_cat is None:
            return None
        k_rot = match_rotary(k_cat.inputs[1])
        q = head_split(q_rot.x4, (0, 2, 1, 3))
        k = head_split(k_rot.x4, (0, 2, 1, 3)) if k_rot is not None else None
        v = head_split(v_cat.inputs[1], (0, 2, 1, 3))
        if q is None or k is None or v is None:
            return None
        parts = (core.nodes + q_rot.nodes + k_rot.nodes + k_rep.nodes + v_rep.nodes + [k_cat, v_cat]
                 + q.nodes + k.nodes + v.nodes)
        unique = list({id(n): n for n in parts if n is not None}.values())
        nodes = [node] + [n for n in unique if n is not node]
        return Match(nodes, GqaCacheMatch(core, q, k, v, q_rot, k_rot, k_rep, v_rep, k_cat, v_cat))

    def check(self, graph: gs.Graph, match: Match, ctx: PassContext) -> Refusal | None:
        core: Core = match.info.core
        q: HeadSplit = match.info.q
        k: HeadSplit = match.info.k
        v: HeadSplit = match.info.v
        if not softmax_is_last_axis(graph, core.softmax):
            return self.refusal("softmax axis not last", match)
        # before the shape inference repeat_ok may need: the provider alone decides here
        if ctx.provider == "cuda" and projection_dtype(q.x3) not in (np.float16, "bfloat16"):
            return self.refusal("CUDA GroupQueryAttention runs float16/bfloat16 only", match)
        problem = head_layout_problem(core, q, k, v, (match.info.q_rot, match.info.k_rot))
        if problem is not None:
            return self.refusal(problem, match)
        heads, kv_heads = q.num_heads(), k.num_heads()
        for cat in (match.info.k_cat, match.info.v_cat):
            if int(cat.attrs.get("axis", 0)) not in (2, -2):
                return self.refusal("cache Concat is not along the sequence axis", match)
        for repeat in (match.info.k_rep, match.info.v_rep):
            if not self.repeat_ok(graph, ctx, repeat, heads // kv_heads, heads):
                return self.refusal("repeat_kv Expand/Reshape does not repeat kv heads N/Nkv times", match)
        if core.bias is None:
            # Without a mask the block is non-causal over the cache: GQA always needs one here.
            return self.refusal("no additive mask on the scores", match)
        if core.nan_guard and not mask_is_finite(core.bias):
            return self.refusal("NaN guard kept: mask is not a Where of finite constants", match)
        if any(n.op == "Cast" and int(n.attrs.get("to", 1)) != 1 for n in core.between):
            return self.refusal("cast after softmax changes precision", match)
        return self.present_leak(graph, match, core)

    def repeat_ok(self, graph: gs.Graph, ctx: PassContext, repeat: Repeat, n_rep: int, heads: int) -> bool:
        """repeat_kv's Expand gives [B, Nkv, r, T, D] and its Reshape [B, N, T, D] for x4 = [B, Nkv, T, D]:
        read from the target entries (TorchScript), else (dynamo writes them from other tensors' dims:
        the batch of some past input, T as past + new lengths) from inferred shapes under two
        assignments of distinct primes to the input dims."""
        if repeat_is_exact(repeat, n_rep):
            return True
        if self._shapes is None:
            self._shapes = ShapeOracle(graph, ctx)
        for run in self._shapes.runs:
            x = run.get(repeat.x4.name)
            if x is None or len(x) != 4 or x[1] * n_rep != heads:
                return False
            if run.get(repeat.expand.outputs[0].name) != (x[0], x[1], n_rep, x[2], x[3]):
                return False
            merged = run.get(repeat.reshape.outputs[0].name)
            if merged != (x[0], heads, x[2], x[3]) and not (merged is None and reshape_reuses_entries(repeat)):
                return False
        return True

    def present_leak(self, graph: gs.Graph, match: Match, core: Core) -> Refusal | None:
        """The presents become GroupQueryAttention outputs: they may leave the block (graph outputs,
        Shape readers); every other intermediate may not."""
        keep = (core.merge_reshape, match.info.k_cat, match.info.v_cat)
        leaked = [node.name for node, _ in escaping(graph, match.nodes, keep_nodes=keep, ignore_readers=("Shape",))]
        if leaked:
            return Refusal(self.name, "intermediate result used outside the attention block",
                           match.names[:1] + tuple(dict.fromkeys(leaked)))
        return None

    def rewrite(self, graph: gs.Graph, match: Match, ctx: PassContext) -> None:
        core: Core = match.info.core
        q, k, v = match.info.q, match.info.k, match.info.v
        k_cat, v_cat = match.info.k_cat, match.info.v_cat
        prefix = core.softmax.name or core.output.name
        head_size = q.head_size
        b = _Builder(graph, prefix)
        batch, seq = b.dim(q.x3, 0), b.dim(q.x3, 1)
        positions = b.positions(batch, seq)
        q_rot, k_rot = match.info.q_rot, match.info.k_rot
        caches = {label: b.rotary_cache(table, batch, head_size // 2, label)
                  for label, table in (("cos", q_rot.cos), ("sin", q_rot.sin))}
        query = b.rotary(q.x3, positions, caches["cos"], caches["sin"], "q")
        if k_rot.cos is not q_rot.cos or k_rot.sin is not q_rot.sin:
            caches = {label: b.rotary_cache(table, batch, head_size // 2, f"k_{label}")
                      for label, table in (("cos", k_rot.cos), ("sin", k_rot.sin))}
        key = b.rotary(k.x3, positions, caches["cos"], caches["sin"], "k")
        past_key, past_value = k_cat.inputs[0], v_cat.inputs[0]
        past_len = b.dim(past_key, 2)
        total = b.op("Add", [past_len, seq], "total_len")
        seqlens = b.seqlens(batch, total)
        total32 = b.op("Cast", [b.op("Squeeze", [total, b.const("axis0", [0])], "total_scalar")],
                       "total_i32", to=6, dtype=np.int32)
        # a chunk (S > 1) moves the whole past into the new tokens (module docstring: M = P * (S > 1))
        chunk = b.op("Cast", [b.op("Greater", [seq, b.const("one_len", [1])], "is_chunk", dtype=np.bool_)],
                     "is_chunk_i64", to=7)
        moved = b.op("Mul", [past_len, chunk], "moved_len")
        kept = b.op("Sub", [past_len, moved], "kept_len")
        seq_axis, zero = b.const("seq_axis", [2]), b.const("zero_start", [0])
        dtype = q.x3.dtype or np.float32
        caches, moved_kv = [], []
        for label, past, width, new in (("key", past_key, k.num_heads() * head_size, key),
                                        ("value", past_value, v.num_heads() * head_size, v.x3)):
            caches.append(b.op("Slice", [past, zero, kept, seq_axis], f"{label}_past_kept", dtype=dtype))
            part = b.op("Slice", [past, kept, past_len, seq_axis], f"{label}_past_moved", dtype=dtype)
            rows = b.op("Reshape", [b.op("Transpose", [part], f"{label}_moved_bsnh", dtype=dtype, perm=[0, 2, 1, 3]),
                                    b.const(f"{label}_moved_shape", [0, 0, width])], f"{label}_moved_rows", dtype=dtype)
            moved_kv.append(b.op("Concat", [rows, new], f"{label}_with_moved", dtype=dtype, axis=1))
        blank_shape = b.op("Concat", [batch, moved, b.const("q_width", [q.num_heads() * head_size])], "blank_shape", axis=0)
        blank = b.op("Expand", [gs.Constant(f"{prefix}/zero_query", np.zeros((1, 1, 1), dtype)), blank_shape],
                     "blank_queries", dtype=dtype)
        query = b.op("Concat", [blank, query], "query_with_blank", dtype=dtype, axis=1)
        target = b.op("Concat", [b.const("bias_ones", [1, 1]), seq, total], "bias_shape", axis=0)
        bias_dtype = core.bias.dtype or np.float32
        bias = b.op("Expand", [core.bias, target], "attention_bias_rows", dtype=bias_dtype)
        pads = b.op("Concat", [b.const("pads_head", [0, 0]), moved, b.const("pads_tail", [0, 0, 0, 0, 0])], "bias_pads",
                    axis=0)
        bias = b.op("Pad", [bias, pads], "attention_bias", dtype=bias_dtype)
        empty = gs.Variable.empty
        inputs = [query, moved_kv[0], moved_kv[1], caches[0], caches[1], seqlens, total32, empty(), empty(), empty(),
                  bias]
        attended = gs.Variable(f"{prefix}/attended_with_blank", dtype=dtype)
        outputs = [attended, k_cat.outputs[0], v_cat.outputs[0]]
        y = core.output
        for node in (core.merge_reshape, k_cat, v_cat):
            node.outputs.clear()
        graph.nodes.append(gs.Node(
            "GroupQueryAttention", f"{prefix}/GroupQueryAttention", domain=MS_DOMAIN,
            attrs={"num_heads": int(q.num_heads()), "kv_num_heads": int(k.num_heads()),
                   "scale": float(scale_value(core.factors)), "causal": 0},
            inputs=inputs, outputs=outputs))
        graph.nodes.append(gs.Node("Slice", f"{prefix}/drop_blank_queries_Slice",
                                   inputs=[attended, moved, b.const("end_max", [np.iinfo(np.int64).max]),
                                           b.const("row_axis", [1])], outputs=[y]))
        if ctx.model is not None:
            ctx.model.ensure_domain(MS_DOMAIN, 1)


class FuseGqaRotary(RulePass):
    name = "fuse-gqa-rotary"
    description = ("Llama rotary + grouped-query attention (with or without a KV cache) -> "
                   "RotaryEmbedding + GroupQueryAttention")
    tolerance = (1e-4, 1e-5)
    rules = (GqaRotaryAttention, GqaRotaryCacheAttention)


PASSES = (FuseGqaRotary,)
