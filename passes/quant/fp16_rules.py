"""The float16 rewrite as registered rules: one node at a time, the invariant being that
every tensor of the original graph keeps its name and its float32 type.

``node-to-fp16`` runs a node in float16: it reads each float32 input as float16 (an
initializer through a float16 copy ``W_fp16`` stored once, an activation through
``Cast(x, to=FLOAT16)``, shared by its readers) and writes each float32 output ``y`` as
``y_fp16`` followed by ``Cast(y_fp16, to=FLOAT) -> y``. A float16 node reading a tensor
made by such a cast reads the cast's float16 input instead: fp16 -> fp32 -> fp16 is
exact, so casts remain only where a float32 node meets a float16 one, and casts nobody
reads die in the cleanup. Nodes are visited in topological order, so a producer is
converted before its readers. Float32 nodes need no change (the names they read still
hold float32), nor do the If/Loop/Scan bodies reading outer tensors.

Its check refuses, with the reason, a node that holds subgraphs (bodies stay as written),
a sequence or optional op (the element type must agree along the sequence), one whose schema (ONNX's, or onnxruntime's for contrib ops such as DynamicQuantizeLSTM)
takes float but not float16 for an input or output it uses, one reading an initializer
fp16 cannot hold (finite |x| > 65504, wholly below fp16's normal range, relative
rounding error above 1e-3; option ``check_initializers``), and any node the caller keeps
float32 with its reason (option ``keep``: activations past 65504 on the calibration data,
no float16 kernel on the CPU provider, returned by the accuracy budget).

With option ``io``, ``input-to-fp16`` makes the float32 graph inputs float16 (readers
that stay float32 read ``Cast(x, to=FLOAT)``) and ``output-to-fp16`` the float32 graph
outputs (the cast back before an output is dropped, or a float32 producer's output is
cast). Inputs the ONNX spec keeps float32 whatever T is (Resize roi/scales) stay so.
The pass runs on the main graph only; convert_fp16 (fp16.py) runs it and checks the result.

Memory: a float32 weight the model reads from a proto or a file (lazy values) is never
loaded into the graph: its float16 copy is ``HalfValues``, converted from it whenever
read, so the rewrite holds no weight array at all, and ``to_fp16`` writes each weight's
float16 bytes straight into the exported proto, one weight at a time (Llama 570M: the
float baseline plus the float16 model, 1.7x its float weights at the peak, instead of
the float32 weights loaded again, their float16 arrays, and the export, 3.6x). A weight held as an
array is converted at once (the float32 array is then dropped).
"""
from __future__ import annotations

import dataclasses
from types import MappingProxyType, SimpleNamespace

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxforge.context import PassContext
from onnxforge.shared_weights import weight_array
from onnxforge.passes.base import Match, PassResult, Rule, RulePass, unique_node_names

from .schemas import float_only_formal, op_schema

PASS_NAME = "convert-to-fp16"
FP16_MAX = 65504.0
FP16_MIN_NORMAL = 6.104e-5
# fp16 rounding alone gives ~2e-4 relative (L2) error on typical weights
FP16_MAX_RELATIVE_ERROR = 1e-3
# (op type, input index) that the ONNX spec keeps float32 whatever T is.
FLOAT32_INPUTS = {("Resize", 1), ("Resize", 2), ("Upsample", 1)}


def initializer_fp16_problem(values: np.ndarray) -> str | None:
    """Why fp16 cannot hold ``values``, or None. A few elements of a weight below
    fp16's smallest subnormal flush to zero harmlessly (a 40M-element weight
    always has some); what matters is a finite value past 65504, a tensor that
    lies wholly below fp16's normal range (an epsilon like 1e-6 or 1e-12 would
    lose its digits or become 0), or a relative rounding error well above
    fp16's own (~3e-4)."""
    finite = np.abs(values[np.isfinite(values)]).astype(np.float64)
    if not finite.size or not finite.max():
        return None
    if finite.max() > FP16_MAX:
        return f"overflows fp16 (max |x| {finite.max():.3g})"
    if finite.max() < FP16_MIN_NORMAL:
        return f"underflows fp16 (max |x| {finite.max():.3g} below {FP16_MIN_NORMAL:.3g})"
    rounded = finite.astype(np.float16).astype(np.float64)
    error = float(np.linalg.norm(finite - rounded) / np.linalg.norm(finite))
    if error > FP16_MAX_RELATIVE_ERROR:
        return f"loses precision in fp16 (relative error {error:.2g})"
    return None


