"""Helpers shared by the cleanup passes: graph scopes, rewiring, constant values, inferred types.

onnx-graphsurgeon shares tensor objects between a graph and the subgraphs that read
them from the outer scope, so ``tensor.outputs`` lists consumers in every graph.
Rewiring therefore goes through ``replace_uses`` (all consumers, every subgraph
output list) and the graph-output checks look at every graph of the model.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxforge.context import PassContext
from onnxforge.model import ExternalValues, iter_graphs
from onnxforge.passes.base import PassResult, Rule, RulePass, unique_node_names
from onnxforge.passes.matching import DEFAULT_DOMAINS  # noqa: F401  (re-exported)

NONDETERMINISTIC_OPS = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
)
# Constants up to this size may be copied into several graph scopes (gs exports a
# constant as an initializer of every graph whose nodes read it).
SHARED_CONSTANT_BYTES = 1024


# ------------------------------------------------------------------------ scopes


@dataclasses.dataclass
class GraphIndex:
    """The model's graphs and which graph owns each node, built once per pass run."""

    root: gs.Graph
    graphs: list[gs.Graph] = dataclasses.field(default_factory=list)
    owner: dict[int, gs.Graph] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.graphs = list(iter_graphs(self.root))
        for g in self.graphs:
            for node in g.nodes:
                self.owner[id(node)] = g

    def forget(self, graph: gs.Graph) -> None:
        """Drop a graph (and its subgraphs) that is no longer part of the model."""
        gone = {id(g) for g in iter_graphs(graph)}
        self.graphs = [g for g in self.graphs if id(g) not in gone]

    def adopt(self, nodes: list[gs.Node], graph: gs.Graph) -> None:
        for node in nodes:
            self.owner[id(node)] = graph

    def graph_of(self, node: gs.Node) -> gs.Graph | None:
        return self.owner.get(id(node))

    def is_graph_output(self, tensor: gs.Tensor) -> bool:
        return any(any(t is tensor for t in g.outputs) for g in self.graphs)

    def is_graph_input(self, tensor: gs.Tensor) -> bool:
        return any(any(t is tensor for t in g.inputs) for g in self.graphs)

    def is_boundary(self, tensor: gs.Tensor) -> bool:
        return self.is_graph_output(tensor) or self.is_graph_input(tensor)

    def consumer_graphs(self, tensor: gs.Tensor) -> list[gs.Graph]:
        found: list[gs.Graph] = []
        for node in tensor.outputs:
            g = self.graph_of(node)
            if g is not None and all(g is not f for f in found):
                found.append(g)
        return found


def produced_in(tensor: gs.Tensor, graph: gs.Graph, index: GraphIndex) -> bool:
    return len(tensor.inputs) == 1 and index.graph_of(tensor.inputs[0]) is graph


def replace_uses(old: gs.Tensor, new: gs.Tensor, index: GraphIndex) -> None:
    """Every node input and every subgraph output that is ``old`` becomes ``new``.
    The main graph's outputs are never touched (their names are the model's interface)."""
    for consumer in list(old.outputs):
        for i, tensor in enumerate(consumer.inputs):
            if tensor is old:
                consumer.inputs[i] = new
    for g in index.graphs[1:]:
        for i, tensor in enumerate(g.outputs):
            if tensor is old:
                g.outputs[i] = new


def position(node: gs.Node, graph: gs.Graph) -> int:
    """Index of ``node`` in ``graph.nodes`` by identity (gs's Node.__eq__ compares
    structure: slow, and equal twins would be confused)."""
    for i, candidate in enumerate(graph.nodes):
        if candidate is node:
            return i
    raise ValueError(f"node {node.name!r} is not in graph {graph.name!r}")


def remove_node(node: gs.Node, graph: gs.Graph) -> None:
    del graph.nodes[position(node, graph)]
    node.inputs.clear()
    node.outputs.clear()


def bypass_refusal(node: gs.Node, src: gs.Tensor, dst: gs.Tensor, index: GraphIndex) -> str | None:
    """Why ``bypass`` cannot remove ``node``, or None when it can."""
    graph = index.graph_of(node)
    if graph is None:
        return "node is not in the graph index"
    if not index.is_graph_output(dst):
        return None
    if isinstance(src, gs.Constant):
        return "graph output name kept: the input is a constant"
    if index.is_boundary(src):
        return "graph output name kept: the input is itself a graph input or output"
    if not produced_in(src, graph, index) or not any(t is dst for t in graph.outputs):
        return "graph output name kept: the input comes from another scope"
    return None


