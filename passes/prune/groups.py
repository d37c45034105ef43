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

from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from .channel_layers import WeightedLayers
from .channel_preserving import ChannelPreserving
from .channel_shapes import ShapeChangers
from .channels import (  # noqa: F401  (re-exported: Group and the records are read from here)
    BINARY_ELEMENTWISE, POOLING, REDUCTIONS, RESHAPES, UNARY_ELEMENTWISE, Group, Site, Tracked, UnionFind,
)


class ChannelAnalysis(WeightedLayers, ChannelPreserving, ShapeChangers):
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