def schema_fp16_problem(op_type: str, domain: str, version: int, inputs, outputs) -> str | None:
    """Why a node's schema rules float16 out (a float-only input or output it uses), or None;
    None too for an op neither onnx nor onnxruntime knows (left to the kernel check)."""
    domain = "" if domain == "ai.onnx" else domain
    found = op_schema(op_type, domain, version)
    if found is None:
        return None
    schema, source = found
    node = SimpleNamespace(input=list(inputs), output=list(outputs))
    formal = float_only_formal(schema, node, [i for op, i in FLOAT32_INPUTS if op == op_type])
    if formal is None:
        return None
    op = f"{domain}.{op_type}" if domain else op_type
    return f"{source} {op}-{schema.since_version} takes no float16 ({formal})"


# Ops that hold tensors in a sequence or optional: the element type is fixed where the
# sequence is made (SequenceEmpty's dtype, its first tensor) and must agree at every node
# reading or extending it, which a one-node conversion cannot see.
CONTAINER_OPS = frozenset({
    "SequenceEmpty", "SequenceConstruct", "SequenceInsert", "SequenceAt", "SequenceErase", "SequenceLength",
    "SequenceMap", "SplitToSequence", "ConcatFromSequence", "Optional", "OptionalGetElement", "OptionalHasElement",
})
CONTAINER_REASON = "sequence/optional ops stay float32 (the element type must agree along the sequence)"


def holds_graphs(node: gs.Node) -> bool:
    return any(isinstance(v, gs.Graph) or (isinstance(v, list) and v and isinstance(v[0], gs.Graph))
               for v in node.attrs.values())


def _float32(tensor) -> bool:
    if not tensor.name or tensor.dtype is None:
        return False
    try:
        return np.dtype(tensor.dtype) == np.float32
    except TypeError:  # an onnx element type graphsurgeon holds as an int
        return tensor.dtype == onnx.TensorProto.FLOAT


def _is_fp16(tensor) -> bool:
    return tensor.dtype is not None and not isinstance(tensor.dtype, int) and np.dtype(tensor.dtype) == np.float16


def _cast(name: str, source, to: int, dtype, shape, graph: gs.Graph, out=None) -> gs.Variable:
    out = out or gs.Variable(name + ("_to_fp16" if to == onnx.TensorProto.FLOAT16 else "_to_fp32"), dtype, shape)
    suffix = "fp16" if to == onnx.TensorProto.FLOAT16 else "fp32"
    graph.nodes.append(gs.Node("Cast", name=f"{name}_cast_{suffix}", attrs={"to": to}, inputs=[source], outputs=[out]))
    return out


def _float16_source(tensor) -> gs.Tensor | None:
    """The float16 tensor ``tensor`` is an exact float32 copy of (it is made by Cast to FLOAT of one)."""
    made_by = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    if made_by is not None and made_by.op == "Cast" and made_by.attrs.get("to") == onnx.TensorProto.FLOAT \
            and _is_fp16(made_by.inputs[0]):
        return made_by.inputs[0]
    return None


@dataclasses.dataclass(frozen=True)
class FloatSlots:
    inputs: tuple[int, ...]  # input positions read as float16
    outputs: tuple[int, ...]  # output positions written as float16


