"""fold-constants: nodes whose inputs are all constants become constants.

Identity: a deterministic op applied to constants gives the same tensor on every
run, so its output can be stored. Values come from onnxruntime's CPU provider
itself (a one-node model, all graph optimizations off): the stored tensor is bit
for bit what the runtime would have computed, which a numpy re-implementation
(onnxsim's pain) cannot promise.

Shape(x) and Size(x) are constants when the dims they read are static after onnx
shape inference (with data propagation, on the model with its stale value_info
dropped); dynamic dims stay dynamic, no value is ever guessed. Folding them lets
the Shape -> Gather -> Unsqueeze -> Concat -> Reshape chains fold away.

If with a constant condition is its taken branch: the rule ``control_flow.InlineConstantIf``
(its preconditions are there), run in every sweep so conditions that fold late are caught.

Each fold is a rule (``folded_shape``, ``folded_node``, ``inlined_if``) applied through
``RulePass._apply``, so when a result fails verification the pass manager finds and denies
the one fold to blame instead of disabling the pass.

Preconditions:
  * default-domain op with at least one input, no subgraph attribute, not random
    (Random*, Multinomial, Bernoulli);
  * no input is the default of a graph input (IR >= 4 initializer listed as an input) unless
    the user pinned it (``--pin-input``): the user may feed another value;
  * no output is a graph output (an initializer cannot take its place);
  * the constant inputs total at most ``size_limit`` bytes (the pass's option, default
    ``ctx.fold_size_limit``; bigger ones,
    such as external weights, are never loaded);
  * size rule: output bytes <= max(input bytes, 64 KiB) and <= ``fold_size_limit``.
    Folding swaps a node's inputs for its outputs in the file; outputs no larger
    than the inputs (or small) cannot bloat it, while ConstantOfShape / Expand /
    Tile / Range / a dequantizing Cast of int8 weights would multiply it. For those
    generator ops the size is computed from the shape before anything runs.
"""
from __future__ import annotations

from types import MappingProxyType

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxforge.context import PassContext, Refusal
from onnxforge.model import ExternalValues
from onnxforge.passes.base import Match, Pass, PassResult, RulePass

from .common import (
    DEFAULT_DOMAINS,
    NONDETERMINISTIC_OPS,
    GraphIndex,
    IndexedRule,
    TypeTable,
    const_nbytes,
    finish,
    has_subgraph,
    infer_types,
    remove_node,
    replace_uses,
    shared_placement_ok,
)
from .control_flow import InlineConstantIf

SMALL_OUTPUT_BYTES = 64 << 10
# Ops whose output can be far larger than their inputs; their size must be known before running.
GENERATOR_OPS = frozenset(
    {"ConstantOfShape", "Expand", "Tile", "Range", "Resize", "Upsample", "Pad", "OneHot", "EyeLike", "MatMul", "Gemm"}
)


class FoldConstants(Pass):
    name = "fold-constants"
    description = "evaluate constant subgraphs and static Shape/Size with onnxruntime CPU; store the results"
    # The stored values are exact, but a consumer whose weights become initializers may
    # take another kernel path (onnxruntime pre-packs constant LSTM/MatMul/Conv weights),
    # which rounds differently: 2e-6 absolute seen on silero_vad's LSTM.
    tolerance = (1e-5, 1e-6)

    options = MappingProxyType({
        "size_limit": (int, "bytes: the largest constant inputs folding loads and the largest result it stores"),
    })

    # Folding makes shapes static, which lets more Shape nodes and If conditions fold:
    # sweep again (with fresh shape inference) until a sweep changes nothing.
    max_sweeps = 8

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        counts = {"folded_shape": 0, "folded_node": 0, "inlined_if": 0}
        evaluator = Evaluator(ctx)
        for _ in range(self.max_sweeps):
            swept = self.sweep(graph, evaluator, ctx)
            for key, value in swept.items():
                counts[key] += value
            finish(graph)
            if not any(swept.values()):
                break
        return PassResult.from_counts(counts)

    def sweep(self, graph: gs.Graph, evaluator: "Evaluator", ctx: PassContext) -> dict[str, int]:
        """One sweep of the three rules over every graph (through ``RulePass._apply``, so the
        pass manager can deny or budget each fold when it bisects a failure)."""
        counts = {"folded_shape": 0, "folded_node": 0, "inlined_if": 0}
        types = infer_types(graph, ctx)
        index = GraphIndex(graph)
        for g in index.graphs:
            counts["folded_shape"] += RulePass._apply(FoldStaticShape(index, types), g, ctx, self.name)
        for g in list(index.graphs):
            if any(g is live for live in index.graphs):
                g.toposort(recurse_subgraphs=False)
                counts["folded_node"] += RulePass._apply(FoldNode(index, types, evaluator), g, ctx, self.name)
                counts["inlined_if"] += RulePass._apply(InlineConstantIf(index, types), g, ctx, self.name)
        return counts


