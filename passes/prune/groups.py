"""Channel dependency groups: which channels of which tensors must be removed together.

Every output channel of a weighted layer (Conv, ConvTranspose, Gemm, MatMul with a
constant weight) gets a fresh channel id. Ids flow forward along the *channel
axis* of each tensor: unchanged through activations, BatchNormalization, pooling,
Resize, Pad and Transpose (axis moves); concatenated by Concat (offsets);
sub-ranged by Split/Slice; repeated by Flatten/Reshape into a Gemm (channel c of
[N,C,H,W] becomes features c*H*W..(c+1)*H*W-1). Where two tensors meet
elementwise (Add/Mul residual joins, squeeze-excitation) their ids are unified:
the channels are tied and must be removed from every branch at once. A depthwise
conv keeps the ids of its input (its channels are tied across the group).

Attention heads: a Reshape [.., H*D] -> [.., H, D] unifies the D ids of each head
(a head leaves whole) and tracks the head axis; a MatMul of two activations passes
ids on a batch axis (scores = Q K^T and context = P V are computed per head, so
dropping head h from Q, K and V drops exactly head h of the context), tying the
heads of both operands; the merging Reshape [.., H, D] -> [.., H*D] repeats each
head id D times into the output projection. Transformer FFNs need nothing special:
the intermediate channels of MatMul -> bias -> activation -> MatMul are an
ordinary group.

Removing a *class* (a set of unified ids) is exact in structure: every producer
loses those output channels, every consumer the matching input channels, every
per-channel parameter the matching entries; only the numbers change. Ids are
*blocked* (never removed) where that cannot be proven safe, with the reason:
they reach a graph output, an op whose channel semantics are not modelled, a
Reshape that mixes the channel dim with others, a reduction or normalisation
over the channel axis, a grouped (non-depthwise) conv, a MatMul between two
activations over the channel axis, ...

A *group* is the set of classes produced by the same layers; allocation prunes
per group, and all classes of a group share the same producers and consumers.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

UNARY_ELEMENTWISE = {
    "Relu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Exp", "Log", "Abs", "Neg", "Sqrt", "Erf", "Gelu",
    "Elu", "LeakyRelu", "Selu", "Softplus", "Softsign", "Mish", "Identity", "Cast", "Floor", "Ceil", "Round",
    "Reciprocal", "Sign", "Sin", "Cos", "Celu", "ThresholdedRelu", "Clip", "Dropout",
}
BINARY_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu"}
POOLING = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}
RESHAPES = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}
REDUCTIONS = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2", "ReduceProd",
              "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp"}


@dataclasses.dataclass
class Tracked:
    """Channel ids along ``axis`` of one tensor (one id per position)."""

    ids: np.ndarray
    axis: int


@dataclasses.dataclass
class Site:
    """Something to edit when channels go: ``kind`` says what.

    source  - node.inputs[index] loses entries along ``axis`` (producer weight / bias)
    sink    - node.inputs[index] loses entries along ``axis`` (consumer weight)
    param   - a per-channel constant (BN statistics, bias, scale) loses entries along ``axis``
    group   - a depthwise conv's ``group`` attribute becomes the kept count
    reshape - entry ``axis`` of a Reshape shape (or Resize sizes) constant becomes the kept count
    slice   - a Slice on the channel axis gets new starts/ends
    split   - a Split on the channel axis gets new sizes
    """

    kind: str
    node: gs.Node
    index: int
    axis: int
    ids: np.ndarray
    extra: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Group:
    """Classes produced by the same layers; pruned together by allocation."""

    index: int
    classes: np.ndarray  # root ids, one per channel class
    sources: list[str]
    sinks: list[str]
    blocked: dict[int, str]  # root -> reason
    width: int = 1  # channels per class in each producer (an attention head: its head dim)

    @property
    def size(self) -> int:
        return len(self.classes)

    @property
    def prunable(self) -> np.ndarray:
        return np.array([c not in self.blocked for c in self.classes], dtype=bool)

    def reasons(self) -> list[str]:
        return sorted(set(self.blocked.values()))


class UnionFind:
    def __init__(self):
        self.parent: list[int] = []

    def fresh(self, count: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + count))
        return np.arange(start, start + count, dtype=np.int64)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(int(a)), self.find(int(b))
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def roots(self, ids: np.ndarray) -> np.ndarray:
        return np.array([self.find(int(i)) for i in ids], dtype=np.int64)


class ChannelAnalysis:
    """Walks the main graph once (topological order) and records ids, sites and blocks.

    ``shapes`` maps tensor names to static shapes (from shape inference with pinned inputs).
    """

    def __init__(self, graph: gs.Graph, shapes: dict[str, tuple | None], opset: int):
        self.graph = graph
        self.shapes = shapes
        self.opset = opset
        self.uf = UnionFind()
        self.tracked: dict[str, Tracked] = {}
        self.sites: list[Site] = []
        self.blocks: list[tuple[np.ndarray, str]] = []
        self.owner: dict[int, str] = {}  # fresh id -> producing node name
        self.weighted: list[tuple[gs.Node, np.ndarray | None, np.ndarray | None]] = []
        self.graph.toposort()
        for node in list(self.graph.nodes):
            self._visit(node)
        for out in self.graph.outputs:
            if out.name in self.tracked:
                self.block(self.tracked[out.name].ids, f"channels feed the graph output {out.name!r}")

    # -- bookkeeping -------------------------------------------------------------------------
    def rank(self, tensor) -> int | None:
        shape = self.shape(tensor)
        return None if shape is None else len(shape)

    def shape(self, tensor) -> tuple | None:
        if isinstance(tensor, gs.Constant):
            return tuple(tensor.shape)
        return self.shapes.get(tensor.name)

    def track(self, tensor, ids: np.ndarray, axis: int) -> None:
        self.tracked[tensor.name] = Tracked(np.asarray(ids, dtype=np.int64), axis)

    def get(self, tensor) -> Tracked | None:
        if tensor is None or isinstance(tensor, gs.Constant) or not tensor.name:
            return None
        return self.tracked.get(tensor.name)

    def block(self, ids: np.ndarray, reason: str) -> None:
        if len(ids):
            self.blocks.append((np.asarray(ids), reason))

    def block_inputs(self, node: gs.Node, reason: str) -> None:
        for t in node.inputs:
            tracked = self.get(t)
            if tracked is not None:
                self.block(tracked.ids, f"{reason} ({node.op} {node.name!r})")

    def fresh_source(self, node: gs.Node, count: int) -> np.ndarray:
        ids = self.uf.fresh(count)
        for i in ids:
            self.owner[int(i)] = node.name
        return ids

    def site(self, kind: str, node: gs.Node, index: int, axis: int, ids: np.ndarray, **extra) -> None:
        self.sites.append(Site(kind, node, index, axis, np.asarray(ids), extra))

    # -- dispatch ----------------------------------------------------------------------------
    def _visit(self, node: gs.Node) -> None:
        self._block_subgraph_uses(node)
        if not any(self.get(t) is not None for t in node.inputs) and node.op not in (
            "Conv", "ConvTranspose", "Gemm", "MatMul"):
            return
        handler: Callable | None = HANDLERS.get(node.op)
        if handler is None:
            if node.op in UNARY_ELEMENTWISE or node.op in BINARY_ELEMENTWISE or node.op == "Where":
                handler = ChannelAnalysis._elementwise
            elif node.op in POOLING:
                handler = ChannelAnalysis._pool
            elif node.op in RESHAPES:
                handler = ChannelAnalysis._reshape
            elif node.op in REDUCTIONS:
                handler = ChannelAnalysis._reduce
        if node.op in ("Shape", "Size"):
            return  # reads the (runtime) channel count, which stays consistent after pruning
        if handler is None:
            self.block_inputs(node, "an op whose channel semantics are not modelled consumes the channels")
            return
        handler(self, node)

    def _block_subgraph_uses(self, node: gs.Node) -> None:
        for value in node.attrs.values():
            graphs = [value] if isinstance(value, gs.Graph) else [v for v in value if isinstance(v, gs.Graph)] \
                if isinstance(value, (list, tuple)) else []
            for sub in graphs:
                for name in _names_used(sub):
                    if name in self.tracked:
                        self.block(self.tracked[name].ids, f"channels are used inside a subgraph of {node.name!r}")

    # -- weighted layers ---------------------------------------------------------------------
    def _conv(self, node: gs.Node) -> None:
        x, w = node.inputs[0], node.inputs[1]
        tx = self.get(x)
        if not isinstance(w, gs.Constant):
            self.block_inputs(node, "conv weight is not a constant")
            return
        group = int(node.attrs.get("group", 1))
        cout, cin_per_group = w.shape[0], w.shape[1]
        cin = cin_per_group * group
        if tx is not None and tx.axis != 1:
            self.block(tx.ids, f"conv input channels are not on axis 1 ({node.name!r})")
            tx = None
        if group > 1 and group == cin and cout == group:
            self._depthwise(node, tx, cin)
            return
        if group > 1:
            if tx is not None:
                self.block(tx.ids, f"grouped conv (group={group}) that is not depthwise ({node.name!r})")
            ids = self.fresh_source(node, cout)
            self.block(ids, f"grouped conv (group={group}) that is not depthwise ({node.name!r})")
            self.track(node.outputs[0], ids, 1)
            return
        if tx is not None:
            self.site("sink", node, 1, 1, tx.ids)
        ids = self.fresh_source(node, cout)
        self.site("source", node, 1, 0, ids)
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            self._bias_site(node, 2, ids)
        self.track(node.outputs[0], ids, 1)
        self.weighted.append((node, None if tx is None else tx.ids, ids))

    def _depthwise(self, node: gs.Node, tx: Tracked | None, cin: int) -> None:
        if tx is None:
            ids = self.fresh_source(node, cin)
            self.block(ids, f"depthwise conv over channels that cannot be pruned ({node.name!r})")
        else:
            ids = tx.ids
        self.site("param", node, 1, 0, ids)
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            self._bias_site(node, 2, ids)
        self.site("group", node, 0, 0, ids)
        self.track(node.outputs[0], ids, 1)
        self.weighted.append((node, ids, None))

    def _bias_site(self, node: gs.Node, index: int, ids: np.ndarray) -> None:
        bias = node.inputs[index]
        if isinstance(bias, gs.Constant):
            self.site("source", node, index, len(bias.shape) - 1, ids)
        else:
            self.block(ids, f"bias of {node.name!r} is not a constant")

    def _conv_transpose(self, node: gs.Node) -> None:
        x, w = node.inputs[0], node.inputs[1]
        tx = self.get(x)
        if not isinstance(w, gs.Constant) or int(node.attrs.get("group", 1)) != 1:
            self.block_inputs(node, "ConvTranspose with a grouped or non-constant weight")
            return
        if tx is not None and tx.axis != 1:
            self.block(tx.ids, f"ConvTranspose input channels are not on axis 1 ({node.name!r})")
            tx = None
        if tx is not None:
            self.site("sink", node, 1, 0, tx.ids)
        ids = self.fresh_source(node, w.shape[1])
        self.site("source", node, 1, 1, ids)
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            self._bias_site(node, 2, ids)
        self.track(node.outputs[0], ids, 1)
        self.weighted.append((node, None if tx is None else tx.ids, ids))

    def _gemm(self, node: gs.Node) -> None:
        a, b = node.inputs[0], node.inputs[1]
        ta = self.get(a)
        if not isinstance(b, gs.Constant) or node.attrs.get("transA", 0):
            self.block_inputs(node, "Gemm with transA or a non-constant B")
            return
        trans_b = bool(node.attrs.get("transB", 0))
        if ta is not None and ta.axis != 1:
            self.block(ta.ids, f"Gemm input channels are not its K axis ({node.name!r})")
            ta = None
        if ta is not None:
            self.site("sink", node, 1, 1 if trans_b else 0, ta.ids)
        ids = self.fresh_source(node, b.shape[0] if trans_b else b.shape[1])
        self.site("source", node, 1, 0 if trans_b else 1, ids)
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            c = node.inputs[2]
            if isinstance(c, gs.Constant) and c.shape and c.shape[-1] == len(ids):
                self.site("source", node, 2, len(c.shape) - 1, ids)
            elif not (isinstance(c, gs.Constant) and (not c.shape or c.shape[-1] == 1)):
                self.block(ids, f"Gemm bias of {node.name!r} is not a per-output constant")
        self.track(node.outputs[0], ids, 1)
        self.weighted.append((node, None if ta is None else ta.ids, ids))

    def _matmul(self, node: gs.Node) -> None:
        a, b = node.inputs[0], node.inputs[1]
        if not isinstance(a, gs.Constant) and not isinstance(b, gs.Constant):
            self._activation_matmul(node)
            return
        ta = self.get(a)
        if not isinstance(b, gs.Constant) or len(b.shape) != 2 or isinstance(a, gs.Constant):
            self.block_inputs(node, "MatMul between two activations (or with a batched weight) mixes channels")
            return
        rank = self.rank(a)
        if ta is not None and (rank is None or ta.axis != rank - 1):
            self.block(ta.ids, f"MatMul input channels are not its K axis ({node.name!r})")
            ta = None
        if ta is not None:
            self.site("sink", node, 1, 0, ta.ids)
        ids = self.fresh_source(node, b.shape[1])
        self.site("source", node, 1, 1, ids)
        out_rank = self.rank(node.outputs[0])
        if out_rank is None:
            self.block(ids, f"unknown output rank of {node.name!r}")
            return
        self.track(node.outputs[0], ids, out_rank - 1)
        self.weighted.append((node, None if ta is None else ta.ids, ids))

    def _activation_matmul(self, node: gs.Node) -> None:
        """MatMul of two activations (attention scores, attention x values): channels on a batch
        axis (attention heads) pass through, tied between both operands; any other axis mixes them."""
        a, b, out = node.inputs[0], node.inputs[1], node.outputs[0]
        ta, tb = self.get(a), self.get(b)
        ranks = {self.rank(a), self.rank(b), self.rank(out)}
        mixes = "MatMul between two activations (or with a batched weight) mixes channels"
        if len(ranks) != 1 or None in ranks or min(ranks) < 3:
            self.block_inputs(node, mixes)
            return
        rank = ranks.pop()
        tracked = [(t, tt) for t, tt in ((a, ta), (b, tb)) if tt is not None]
        if not tracked:
            return  # no prunable channels involved
        if any(tt.axis >= rank - 2 for _, tt in tracked) or len({tt.axis for _, tt in tracked}) > 1:
            self.block_inputs(node, mixes)
            return
        axis, ids = tracked[0][1].axis, tracked[0][1].ids
        for t, tt in ((a, ta), (b, tb)):
            if tt is not None:
                for x, y in zip(ids, tt.ids):
                    self.uf.union(x, y)
            elif self.shape(t) is None or self.shape(t)[axis] != 1:
                self.block_inputs(node, f"{mixes} (only one operand's heads are known)")
                return
        self.track(out, ids, axis)

    # -- channel-preserving ops --------------------------------------------------------------
    def _elementwise(self, node: gs.Node) -> None:
        out = node.outputs[0]
        out_rank = self.rank(out)
        if out_rank is None:
            self.block_inputs(node, "elementwise op with unknown output rank")
            return
        tracked = [(i, t, self.get(t)) for i, t in enumerate(node.inputs) if self.get(t) is not None]
        aligned = {tt.axis + out_rank - self.rank(t) for _, t, tt in tracked}
        if len(aligned) != 1:
            self.block_inputs(node, "elementwise join of tensors with channels on different axes")
            return
        axis = aligned.pop()
        main = max((tt for _, _, tt in tracked), key=lambda tt: len(tt.ids))
        width = len(main.ids)
        for _, t, tt in tracked:
            if len(tt.ids) == width:
                for a, b in zip(main.ids, tt.ids):
                    self.uf.union(a, b)
            elif len(tt.ids) == 1:
                self.block(tt.ids, f"single channel broadcast over {width} channels ({node.name!r})")
            else:
                self.block_inputs(node, "elementwise join of different channel counts")
                return
        tracked_idx = {i for i, _, _ in tracked}
        for i, t in enumerate(node.inputs):
            if i in tracked_idx or t is None or (node.op in ("Clip", "Dropout") and i > 0):
                continue
            if not self._broadcast_operand(node, i, t, axis, out_rank, main.ids):
                return
        self.track(out, main.ids, axis)

    def _broadcast_operand(self, node, i, t, axis, out_rank, ids) -> bool:
        shape = self.shape(t)
        if shape is None:
            self.block(ids, f"operand of unknown shape joins the channels ({node.name!r})")
            return False
        at = axis - (out_rank - len(shape))
        if at < 0 or shape[at] == 1:
            return True
        if isinstance(t, gs.Constant) and shape[at] == len(ids):
            self.site("param", node, i, at, ids)
            return True
        self.block(ids, f"joined with a tensor whose channels cannot be pruned ({node.name!r})")
        return False

    def _single_input(self, node: gs.Node) -> Tracked | None:
        tx = self.get(node.inputs[0])
        for t in node.inputs[1:]:
            if self.get(t) is not None:
                self.block_inputs(node, "channels used as an auxiliary input")
                return None
        return tx

    def _pool(self, node: gs.Node) -> None:
        tx = self._single_input(node)
        if tx is None:
            return
        if tx.axis != 1:
            self.block(tx.ids, f"pooling over the channel axis ({node.name!r})")
            return
        self.track(node.outputs[0], tx.ids, 1)

    def _batchnorm(self, node: gs.Node) -> None:
        tx = self._single_input(node)
        if tx is None:
            return
        if tx.axis != 1 or len(node.outputs) > 1 and any(o.outputs for o in node.outputs[1:]):
            self.block(tx.ids, f"normalisation in training mode or off axis 1 ({node.name!r})")
            return
        for i in range(1, len(node.inputs)):
            if not isinstance(node.inputs[i], gs.Constant):
                self.block(tx.ids, f"non-constant normalisation parameters ({node.name!r})")
                return
            self.site("param", node, i, 0, tx.ids)
        self.track(node.outputs[0], tx.ids, 1)

    def _layernorm(self, node: gs.Node) -> None:
        tx = self._single_input(node)
        rank = self.rank(node.inputs[0])
        if tx is None or rank is None:
            return
        axis = node.attrs.get("axis", -1) % rank
        if tx.axis >= axis:
            self.block(tx.ids, f"normalisation over the channel axis depends on all channels ({node.name!r})")
            return
        self.track(node.outputs[0], tx.ids, tx.axis)

    def _softmax(self, node: gs.Node) -> None:
        tx = self._single_input(node)
        rank = self.rank(node.inputs[0])
        if tx is None or rank is None:
            return
        axis = node.attrs.get("axis", -1 if self.opset >= 13 else 1) % rank
        mixes = tx.axis == axis if self.opset >= 13 else tx.axis >= axis
        if mixes:
            self.block(tx.ids, f"softmax over the channel axis ({node.name!r})")
            return
        self.track(node.outputs[0], tx.ids, tx.axis)

    def _reduce(self, node: gs.Node) -> None:
        tx = self._single_input(node)
        rank = self.rank(node.inputs[0])
        if tx is None or rank is None:
            return
        axes = node.attrs.get("axes")
        if axes is None and len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
            axes = node.inputs[1].values.tolist()
        if not axes:
            self.block(tx.ids, f"reduction over all axes ({node.name!r})")
            return
        axes = sorted(int(a) % rank for a in axes)
        if tx.axis in axes:
            self.block(tx.ids, f"reduction over the channel axis ({node.name!r})")
            return
        keep = node.attrs.get("keepdims", 1)
        axis = tx.axis if keep else tx.axis - sum(a < tx.axis for a in axes)
        self.track(node.outputs[0], tx.ids, axis)

    def _transpose(self, node: gs.Node) -> None:
        tx = self._single_input(node)
        rank = self.rank(node.inputs[0])
        if tx is None or rank is None:
            return
        perm = list(node.attrs.get("perm", list(range(rank))[::-1]))
        self.track(node.outputs[0], tx.ids, perm.index(tx.axis))

    def _pad(self, node: gs.Node) -> None:
        tx = self._single_input(node)
        rank = self.rank(node.inputs[0])
        if tx is None or rank is None:
            return
        pads = node.attrs.get("pads")
        if pads is None and len(node.inputs) > 1:
            pads = node.inputs[1].values.tolist() if isinstance(node.inputs[1], gs.Constant) else None
        axes = list(range(rank))
        if len(node.inputs) > 3 and node.inputs[3] is not None:
            axes = [int(a) % rank for a in node.inputs[3].values.tolist()] \
                if isinstance(node.inputs[3], gs.Constant) else None
        if pads is None or axes is None:
            self.block(tx.ids, f"Pad with non-constant pads ({node.name!r})")
            return
        n = len(axes)
        if tx.axis in axes and (pads[axes.index(tx.axis)] or pads[n + axes.index(tx.axis)]):
            self.block(tx.ids, f"Pad on the channel axis ({node.name!r})")
            return
        self.track(node.outputs[0], tx.ids, tx.axis)

    def _resize(self, node: gs.Node) -> None:
        tx = self._single_input(node)
        if tx is None:
            return
        scales = node.inputs[2] if len(node.inputs) > 2 else None
        sizes = node.inputs[3] if len(node.inputs) > 3 else None
        if node.op == "Upsample":
            scales, sizes = node.inputs[1] if len(node.inputs) > 1 else None, None
        if sizes is not None and sizes.name:
            if not isinstance(sizes, gs.Constant):
                self.block(tx.ids, f"Resize with computed sizes ({node.name!r})")
                return
            self.site("reshape", node, 3, tx.axis, tx.ids, const=sizes)
        elif scales is not None and scales.name:
            if not isinstance(scales, gs.Constant) or float(scales.values[tx.axis]) != 1.0:
                self.block(tx.ids, f"Resize that may scale the channel axis ({node.name!r})")
                return
        self.track(node.outputs[0], tx.ids, tx.axis)

    # -- shape changers ----------------------------------------------------------------------
    def _reshape(self, node: gs.Node) -> None:
        tx = self._single_input(node)
        if tx is None:
            return
        mapped = reshape_channels(self.shape(node.inputs[0]), self.shape(node.outputs[0]), tx)
        if mapped is None:
            mapped = self._split_heads(node, tx)
        if mapped is None:
            self.block(tx.ids, f"{node.op} mixes the channel dim with other dims ({node.name!r})")
            return
        if node.op == "Reshape":
            entry = shape_entry(node, mapped.axis)
            piece = self._target_piece(node, mapped.axis) if entry is None else None
            if piece is not None and isinstance(piece[0], gs.Constant):
                entry = piece
            if entry is None and self._reads_channel_count(node, mapped):
                self.track(node.outputs[0], mapped.ids, mapped.axis)  # the entry follows the pruned count
                return
            if entry is None:
                self.block(tx.ids, f"Reshape target shape is computed, its channel entry unknown ({node.name!r})")
                return
            const, position = entry
            if int(const.values.reshape(-1)[position]) not in (0, -1):
                self.site("reshape", node, 1, position, mapped.ids, const=const)
        self.track(node.outputs[0], mapped.ids, mapped.axis)

    def _split_heads(self, node: gs.Node, tx: Tracked) -> Tracked | None:
        """[.., H*D] -> [.., H, D] (attention heads): the D channels of each head are tied into
        one class, so a head leaves whole; the head axis is tracked from here on."""
        shape_in, shape_out = self.shape(node.inputs[0]), self.shape(node.outputs[0])
        if shape_in is None or shape_out is None or tx.axis != len(shape_in) - 1 or len(shape_out) < 2:
            return None
        heads, width = shape_out[-2], shape_out[-1]
        if tuple(shape_out[:-2]) != tuple(shape_in[:-1]) or heads * width != len(tx.ids) or width < 2:
            return None
        blocks = tx.ids.reshape(heads, width)
        for row in blocks:
            for i in row[1:]:
                self.uf.union(row[0], i)
        return Tracked(blocks[:, 0].copy(), len(shape_out) - 2)

    def _reads_channel_count(self, node: gs.Node, mapped: Tracked) -> bool:
        """True when the Reshape's target entry for the channel axis is read at run time from the
        shape of a tensor carrying exactly these channels (``Concat(.., Unsqueeze(Gather(Shape(t),
        k)), ..)`` as torch exports ``x.view(x.size(0), x.size(1))``): it then stays right after pruning."""
        piece = self._target_piece(node, mapped.axis)
        if piece is None:
            return False
        tensor, position = piece
        producer = tensor.inputs[0] if tensor.inputs else None
        if producer is not None and producer.op == "Unsqueeze" and position == 0:
            tensor = producer.inputs[0]
            producer = tensor.inputs[0] if tensor.inputs else None
        if producer is None or producer.op != "Gather" or not isinstance(producer.inputs[1], gs.Constant):
            return False
        shape_node = producer.inputs[0].inputs[0] if producer.inputs[0].inputs else None
        if shape_node is None or shape_node.op != "Shape" or shape_node.attrs.get("start") or \
                shape_node.attrs.get("end") is not None:
            return False
        source, rank = self.get(shape_node.inputs[0]), self.rank(shape_node.inputs[0])
        index = producer.inputs[1].values.reshape(-1)
        if source is None or rank is None or position >= len(index):
            return False
        return int(index[position]) % rank == source.axis and np.array_equal(source.ids, mapped.ids)

    def _target_piece(self, node: gs.Node, axis: int):
        """(Concat input, index within it) that gives entry ``axis`` of a Reshape's target shape."""
        shape = node.inputs[1]
        if isinstance(shape, gs.Constant) or not shape.inputs or shape.inputs[0].op != "Concat":
            return None
        offset = 0
        for piece in shape.inputs[0].inputs:
            dims = self.shape(piece)
            if dims is None or len(dims) != 1:
                return None
            if offset <= axis < offset + dims[0]:
                return piece, axis - offset
            offset += dims[0]
        return None

    def _concat(self, node: gs.Node) -> None:
        rank = self.rank(node.outputs[0])
        if rank is None:
            self.block_inputs(node, "Concat of unknown rank")
            return
        axis = node.attrs.get("axis", 0) % rank
        parts = [(t, self.get(t)) for t in node.inputs]
        tracked_axes = {tt.axis for _, tt in parts if tt is not None}
        if tracked_axes == {axis}:
            pieces = []
            for t, tt in parts:
                if tt is None:
                    shape = self.shape(t)
                    if shape is None:
                        self.block_inputs(node, "Concat with an operand of unknown shape")
                        return
                    fresh = self.fresh_source(node, shape[axis])
                    self.block(fresh, f"channels concatenated from an unprunable tensor ({node.name!r})")
                    pieces.append(fresh)
                else:
                    pieces.append(tt.ids)
            self.track(node.outputs[0], np.concatenate(pieces), axis)
            return
        self._elementwise_concat(node, parts, axis, rank)

    def _elementwise_concat(self, node, parts, axis, rank) -> None:
        """Concat along another axis: the channel axes of all inputs line up and are tied."""
        tracked = [tt for _, tt in parts if tt is not None]
        if len({tt.axis for tt in tracked}) != 1 or len({len(tt.ids) for tt in tracked}) != 1 or any(
                tt is None for _, tt in parts):
            self.block_inputs(node, "Concat mixing prunable and unprunable channels")
            return
        for tt in tracked[1:]:
            for a, b in zip(tracked[0].ids, tt.ids):
                self.uf.union(a, b)
        self.track(node.outputs[0], tracked[0].ids, tracked[0].axis)

    def _split(self, node: gs.Node) -> None:
        tx = self._single_input(node)
        rank = self.rank(node.inputs[0])
        if tx is None or rank is None:
            return
        axis = node.attrs.get("axis", 0) % rank
        if axis != tx.axis:
            for out in node.outputs:
                self.track(out, tx.ids, tx.axis)
            return
        sizes = [self.shape(o)[axis] if self.shape(o) else None for o in node.outputs]
        if None in sizes:
            self.block(tx.ids, f"Split with unknown output sizes ({node.name!r})")
            return
        offsets = np.cumsum([0] + sizes)
        for out, lo, hi in zip(node.outputs, offsets[:-1], offsets[1:]):
            self.track(out, tx.ids[lo:hi], axis)
        self.site("split", node, 0, axis, tx.ids, sizes=sizes, opset=self.opset)

    def _slice(self, node: gs.Node) -> None:
        tx = self._single_input(node)
        shape = self.shape(node.inputs[0])
        if tx is None or shape is None:
            return
        params = slice_params(node, len(shape))
        if params is None:
            self.block(tx.ids, f"Slice with non-constant parameters ({node.name!r})")
            return
        if tx.axis not in params:
            self.track(node.outputs[0], tx.ids, tx.axis)
            return
        start, end, step = params[tx.axis]
        if step != 1:
            self.block(tx.ids, f"strided Slice on the channel axis ({node.name!r})")
            return
        lo, hi, _ = slice(start, end, step).indices(shape[tx.axis])
        self.track(node.outputs[0], tx.ids[lo:hi], tx.axis)
        self.site("slice", node, 0, tx.axis, tx.ids, lo=lo, hi=hi)

    # -- results -----------------------------------------------------------------------------
    def groups(self) -> list[Group]:
        """Channel classes grouped by the layers that produce them."""
        ids = np.arange(len(self.uf.parent))
        roots = self.uf.roots(ids)
        blocked: dict[int, str] = {}
        for bids, reason in self.blocks:
            for r in self.uf.roots(bids):
                blocked.setdefault(int(r), reason)
        by_owner: dict[str, set[int]] = {}
        for i, r in zip(ids, roots):
            by_owner.setdefault(self.owner[int(i)], set()).add(int(r))
        link = UnionFind()
        link.fresh(len(ids))
        for members in by_owner.values():
            first = min(members)
            for m in members:
                link.union(first, m)
        classes_of: dict[int, list[int]] = {}
        for r in sorted(set(roots.tolist())):
            classes_of.setdefault(link.find(r), []).append(r)
        sources_of: dict[int, list[str]] = {}
        for owner, members in by_owner.items():
            sources_of.setdefault(link.find(min(members)), []).append(owner)
        sinks_of = self._sinks_by_group(link)
        out = []
        ids_per_root = np.bincount(roots, minlength=len(ids))
        owners_per_root: dict[int, set[str]] = {}
        for i, r in zip(ids, roots):
            owners_per_root.setdefault(int(r), set()).add(self.owner[int(i)])
        for n, (key, classes) in enumerate(sorted(classes_of.items())):
            width = max(1, int(ids_per_root[classes[0]]) // max(1, len(owners_per_root.get(classes[0], ()))))
            out.append(Group(n, np.array(classes, dtype=np.int64), sources_of.get(key, []),
                             sinks_of.get(key, []), {c: blocked[c] for c in classes if c in blocked}, width))
        return out

    def _sinks_by_group(self, link: UnionFind) -> dict[int, list[str]]:
        sinks: dict[int, list[str]] = {}
        for site in self.sites:
            if site.kind == "sink" and len(site.ids):
                for key in {link.find(int(r)) for r in self.uf.roots(site.ids)}:
                    sinks.setdefault(key, []).append(site.node.name)
        return sinks


def _names_used(graph: gs.Graph) -> set[str]:
    names = set()
    for node in graph.nodes:
        names.update(t.name for t in node.inputs if t is not None)
        for value in node.attrs.values():
            if isinstance(value, gs.Graph):
                names |= _names_used(value)
    return names


def reshape_channels(shape_in, shape_out, tx: Tracked) -> Tracked | None:
    """Channel ids of a reshaped tensor, or None if the reshape mixes channels with other dims.

    Channel position p of the input covers flat elements [p*inner, (p+1)*inner) of the
    region after the leading dims; an output axis k with the same leading product sees
    either several positions merged into one index (all must share the id) or each
    position split over several indices (ids repeat).
    """
    if shape_in is None or shape_out is None:
        return None
    outer = int(np.prod(shape_in[:tx.axis], dtype=np.int64))
    inner = int(np.prod(shape_in[tx.axis + 1:], dtype=np.int64))
    lead = 1
    for k, dim in enumerate(shape_out):
        if lead == outer and dim > 1 or lead == outer and k == len(shape_out) - 1:
            rest = int(np.prod(shape_out[k + 1:], dtype=np.int64))
            if rest >= inner and rest % inner == 0:
                merge = rest // inner
                if len(tx.ids) % merge:
                    return None
                blocks = tx.ids.reshape(-1, merge)
                return Tracked(blocks[:, 0].copy(), k) if (blocks == blocks[:, :1]).all() else None
            if inner % rest == 0:
                return Tracked(np.repeat(tx.ids, inner // rest), k)
            return None
        lead *= dim
        if lead > outer:
            return None
    return None


def shape_entry(node: gs.Node, axis: int):
    """(constant, flat index) holding entry ``axis`` of a Reshape's target shape, or None."""
    shape = node.inputs[1]
    if isinstance(shape, gs.Constant):
        return shape, axis
    if not shape.inputs or shape.inputs[0].op != "Concat":
        return None
    offset = 0
    for piece in shape.inputs[0].inputs:
        count = piece.shape[0] if piece.shape else None
        if count is None:
            return None
        if offset <= axis < offset + count:
            return (piece, axis - offset) if isinstance(piece, gs.Constant) else None
        offset += count
    return None


def slice_params(node: gs.Node, rank: int) -> dict[int, tuple[int, int, int]] | None:
    """axis -> (start, end, step) of a Slice, or None when any parameter is computed."""
    if "starts" in node.attrs:  # opset < 10
        starts, ends = node.attrs["starts"], node.attrs["ends"]
        axes = node.attrs.get("axes", list(range(len(starts))))
        steps = [1] * len(starts)
    else:
        values = []
        for i in range(1, 5):
            t = node.inputs[i] if len(node.inputs) > i else None
            if t is None or not t.name:
                values.append(None)
            elif isinstance(t, gs.Constant):
                values.append(t.values.reshape(-1).tolist())
            else:
                return None
        starts, ends, axes, steps = values
        axes = axes if axes is not None else list(range(len(starts)))
        steps = steps if steps is not None else [1] * len(starts)
    return {int(a) % rank: (int(s), int(e), int(st)) for a, s, e, st in zip(axes, starts, ends, steps)}


HANDLERS: dict[str, Callable] = {
    "Conv": ChannelAnalysis._conv,
    "ConvTranspose": ChannelAnalysis._conv_transpose,
    "Gemm": ChannelAnalysis._gemm,
    "MatMul": ChannelAnalysis._matmul,
    "BatchNormalization": ChannelAnalysis._batchnorm,
    "InstanceNormalization": ChannelAnalysis._batchnorm,
    "LayerNormalization": ChannelAnalysis._layernorm,
    "Softmax": ChannelAnalysis._softmax,
    "LogSoftmax": ChannelAnalysis._softmax,
    "Transpose": ChannelAnalysis._transpose,
    "Pad": ChannelAnalysis._pad,
    "Resize": ChannelAnalysis._resize,
    "Upsample": ChannelAnalysis._resize,
    "Concat": ChannelAnalysis._concat,
    "Split": ChannelAnalysis._split,
    "Slice": ChannelAnalysis._slice,
}