class NodeToFp16(Rule):
    name = "node-to-fp16"

    def __init__(self) -> None:
        self._halves: dict[str, gs.Tensor] = {}  # float32 tensor -> its float16 copy, this run only

    def match(self, graph, node):
        if node.op == "Cast" and (node.attrs.get("to") == onnx.TensorProto.FLOAT16 or (
                node.attrs.get("to") == onnx.TensorProto.FLOAT and node.inputs and _is_fp16(node.inputs[0]))):
            return None  # a cast this pass inserted (a second run finds nothing left to do), or one to fp16 already
        slots = FloatSlots(tuple(i for i, t in enumerate(node.inputs) if _float32(t) and (node.op, i) not in FLOAT32_INPUTS),
                           tuple(j for j, t in enumerate(node.outputs) if _float32(t)))
        return Match([node], slots) if slots.inputs or slots.outputs else None

    def check(self, graph, match, ctx):
        node, slots = match.nodes[0], match.info
        kept = ctx.option(PASS_NAME, "keep", {}).get(node.name)
        if kept:
            return self.refusal(kept, match)
        if holds_graphs(node):
            return self.refusal(f"{node.op} holds a subgraph: its body is not converted", match)
        if node.op in CONTAINER_OPS and (node.domain or "") in ("", "ai.onnx"):
            return self.refusal(CONTAINER_REASON, match)
        version = (ctx.model.opset(node.domain or "") if ctx.model is not None else None) or 1
        why = schema_fp16_problem(node.op, node.domain or "", version, [t.name for t in node.inputs],
                                  [t.name for t in node.outputs])
        if why:
            return self.refusal(why, match)
        if ctx.option(PASS_NAME, "check_initializers", True):
            for i in slots.inputs:
                t = node.inputs[i]
                why = isinstance(t, gs.Constant) and initializer_fp16_problem(weight_array(t))
                if why:
                    return self.refusal(f"initializer {t.name}: {why}", match)
        return None

    def rewrite(self, graph, match, ctx):
        node, slots = match.nodes[0], match.info
        overridable = set(ctx.model.overridable_inputs) if ctx.model is not None else set()
        for i in slots.inputs:
            node.inputs[i] = self._half(graph, node.inputs[i], overridable)
        for j in slots.outputs:
            y = node.outputs[j]
            y16 = gs.Variable(y.name + "_fp16", np.float16, y.shape)
            node.outputs[j] = y16
            _cast(y.name, y16, onnx.TensorProto.FLOAT, np.float32, y.shape, graph, out=y)
        if node.op == "Cast" and node.attrs.get("to") == onnx.TensorProto.FLOAT:
            node.attrs["to"] = onnx.TensorProto.FLOAT16
        for key, value in node.attrs.items():
            if isinstance(value, gs.Constant) and np.asarray(value.values).dtype == np.float32:
                node.attrs[key] = gs.Constant(value.name, np.asarray(value.values).astype(np.float16))

    def _half(self, graph: gs.Graph, tensor, overridable: set[str]) -> gs.Tensor:
        if tensor.name in self._halves:
            return self._halves[tensor.name]
        if isinstance(tensor, gs.Constant):
            values = HalfValues(tensor) if isinstance(tensor._values, LazyValues) else weight_array(tensor).astype(np.float16)
            half = gs.Constant(tensor.name + "_fp16", values)
            if tensor.name in overridable and tensor not in graph.inputs:
                graph.inputs.append(tensor)  # the input keeps its default (else it becomes required)
        else:
            half = _float16_source(tensor) or _cast(tensor.name, tensor, onnx.TensorProto.FLOAT16, np.float16,
                                                    tensor.shape, graph)
        self._halves[tensor.name] = half
        return half


class HalfValues(LazyValues):
    """The float16 values of a float32 constant held lazily (from a proto or a file),
    converted whenever read and never kept: ``load()`` gives them as an array, ``tensor``
    as a whole TensorProto (what graphsurgeon and onnxforge's writers read of lazy values)."""

    def __init__(self, source: gs.Constant):  # no super(): it would read a TensorProto
        self.source = source
        self.shape = tuple(source.shape)
        self.dtype = np.dtype(np.float16)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * 2

    def load(self) -> np.ndarray:
        return weight_array(self.source).astype(np.float16)

    @property
    def tensor(self) -> onnx.TensorProto:
        return onnx.numpy_helper.from_array(self.load())

    def __str__(self) -> str:
        return f"HalfValues(shape={self.shape}, of {self.source.name})"


def fill_half_values(proto: onnx.ModelProto, halves: list[gs.Constant]) -> None:
    """Write the float16 bytes of ``halves`` (constants of ``HalfValues``, exported as their
    headers: ``shared_weights.staged_headers``) into ``proto``'s initializers of their names,
    one weight at a time."""
    by_name = {c.name: c for c in halves}
    for init in proto.graph.initializer:
        const = by_name.get(init.name)
        if const is not None:
            init.raw_data = const._values.load().astype("<f2", copy=False).tobytes()