# -------------------------------------------------------------------- Shape / Size


def shape_value(node: gs.Node, types: TypeTable) -> np.ndarray | None:
    """The constant Shape/Size would return, when every dim it reads is static."""
    shape = types.shape(node.inputs[0])
    if shape is None:
        return None
    if node.op == "Size":
        return None if any(d is None for d in shape) else np.array(int(np.prod(shape, dtype=np.int64)), np.int64)
    rank = len(shape)
    start = int(node.attrs.get("start", 0))
    end = int(node.attrs.get("end", rank))
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = min(max(end + rank if end < 0 else end, 0), rank)
    dims = shape[start:end]
    if any(d is None for d in dims):
        return None
    return np.array(dims, dtype=np.int64)


class FoldStaticShape(IndexedRule):
    """Shape/Size whose dims are static: the constant it returns (``folded_shape``)."""

    name = "folded_shape"
    anchor_ops = ("Shape", "Size")

    def match(self, graph, node):
        if node.domain not in DEFAULT_DOMAINS or len(node.inputs) != 1:
            return None
        value = shape_value(node, self.types)  # None while a dim it reads is dynamic
        return None if value is None else Match([node], value)

    def check(self, graph, match, ctx):
        node = match.nodes[0]
        if self.index.is_graph_output(node.outputs[0]):
            return Refusal(self.name, "its output is a graph output", (node.name,))
        return None

    def rewrite(self, graph, match, ctx):
        node = match.nodes[0]
        out = node.outputs[0]
        remove_node(node, graph)
        replace_uses(out, gs.Constant(out.name, match.info), self.index)


def foldable(node: gs.Node) -> bool:
    """Structure only: a deterministic default-domain op whose inputs are all constants."""
    if node.domain not in DEFAULT_DOMAINS or node.op in NONDETERMINISTIC_OPS or node.op == "Constant":
        return False
    inputs = [t for t in node.inputs if not t.is_empty()]
    if not inputs or has_subgraph(node):
        return False
    return all(isinstance(t, gs.Constant) for t in inputs)


class FoldNode(IndexedRule):
    """A deterministic node whose inputs are all constants: its outputs, computed by
    onnxruntime (``folded_node``)."""

    name = "folded_node"

    def __init__(self, index: GraphIndex, types: TypeTable, evaluator: "Evaluator"):
        super().__init__(index, types)
        self.evaluator = evaluator

    def match(self, graph, node):
        return Match([node]) if foldable(node) else None

    def check(self, graph, match, ctx):
        node = match.nodes[0]
        found = self.evaluator.evaluate_node(node, graph, self.index)
        if isinstance(found, str):
            return Refusal(self.name, found, (node.name or node.op,))
        return found

    def rewrite(self, graph, match, ctx):
        node = match.nodes[0]
        outputs = [t for t in node.outputs if not t.is_empty()]
        remove_node(node, graph)
        for tensor, array in zip(outputs, match.plan):
            replace_uses(tensor, gs.Constant(tensor.name, array), self.index)