def bypass(node: gs.Node, src: gs.Tensor, dst: gs.Tensor, index: GraphIndex) -> str | None:
    """Remove ``node`` whose output ``dst`` equals ``src``; consumers of ``dst`` read ``src``.

    When ``dst`` is a graph output its name must survive: ``src`` is renamed to it,
    which is only possible when ``src`` is a plain tensor made in the same graph.
    Returns None when done, or the reason it was not possible.
    """
    reason = bypass_refusal(node, src, dst, index)
    if reason is not None:
        return reason
    graph = index.graph_of(node)
    if not index.is_graph_output(dst):
        replace_uses(dst, src, index)
        remove_node(node, graph)
        return None
    name = dst.name
    for i, tensor in enumerate(graph.outputs):
        if tensor is dst:
            graph.outputs[i] = src
    replace_uses(dst, src, index)
    if dst.dtype is not None:
        src.dtype = dst.dtype
    if dst.shape is not None:
        src.shape = dst.shape
    remove_node(node, graph)
    dst.name = f"{name}__bypassed"
    src.name = name
    return None


def finish(graph: gs.Graph) -> None:
    """Drop what the rewrites left unused (graph inputs stay) and restore topological order."""
    graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=True).toposort(recurse_subgraphs=True)


class IndexedRule(Rule):
    """A rule that reads the model-wide ``GraphIndex`` and the inferred element types,
    given when its pass makes it (IndexedRulePass)."""

    def __init__(self, index: "GraphIndex", types: "TypeTable"):
        self.index = index
        self.types = types


class IndexedRulePass(RulePass):
    """A RulePass whose rules (IndexedRule) see the model-wide ``GraphIndex``."""

    rules: ClassVar[tuple] = ()

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        counts: dict[str, int] = {}
        types = self.types(graph, ctx)
        index = None
        for g in list(iter_graphs(graph)):
            for rule_cls in self.rules:
                # The index is rebuilt only after a rewrite (a model of many subgraphs
                # rebuilt it per graph and rule: quadratic in the subgraph count).
                index = index or GraphIndex(graph)
                rule = rule_cls(index, types)
                fired = self._apply(rule, g, ctx, self.name)
                counts[rule_cls.name] = counts.get(rule_cls.name, 0) + fired
                if fired:
                    index = None
            unique_node_names(g)
        finish(graph)
        return PassResult.from_counts(counts)

    def types(self, graph: gs.Graph, ctx: PassContext) -> "TypeTable":
        return TypeTable({})


# ---------------------------------------------------------------------- constants


def const_nbytes(tensor: gs.Constant) -> int:
    values = tensor._values
    if isinstance(values, LazyValues):
        return int(values.nbytes)
    return int(np.asarray(values).nbytes)


def is_external(tensor: gs.Tensor) -> bool:
    return isinstance(tensor, gs.Constant) and isinstance(tensor._values, ExternalValues)


def onnx_dtype(tensor: gs.Constant) -> int:
    values = tensor._values
    if isinstance(values, LazyValues):
        return int(values.tensor.data_type)
    if tensor.export_dtype is not None and not isinstance(tensor.export_dtype, np.dtype):
        return int(tensor.export_dtype)
    return int(onnx.helper.np_dtype_to_tensor_dtype(np.asarray(values).dtype))


def small_value(tensor: gs.Tensor, limit: int = 1 << 20) -> np.ndarray | None:
    """The values of a constant no larger than ``limit`` bytes, else None (nothing is loaded)."""
    if not isinstance(tensor, gs.Constant) or const_nbytes(tensor) > limit:
        return None
    return np.asarray(tensor.values)


def int_list(tensor: gs.Tensor) -> list[int] | None:
    value = small_value(tensor, 1 << 16)
    if value is None or value.dtype.kind not in "iu":
        return None
    return [int(v) for v in value.reshape(-1)]


def shared_placement_ok(tensor: gs.Tensor, graph: gs.Graph, index: GraphIndex, nbytes: int) -> bool:
    """A constant replacing ``tensor`` stays in ``graph`` unless it is small: gs would copy
    it into every graph whose nodes read it."""
    others = [g for g in index.consumer_graphs(tensor) if g is not graph]
    return not others or nbytes <= SHARED_CONSTANT_BYTES


