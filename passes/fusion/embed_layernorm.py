"""BERT-style embeddings -> com.microsoft EmbedLayerNormalization.

Identity (W, P, T constant 2-D tables with H columns; ids, seg, pos integer indices):
    LayerNormalization(Gather(W, ids) + Gather(P, pos) [+ Gather(T, seg)], gamma, beta, eps)
  = EmbedLayerNormalization(int32(ids), int32(seg), W, P, T, gamma, beta, mask="",
                            position_ids=int32(pos), epsilon=eps)         output 0
The addition is commutative, so the summation order does not matter beyond rounding.
The position indices are passed explicitly (input 8), so nothing is assumed about them
being 0..S-1; onnxruntime accepts them shaped like ids or (1, S). The op's mask_index
output (1) is produced (the kernel always writes it) but read by nobody: no mask is fed.
When the sum itself is read elsewhere (GPT-2: it is the residual stream), it is the op's
output 2 (embedding_sum).

Preconditions: the norm is over the last axis with constant 1-D gamma (and beta) of
length H; every Gather is on axis 0 of a constant float32 table with H columns (the CPU
kernel is float32 only); exactly one index tensor is computed (the positions) and the
others are read from graph inputs, the larger table taken as the words; ids and seg surely have the
same 2-D shape, pos that shape or (1, S); no intermediate tensor (a gathered embedding,
a partial sum) is read outside the pattern. The indices are cast to int32 (what the op takes):
token ids are small non-negative numbers; a negative index, which Gather would wrap, is
an error in the fused op, as is one out of range in both.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxforge.passes.base import Match, RulePass

from ._match import (
    MS_DOMAIN,
    FusionRule,
    ShapeOracle,
    const_value,
    escaping,
    fresh_constant,
    is_const,
    is_graph_output,
    need_ms_domain,
    producer_op,
    replace,
)

INT32 = onnx.TensorProto.INT32


def _summands(t: gs.Tensor, nodes: list[gs.Node], depth: int = 0) -> list[gs.Tensor]:
    """Leaves of a tree of Adds (at most 3 leaves), appending the Adds to ``nodes``."""
    add = producer_op(t, "Add")
    if add is None or depth > 1:
        return [t]
    nodes.append(add)
    leaves: list[gs.Tensor] = []
    for i in add.inputs:
        leaves += _summands(i, nodes, depth + 1)
    return leaves


def _source_input(graph: gs.Graph, t: gs.Tensor) -> gs.Tensor | None:
    """The graph input ``t`` is read from, directly or through a Cast and/or a Reshape (GPT-2
    views the ids as [-1, S]; the op is fed ``t`` itself, whose shape is checked); else None."""
    src = t
    for _ in range(2):
        step = producer_op(src, "Cast", "Reshape")
        if step is None:
            break
        src = step.inputs[0]
    return src if any(src is i for i in graph.inputs) else None


def _constant(graph: gs.Graph, t: gs.Tensor | None, value: np.ndarray) -> gs.Tensor:
    """``t`` itself when it is an initializer, else a new initializer holding ``value``."""
    if isinstance(t, gs.Constant):
        return t
    return fresh_constant(graph, f"{t.name if t is not None and t.name else 'embed_norm'}_param", value)


def _ints(t: gs.Tensor | None) -> list[int] | None:
    value = const_value(t) if t is not None and t.name else None
    return [int(v) for v in value.reshape(-1)] if value is not None and value.dtype.kind in "iu" else None


def _reads_shape_of(shape: gs.Node | None, sources: tuple[gs.Tensor, ...]) -> bool:
    return shape is not None and any(shape.inputs[0] is t for t in sources)


def _dim1(t: gs.Tensor, sources: tuple[gs.Tensor, ...]) -> bool:
    """Is ``t`` the scalar Gather(Shape(x), 1) for x one of ``sources``?"""
    pick = producer_op(t, "Gather")
    if pick is None or int(pick.attrs.get("axis", 0)) != 0 or _ints(pick.inputs[1]) != [1]:
        return False
    if const_value(pick.inputs[1]).ndim != 0:
        return False
    shape = producer_op(pick.inputs[0], "Shape")
    return _reads_shape_of(shape, sources) and not shape.attrs


def _seq_len_of(t: gs.Tensor, sources: tuple[gs.Tensor, ...]) -> bool:
    """Is ``t`` the 1-element tensor [S], S = dim 1 of the ids (read from the ids or from the
    gathered words, whose dim 1 is the same)? Shape(x, start=1, end=2) or
    Unsqueeze(Gather(Shape(x), 1), [0])."""
    shape = producer_op(t, "Shape")
    if shape is not None:
        return _reads_shape_of(shape, sources) and (shape.attrs.get("start"), shape.attrs.get("end")) == (1, 2)
    unsq = producer_op(t, "Unsqueeze")
    return unsq is not None and _unsqueeze_axes(unsq) == [0] and _dim1(unsq.inputs[0], sources)


def _unsqueeze_axes(node: gs.Node) -> list[int] | None:
    return node.attrs.get("axes") or _ints(node.inputs[1] if len(node.inputs) > 1 else None)


def _first_positions(pos: gs.Tensor, ids: gs.Tensor, word_out: gs.Tensor) -> bool:
    """Is ``pos`` of shape (1, S), S = dim 1 of the ids, by construction? Either C[:, :S] for a
    constant C of shape (1, N), N > 1 (TorchScript's and dynamo's BERT position_ids buffer;
    for S > N both the original broadcast and the fused op fail), or Unsqueeze(Range(0, S, 1),
    [0]) (GPT-2)."""
    sources = (ids, word_out)
    unsq = producer_op(pos, "Unsqueeze")
    if unsq is not None and _unsqueeze_axes(unsq) == [0]:
        rng = producer_op(unsq.inputs[0], "Range")
        return (rng is not None and _ints(rng.inputs[0]) == [0] and _ints(rng.inputs[2]) == [1]
                and _dim1(rng.inputs[1], sources))
    sl = producer_op(pos, "Slice")
    if sl is None or len(sl.inputs) < 4:
        return False
    table = const_value(sl.inputs[0])
    if table is None or table.ndim != 2 or table.shape[0] != 1 or table.shape[1] < 2:
        return False
    steps = _ints(sl.inputs[4]) if len(sl.inputs) > 4 and sl.inputs[4].name else [1]
    if _ints(sl.inputs[1]) != [0] or _ints(sl.inputs[3]) not in ([1], [-1]) or steps != [1]:
        return False
    return _seq_len_of(sl.inputs[2], sources)


def _shape_from_ids(graph: gs.Graph, reader: gs.Node, ids: gs.Tensor, hidden: int) -> None:
    """Make ``reader`` (Shape of the gathered words, [B, S, H]) compute the same from the ids
    ([B, S]) and H, so the words need not be materialised."""
    start, end = int(reader.attrs.get("start", 0)), int(reader.attrs.get("end", 3))
    start, end = (min(max(v + 3 if v < 0 else v, 0), 3) for v in (start, end))
    out = reader.outputs[0]
    reader.outputs = []  # detached: cleanup removes it
    h = gs.Constant(f"{out.name}_hidden", np.array([hidden] if end > 2 >= start else [], dtype=np.int64))
    if start >= 2:
        graph.nodes.append(gs.Node("Identity", name=f"{out.name}_hidden", inputs=[h], outputs=[out]))
        return
    if end <= 2:
        graph.nodes.append(gs.Node("Shape", name=f"{out.name}_from_ids", attrs={"start": start, "end": end},
                                   inputs=[ids], outputs=[out]))
        return
    lead = gs.Variable(f"{out.name}_lead", dtype=np.int64)
    graph.nodes.append(gs.Node("Shape", name=f"{out.name}_from_ids", attrs={"start": start, "end": 2},
                               inputs=[ids], outputs=[lead]))
    graph.nodes.append(gs.Node("Concat", name=f"{out.name}_hidden", attrs={"axis": 0}, inputs=[lead, h], outputs=[out]))


@dataclasses.dataclass(frozen=True)
class EmbedPlan:
    """What check found: the (word, position, segment or None) Gathers, the norm's (gamma,
    beta) values, the Shape readers of the words to re-point, and the embedding sum when
    it is read elsewhere (the fused op's output 2)."""

    roles: tuple
    params: tuple
    shape_readers: list
    total: gs.Tensor | None


@dataclasses.dataclass(frozen=True)
class EmbedMatch:
    gathers: tuple[gs.Node, ...]  # word, position [, segment] lookups, in the sum's order
    outputs: tuple[gs.Tensor, ...]


class EmbedLayerNorm(FusionRule):
    """LayerNormalization(word + position [+ segment] Gathers) -> EmbedLayerNormalization."""

    name = "embed-layernorm"
    anchor_ops = ("LayerNormalization",)

    def __init__(self):
        self._shapes: ShapeOracle | None = None  # inferred once per run, on first need

    def match(self, graph, node):
        if node.domain or any(o.outputs or is_graph_output(graph, o) for o in node.outputs[1:]):
            return None
        adds: list[gs.Node] = []
        leaves = _summands(node.inputs[0], adds)
        if not adds or len(leaves) not in (2, 3):
            return None
        gathers = [producer_op(leaf, "Gather") for leaf in leaves]
        if any(g is None for g in gathers):
            return None
        return Match([node, *adds, *gathers], EmbedMatch(tuple(gathers), (node.outputs[0],)))

    def check(self, graph, match, ctx):
        """As FusionRule.check, except that the gathered words may also be read by Shape
        nodes: those are re-pointed at the ids (same leading dims) on rewrite. Returns the
        plan (EmbedPlan) or a refusal."""
        gathers = match.info.gathers
        readers = [c for g in gathers for c in g.outputs[0].outputs if c.op == "Shape" and not c.domain]
        total = match.nodes[0].inputs[0]  # the embedding sum: the op's output 2 when read elsewhere
        kept = [*match.info.outputs, total, *(r.outputs[0] for r in readers)]
        escaped = escaping(graph, match.nodes + readers, keep_tensors=kept)
        if escaped:
            return self.refusal(f"intermediate tensor {escaped[0][1].name} has other consumers", match)
        verdict = self.preconditions(graph, match, ctx)
        if isinstance(verdict, str):
            return self.refusal(verdict, match)
        roles, params = verdict
        if any(r.inputs[0] is not roles[0].outputs[0] for r in readers):
            return self.refusal("the shape of a position or segment embedding is read elsewhere", match)
        kept_sum = total if len(total.outputs) > 1 or is_graph_output(graph, total) else None
        return EmbedPlan(roles, params, readers, kept_sum)

    def _roles(self, graph: gs.Graph, gathers: tuple[gs.Node, ...]) -> tuple | str:
        """(word, position, segment or None) Gathers, or the reason they cannot be told apart."""
        computed = [g for g in gathers if _source_input(graph, g.inputs[1]) is None]
        if len(computed) != 1:
            return f"{len(computed)} embeddings have computed indices (expected exactly one: the positions)"
        fed = sorted((g for g in gathers if g is not computed[0]), key=lambda g: -const_value(g.inputs[0]).shape[0])
        return fed[0], computed[0], (fed[1] if len(fed) > 1 else None)

    def preconditions(self, graph, match, ctx) -> str | tuple:
        """The reason to refuse, or ((word, position, segment) Gathers, (gamma, beta))."""
        node, gathers = match.nodes[0], match.info.gathers
        if int(node.attrs.get("stash_type", 1)) != 1:
            return "norm does not compute in float32"
        params = [const_value(t) if t.name else None for t in node.inputs[1:3]]
        if params[0] is None or (len(node.inputs) > 2 and node.inputs[2].name and params[1] is None):
            return "norm scale/bias not constant"
        hidden = params[0].shape[-1] if params[0].ndim == 1 else None
        if hidden is None or (params[1] is not None and params[1].shape != (hidden,)):
            return "norm scale/bias are not 1-D over the hidden axis"
        for g in gathers:
            table = const_value(g.inputs[0])
            if int(g.attrs.get("axis", 0)) != 0 or table is None or table.ndim != 2:
                return "an embedding is not a Gather on axis 0 of a constant 2-D table"
            if table.dtype != np.float32 or table.shape[1] != hidden:
                return f"embedding table {g.inputs[0].name} is not float32 with {hidden} columns"
        roles = self._roles(graph, gathers)
        if isinstance(roles, str):
            return roles
        reason = self._shape_check(graph, ctx, node, roles)
        return reason if reason is not None else (roles, params)

    def _shape_check(self, graph, ctx, node, roles) -> str | None:
        if self._shapes is None:
            self._shapes = ShapeOracle(graph, ctx)
        word, position, segment = roles
        ids, pos = word.inputs[1], position.inputs[1]
        axis = int(node.attrs.get("axis", -1))
        shape = self._shapes.shape(ids)
        if shape is None or len(shape) != 2 or axis not in (-1, 2):
            return "word ids are not known to be 2-D with the norm over the hidden axis"
        if segment is not None and not self._shapes.same(ids, segment.inputs[1]):
            return "word and segment ids do not surely have the same shape"
        if not self._shapes.same(ids, pos) and not _first_positions(pos, ids, word.outputs[0]):
            for run in self._shapes.runs:
                s_ids, s_pos = run.get(ids.name), run.get(pos.name)
                if s_ids is None or s_pos != (1, s_ids[1]):
                    return f"position ids are neither shaped like the word ids nor (1, S) ({s_pos} vs {s_ids})"
        return None

    def rewrite(self, graph, match, ctx):
        need_ms_domain(ctx)
        node = match.nodes[0]
        plan: EmbedPlan = match.plan
        word, position, segment = plan.roles
        gamma, beta = plan.params
        beta = np.zeros_like(gamma) if beta is None else beta  # LayerNormalization without B
        empty = gs.Variable.empty
        inputs = [
            self._int32(graph, word.inputs[1]),
            self._int32(graph, segment.inputs[1]) if segment is not None else empty(),
            word.inputs[0], position.inputs[0], segment.inputs[0] if segment is not None else empty(),
            _constant(graph, node.inputs[1], gamma),
            _constant(graph, node.inputs[2] if len(node.inputs) > 2 else None, beta),
            empty(),
            self._int32(graph, position.inputs[1]),
        ]
        for reader in plan.shape_readers:
            _shape_from_ids(graph, reader, word.inputs[1], int(gamma.shape[0]))
        mask_index = gs.Variable(f"{node.outputs[0].name}_mask_index", dtype=np.int32)
        replace(graph, match, "EmbedLayerNormalization", inputs,
                {"epsilon": float(node.attrs.get("epsilon", 1e-5))}, domain=MS_DOMAIN,
                outputs=[node.outputs[0], mask_index, *([plan.total] if plan.total is not None else [])])

    def _int32(self, graph: gs.Graph, t: gs.Tensor) -> gs.Tensor:
        if self._shapes is not None and self._shapes.dtype(t) == INT32:
            return t
        if is_const(t):
            return fresh_constant(graph, f"{t.name}_int32", const_value(t).astype(np.int32))
        out = gs.Variable(f"{t.name}_int32", dtype=np.int32, shape=t.shape)
        graph.nodes.append(gs.Node("Cast", name=f"{t.name}_Cast_int32", attrs={"to": INT32}, inputs=[t], outputs=[out]))
        return out


class FuseEmbedLayerNorm(RulePass):
    name = "fuse-embed-layernorm"
    description = "word + position [+ segment] embedding Gathers + LayerNorm -> com.microsoft EmbedLayerNormalization"
    # The kernel sums and normalises in its own order (Eigen): ~1e-7 relative.
    tolerance = (1e-4, 1e-5)
    rules = (EmbedLayerNorm,)


PASSES = (FuseEmbedLayerNorm,)
