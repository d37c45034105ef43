"""Activation Q -> DQ pairs onnxruntime cannot load before a subgraph read, dropped: the pass
``unpair-before-subgraph-reads``, rule ``unpair-qdq-before-subgraph-read`` (the static
placement runs it: ort_qdq.place_qdq and formats.static_qdq).

onnxruntime 1.31 aborts the process (a vector index assertion) building any optimized
session of Q -> DQ -> Transpose -> Reshape -> a tensor an If branch reads (onnx's expanded
AffineGrid, quantized): its QDQ propagation moves the pair across the ops in
PROPAGATED_OPS and then fails on the subgraph's read. So a DQ whose output reaches a read
inside an If/Loop/Scan body through those ops only (a bounded walk) is dropped: its readers
read the float tensor its Q quantized, x instead of (round(x / s) + z - z) s, and a Q
nothing reads any more goes with it. That undoes one rounding, so it is not exact: the
quantizer judges the result on the model's accuracy, as every placement.

Refused (``--explain``): a pair no subgraph reads through those ops (onnxruntime loads it), a
pair inside a subgraph. Not matched: a DQ not fed by a Q (a weight's: no float copy to read
instead), a DQ writing a graph output.
"""
from __future__ import annotations

import dataclasses

import onnx
import onnx_graphsurgeon as gs

from onnxforge.passes.base import Match, Rule, RulePass
from onnxforge.passes.matching import DEFAULT_DOMAINS

PASS_NAME = "unpair-before-subgraph-reads"
# Ops onnxruntime moves Q/DQ across (its QDQ propagation) at session creation.
PROPAGATED_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Slice", "Gather", "Expand",
                            "Tile", "MaxPool", "Resize", "Split", "Concat", "DepthToSpace", "SpaceToDepth", "Identity"})
MAX_DEPTH = 16


@dataclasses.dataclass(frozen=True)
class ActivationPair:
    quantize: gs.Node  # Q, which reads the float tensor x
    float_tensor: gs.Tensor  # x


class UnpairBeforeSubgraphRead(Rule):
    name = "unpair-qdq-before-subgraph-read"
    anchor_ops = ("DequantizeLinear",)

    def match(self, graph, node):
        if node.domain not in DEFAULT_DOMAINS or not node.inputs or not node.outputs:
            return None
        source = node.inputs[0]
        q = source.inputs[0] if isinstance(source, gs.Variable) and len(source.inputs) == 1 else None
        if q is None or q.op != "QuantizeLinear" or q.domain not in DEFAULT_DOMAINS or not q.inputs:
            return None
        if any(t is node.outputs[0] for t in graph.outputs):
            return None
        return Match([node], ActivationPair(q, q.inputs[0]))

    def check(self, graph, match, ctx):
        if ctx.model is not None and graph is not ctx.model.graph:
            return self.refusal("inside a subgraph: the abort this avoids is of main-graph pairs", match)
        main = {id(n) for n in graph.nodes}
        if not _reaches_subgraph(match.nodes[0].outputs[0], main, 0):
            return self.refusal("no subgraph reads its output through ops onnxruntime moves Q/DQ across "
                                "(onnxruntime loads the pair)", match)
        return None

    def rewrite(self, graph, match, ctx):
        dq, x = match.nodes[0], match.info.float_tensor
        for reader in list(dq.outputs[0].outputs):  # the subgraph's readers too: gs shares outer tensors
            for i, tensor in enumerate(reader.inputs):
                if tensor is dq.outputs[0]:
                    reader.inputs[i] = x
        dq.outputs.clear()  # the DQ, and a Q nothing else reads, go with the pass's cleanup


def _reaches_subgraph(tensor: gs.Tensor, main: set[int], depth: int) -> bool:
    """Whether a node outside the main graph (``main``: its nodes' ids) reads ``tensor``, or the output
    of a main-graph reader of it reached through PROPAGATED_OPS only (at most MAX_DEPTH deep)."""
    if depth > MAX_DEPTH:
        return False
    for reader in tensor.outputs:
        if id(reader) not in main:  # gs hands a subgraph the outer tensor itself
            return True
        if reader.op in PROPAGATED_OPS and any(_reaches_subgraph(out, main, depth + 1) for out in reader.outputs):
            return True
    return False


class UnpairBeforeSubgraphReads(RulePass):
    name = PASS_NAME
    description = "Q -> DQ pairs onnxruntime would abort on before a subgraph read dropped (the quantizer runs it)"
    tolerance = (float("inf"), float("inf"))  # undoes a rounding: judged by the quantizer's accuracy budget
    rules = (UnpairBeforeSubgraphRead,)


def unpair_before_subgraph_reads(model: onnx.ModelProto) -> int:
    """Run the pass on ``model`` in place (a no-op, the proto untouched, when no subgraph is in the main
    graph); returns how many Q/DQ nodes were dropped."""
    from .registered import apply_passes

    if not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in model.graph.node
               for a in n.attribute):
        return 0
    out, fired = apply_passes(model, (PASS_NAME,), max_iterations=1)
    if not fired:
        return 0
    before = _qdq_count(model)
    model.CopyFrom(out)
    return before - _qdq_count(model)


def _qdq_count(model: onnx.ModelProto) -> int:
    return sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


PASSES = (UnpairBeforeSubgraphReads,)