# -------------------------------------------------------------------- inferred types


@dataclasses.dataclass(frozen=True)
class TypeTable:
    """Element type and dims (int, or None when unknown; dims None when rank unknown) by name."""

    entries: dict[str, tuple[int, tuple | None]]

    def dtype(self, tensor: gs.Tensor) -> int | None:
        if isinstance(tensor, gs.Constant):
            return onnx_dtype(tensor)
        entry = self.entries.get(tensor.name)
        return entry[0] if entry and entry[0] else None

    def shape(self, tensor: gs.Tensor) -> tuple | None:
        if isinstance(tensor, gs.Constant):
            return tuple(int(d) for d in tensor.shape)
        entry = self.entries.get(tensor.name)
        return entry[1] if entry else None

    def static_shape(self, tensor: gs.Tensor) -> tuple[int, ...] | None:
        shape = self.shape(tensor)
        if shape is None or any(d is None for d in shape):
            return None
        return tuple(shape)


def export_for_inference(graph: gs.Graph, ctx: PassContext) -> onnx.ModelProto:
    """The model as a proto for shape inference: every value_info and output shape
    dropped, so shapes derive from the inputs alone (exporters often leave stale
    example shapes), and large main-graph weights turned into typed graph inputs, so
    inference neither copies nor reads them (their values never matter to shapes)."""
    from onnxforge.shared_weights import liftable, staged_headers

    graph.toposort(recurse_subgraphs=True)
    with staged_headers(liftable(graph)):  # their headers only: no weight is copied
        proto = gs.export_onnx(graph, do_type_check=False)
    if ctx.model is not None and ctx.model.graph is graph:
        del proto.opset_import[:]
        proto.opset_import.extend(ctx.model.meta.opset_import)
        proto.ir_version = ctx.model.meta.ir_version
    _strip_shapes(proto.graph)
    _weights_to_inputs(proto.graph)
    return proto


INFERENCE_VALUE_BYTES = 4096  # = shared_weights.LIFT_BYTES: what is staged as a header is lifted here


def _weights_to_inputs(graph: onnx.GraphProto) -> None:
    keep = []
    for init in graph.initializer:
        count = int(np.prod(init.dims, dtype=np.int64)) if init.dims else 1
        try:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        except (KeyError, TypeError, ValueError):
            itemsize = 8
        if count * itemsize >= INFERENCE_VALUE_BYTES or init.data_location == onnx.TensorProto.EXTERNAL:
            graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            keep.append(init)
    if len(keep) != len(graph.initializer):
        kept = [onnx.TensorProto() for _ in keep]
        for dst, src in zip(kept, keep):
            dst.CopyFrom(src)
        del graph.initializer[:]
        graph.initializer.extend(kept)


def _strip_shapes(graph: onnx.GraphProto) -> None:
    del graph.value_info[:]
    for out in graph.output:
        if out.type.HasField("tensor_type"):
            out.type.tensor_type.ClearField("shape")
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                _strip_shapes(attr.g)
            for sub in attr.graphs:
                _strip_shapes(sub)


def infer_types(graph: gs.Graph, ctx: PassContext) -> TypeTable:
    """Run onnx shape inference (with data propagation) on the model; {} when it fails."""
    try:
        proto = export_for_inference(graph, ctx)
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)
    except Exception as exc:  # inference is an aid: without it the passes do less, never wrong
        ctx.warn(f"onnx shape inference failed ({type(exc).__name__}: {str(exc)[:200]}); shape-based cleanups skipped")
        return TypeTable({})
    entries: dict[str, tuple[int, tuple | None]] = {}
    _collect_types(inferred.graph, entries)
    return TypeTable(entries)


def _collect_types(graph: onnx.GraphProto, entries: dict) -> None:
    for info in list(graph.input) + list(graph.output) + list(graph.value_info):
        if not info.type.HasField("tensor_type"):
            continue
        tt = info.type.tensor_type
        dims = None
        if tt.HasField("shape"):
            dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
        entries[info.name] = (tt.elem_type, dims)
    for init in graph.initializer:
        entries[init.name] = (init.data_type, tuple(init.dims))
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                _collect_types(attr.g, entries)
            for sub in attr.graphs:
                _collect_types(sub, entries)


def has_subgraph(node: gs.Node) -> bool:
    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            return True
        if isinstance(value, (list, tuple)) and any(isinstance(v, gs.Graph) for v in value):
            return True
    return False