class Evaluator:
    """Evaluates one node at a time on onnxruntime CPU with optimizations off."""

    def __init__(self, ctx: PassContext):
        self.ctx = ctx
        meta = ctx.model.meta if ctx.model is not None else None
        self.ir_version = meta.ir_version if meta is not None and meta.ir_version else 8
        self.opsets = list(meta.opset_import) if meta is not None else []
        # Graph inputs with a default initializer (IR >= 4: listing one there is a choice, while
        # IR 3 had every weight listed): the user may feed another value, so a fold never
        # assumes the default (an If on it stays) unless the user pinned it (--pin-input).
        model = ctx.model
        self.defaults = set(model.overridable_inputs) if model is not None and self.ir_version >= 4 else set()

    def evaluate_node(self, node: gs.Node, graph: gs.Graph, index: GraphIndex) -> list[np.ndarray] | str:
        """The node's output values (changing nothing), or why it is not folded."""
        limit = self.ctx.option("fold-constants", "size_limit", self.ctx.fold_size_limit)
        outputs = [t for t in node.outputs if not t.is_empty()]
        if any(index.is_graph_output(t) for t in outputs):
            return "an output is a graph output"
        inputs = [t for t in node.inputs if not t.is_empty()]
        held = [t.name for t in inputs if t.name in self.defaults]
        if held:
            return f"reads the default of input {held[0]}, which may be fed another value (--pin-input {held[0]} fixes it)"
        in_bytes = sum(const_nbytes(t) for t in inputs)
        if in_bytes > limit:
            return f"constant inputs of {in_bytes} bytes exceed fold_size_limit ({limit}); not loaded"
        allowed = min(max(in_bytes, SMALL_OUTPUT_BYTES), limit)
        model = self.one_node_model(node, graph)
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        except Exception:
            inferred = model
        predicted = predicted_bytes(inferred, [t.name for t in outputs])
        if predicted is None and node.op in GENERATOR_OPS:
            return "output size unknown before running it (may be large)"
        if predicted is not None and predicted > allowed:
            return f"output of {predicted} bytes would exceed {allowed} bytes (max(inputs, 64 KiB), fold_size_limit)"
        try:
            results = self.evaluate(inferred, [t.name for t in outputs])
        except Exception as exc:
            return f"onnxruntime cannot evaluate it: {str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__}"
        arrays = []
        for array in results:
            if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
                return "an output is not a numeric tensor"
            arrays.append(np.asarray(array))
        total = sum(a.nbytes for a in arrays)
        if total > allowed:
            return f"output of {total} bytes exceeds {allowed} bytes (max(inputs, 64 KiB), fold_size_limit)"
        if any(not shared_placement_ok(t, graph, index, a.nbytes) for t, a in zip(outputs, arrays)):
            return "read by other (sub)graphs and too large to copy into each"
        return arrays

    def one_node_model(self, node: gs.Node, graph: gs.Graph) -> onnx.ModelProto:
        initializers = []
        seen = set()
        for tensor in node.inputs:
            if tensor.is_empty() or tensor.name in seen:
                continue
            seen.add(tensor.name)
            initializers.append(tensor_proto(tensor))
        outputs = [onnx.helper.make_empty_tensor_value_info(t.name) for t in node.outputs if not t.is_empty()]
        g = onnx.helper.make_graph([OnnxExporter.export_node(node)], "fold", [], outputs, initializers)
        opsets = self.opsets or [onnx.helper.make_opsetid("", graph.opset)]
        model = onnx.helper.make_model(g, opset_imports=opsets)
        # IR 4 at least: below it onnx reads an initializer only when it is also a graph
        # input, so the one-node model would have no typed output (the op is the same).
        model.ir_version = max(self.ir_version, 4)
        return model

    @staticmethod
    def evaluate(model: onnx.ModelProto, names: list[str]) -> list:
        import onnxruntime as ort

        for out in model.graph.output:
            if not out.type.HasField("tensor_type"):
                raise ValueError("output type unknown")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 4
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return session.run(names, {})


def tensor_proto(tensor: gs.Constant) -> onnx.TensorProto:
    """The constant as a self-contained TensorProto (external bytes read; it is small)."""
    values = tensor._values
    if isinstance(values, LazyValues) and not isinstance(values, ExternalValues):
        proto = onnx.TensorProto()
        proto.CopyFrom(values.tensor)
        proto.name = tensor.name
        return proto
    return onnx.numpy_helper.from_array(np.asarray(tensor.values), tensor.name)


def predicted_bytes(model: onnx.ModelProto, names: list[str]) -> int | None:
    """Total output bytes from the one-node model's inferred shapes, None when unknown."""
    infos = {v.name: v for v in list(model.graph.output) + list(model.graph.value_info)}
    total = 0
    for name in names:
        info = infos.get(name)
        if info is None or not info.type.HasField("tensor_type") or not info.type.tensor_type.HasField("shape"):
            return None
        tt = info.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if any(d is None for d in dims) or tt.elem_type == 0:
            return None
        try:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).itemsize
        except (KeyError, TypeError, ValueError):
            return None
        total += int(np.prod(dims, dtype=np.int64)) * itemsize
    return total


PASSES: tuple[type[Pass], ...] = (FoldConstants,)