def _repoint(readers: list[tuple[gs.Node, int]], tensor: gs.Tensor) -> None:
    for reader, i in readers:
        reader.inputs[i] = tensor


def _readers(tensor: gs.Tensor, skip: gs.Node | None = None) -> list[tuple[gs.Node, int]]:
    return [(r, i) for r in list(tensor.outputs) if r is not skip for i, t in enumerate(r.inputs) if t is tensor]


class InputToFp16(Rule):
    """A float32 graph input becomes float16; its readers read ``Cast(x, to=FLOAT)`` (which a
    float16 reader skips)."""
    name = "input-to-fp16"

    def match(self, graph, node):
        inputs = {id(t) for t in graph.inputs}
        xs = tuple({id(t): t for t in node.inputs if isinstance(t, gs.Variable) and id(t) in inputs and _float32(t)}.values())
        return Match([node], xs) if xs else None

    def rewrite(self, graph, match, ctx):
        for x in match.info:
            readers = _readers(x)
            x.dtype = np.float16
            _repoint(readers, _cast(x.name, x, onnx.TensorProto.FLOAT, np.float32, x.shape, graph))


class OutputToFp16(Rule):
    """A float32 graph output becomes float16: a cast back before it is dropped (its
    float16 input takes the output's name), else the float32 producer's output is cast."""
    name = "output-to-fp16"

    def match(self, graph, node):
        outputs = {id(t) for t in graph.outputs}
        ys = tuple(t for t in node.outputs if id(t) in outputs and _float32(t))
        return Match([node], ys) if ys else None

    def rewrite(self, graph, match, ctx):
        for y in match.info:
            self._output(graph, match.nodes[0], y)

    @staticmethod
    def _output(graph: gs.Graph, node: gs.Node, y: gs.Variable) -> None:
        float32_readers = _readers(y)
        source = _float16_source(y)
        if source is not None and source.inputs:  # node is a cast back: its producer writes y
            made_by = source.inputs[0]
            _repoint(_readers(source, skip=node), y)
            node.inputs.clear()
            node.outputs.clear()
            made_by.outputs[[id(t) for t in made_by.outputs].index(id(source))] = y
        else:
            y32 = gs.Variable(y.name + "_fp32_out", np.float32, y.shape)
            node.outputs[[id(t) for t in node.outputs].index(id(y))] = y32
            _cast(y.name, y32, onnx.TensorProto.FLOAT16, np.float16, y.shape, graph, out=y)
            graph.nodes[-1].name = y.name + "_cast_out"
        y.dtype = np.float16
        if float32_readers:
            _repoint(float32_readers, _cast(y.name, y, onnx.TensorProto.FLOAT, np.float32, y.shape, graph))


class ConvertToFp16(RulePass):
    """The main graph only: bodies of If/Loop/Scan stay as written (their node is kept float32)."""
    name = PASS_NAME
    description = "float32 nodes -> float16 with casts where float32 ones meet them (convert-fp16 runs it)"
    # fp16 rounding is judged by convert_fp16's accuracy budget against the float model
    tolerance = (float("inf"), float("inf"))
    rules = (InputToFp16, NodeToFp16, OutputToFp16)
    options = MappingProxyType({
        "keep": (dict, "node name -> why it stays float32 (calibration overflow, no float16 kernel, accuracy budget)"),
        "float_tensors": (list, "names of the float32 tensors (from shape inference): without it only tensors the graph types are converted"),
        "io": (bool, "graph inputs and outputs become float16 too"),
        "check_initializers": (bool, "keep float32 the nodes reading an initializer fp16 cannot hold (default true)"),
    })

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        names = set(ctx.option(PASS_NAME, "float_tensors", ()))
        for tensor in graph.tensors().values():  # types shape inference found, where the graph has none
            if tensor.name in names and tensor.dtype is None:
                tensor.dtype = np.float32
        rules = self.rules if ctx.option(PASS_NAME, "io", False) else (NodeToFp16,)
        counts = {rule.name: self._apply(rule(), graph, ctx, self.name) for rule in rules}
        unique_node_names(graph)
        graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=False).toposort(recurse_subgraphs=False)
        return PassResult.from_counts(counts)


PASSES = (ConvertToFp16,)
