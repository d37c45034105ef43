"""onnxruntime's static QDQ placement as a registered pass: ``onnxruntime-qdq``, rule
``onnxruntime-qdq-placement`` (formats.static_qdq runs it).

What it writes: for each accepted node, QuantizeLinear -> DequantizeLinear pairs on its
float inputs and outputs with the calibrated ranges (``ranges`` option: tensor -> (low,
high)), weights stored as integers (per output channel when the format says so) and
biases as int32 with scale = input scale * weight scale; x ~= (q - z) * s with
q = clamp(round(x / s) + z). The provider then fuses DQ -> op -> Q into an integer kernel
(formats.py says which formats each provider gets).

Why it is wrapped and not written as rules of its own: the placement is onnxruntime's
QDQQuantizer, a black box that places Q/DQ for the whole graph in one call (it shares one
Q/DQ between readers of a tensor, propagates scales across data movement, quantizes
biases from the scales of both inputs), so the graph change cannot be cut into one
rewrite per node. The rule states, node by node, what that call will be given and what
it will not, with the reason (``--explain`` shows it): a node of an op type the format
does not quantize, a node the caller keeps float (the quantization plan's exclusions,
with their reasons), a node inside a subgraph (onnxruntime's quantizer places Q/DQ in the
main graph only), a node the pass manager rolled back. Every refused node is handed to
onnxruntime as excluded; the accepted ones are this pass's rewrites. The result replaces
the graph, and the pass's cleanup drops what onnxruntime left unread (the float originals
of the quantized weights) and orders the nodes (onnxruntime appends Q/DQ after their
readers).

Exactness: INT8 rounding changes numbers by design; the quantizer judges the result on
the model's accuracy (its budget), not elementwise.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxforge.context import PassContext, Refusal
from onnxforge.model import Model, iter_graphs
from onnxforge.passes.base import Match, Pass, PassResult, Rule, rewrite_key, unique_node_names
from onnxforge.passes.matching import DEFAULT_DOMAINS

PASS_NAME = "onnxruntime-qdq"


class OrtQdqPlacement(Rule):
    """A node onnxruntime's QDQ quantizer will place Q/DQ around (check: or why not)."""

    name = "onnxruntime-qdq-placement"

    def match(self, graph, node):
        if node.op in ("QuantizeLinear", "DequantizeLinear", "Constant") and node.domain in DEFAULT_DOMAINS:
            return None
        return Match([node])

    def check(self, graph, match, ctx):
        node = match.nodes[0]
        spec = ctx.option(PASS_NAME, "spec")
        op_types = ctx.option(PASS_NAME, "op_types") or spec.op_types
        if node.op not in op_types:
            return self.refusal(f"{node.op} is not among the op types this format quantizes", match)
        kept = ctx.option(PASS_NAME, "exclude") or {}
        if node.name and node.name in kept:
            return self.refusal(f"kept float: {kept[node.name]}", match)
        if ctx.model is not None and graph is not ctx.model.graph:
            return self.refusal("inside a subgraph: onnxruntime's QDQ quantizer places Q/DQ in the main graph only", match)
        return None


class OrtStaticQdq(Pass):
    name = PASS_NAME
    description = "onnxruntime's static QDQ placement with calibrated ranges (the quantizer runs it)"
    tolerance = (float("inf"), float("inf"))  # INT8 rounding: judged by the quantizer's accuracy budget
    rules = (OrtQdqPlacement,)  # listed by ``onnxforge passes``; one call places Q/DQ for all it accepts
    options: Mapping = MappingProxyType({
        "ranges": (dict, "tensor -> (low, high) calibrated activation range"),
        "spec": (object, "the format (formats.FormatSpec): types, symmetry, per channel, reduced range"),
        "op_types": (tuple, "op types to quantize (default: the format's)"),
        "exclude": (dict, "node name -> why the caller keeps it float"),
    })

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if ctx.model is None or ctx.model.graph is not graph:
            raise ValueError(f"{PASS_NAME} runs on a whole model (its graph is handed to onnxruntime)")
        rule = self.rules[0]()
        accepted: list[tuple[str, ...]] = []
        excluded: list[str] = []
        for g in iter_graphs(graph):
            for node in list(g.nodes):
                match = rule.match(g, node)
                if match is None:
                    continue
                verdict = rule.check(g, match, ctx)
                key = rewrite_key(rule.name, match)
                if verdict is None and key in ctx.denied_rewrites:
                    verdict = Refusal(rule.name, "rolled back: this rewrite broke verification", key[1])
                if isinstance(verdict, Refusal):
                    ctx.refuse(verdict)
                    excluded.extend(n for n in match.names)
                else:
                    accepted.append(key[1])
        if not accepted:
            return PassResult(False)
        quantized = place_qdq(ctx.model.to_proto(), ctx.option(PASS_NAME, "ranges") or {},
                              ctx.option(PASS_NAME, "spec"), excluded, ctx.option(PASS_NAME, "op_types"))
        _adopt(ctx.model, quantized)
        ctx.rewrites.extend((self.name, rule.name, names) for names in accepted)
        unique_node_names(graph)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult.from_counts({rule.name: len(accepted)})


def place_qdq(model: onnx.ModelProto, ranges: Mapping[str, tuple[float, float]], spec, exclude: list[str],
              op_types: tuple[str, ...] | None) -> onnx.ModelProto:
    """onnxruntime's QDQQuantizer on ``model`` (a copy) with ``ranges`` as activation ranges."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

    from .formats import _copy, _qtype, _with_inferred_types, weight_overrides

    data = {
        name: TensorData(lowest=np.array(lo, dtype=np.float32), highest=np.array(hi, dtype=np.float32))
        for name, (lo, hi) in ranges.items()
    }
    # the types of contrib-op outputs (see ortsession.infer_shapes): onnxruntime's own
    # inference keeps them, and without them it skips those tensors and fails on the
    # biases they feed
    extra = {}
    overrides = weight_overrides(model, spec)
    if overrides:
        extra["TensorQuantOverrides"] = overrides
    quantizer = QDQQuantizer(
        _with_inferred_types(_copy(model)),
        spec.per_channel,
        spec.reduce_range,
        _qtype(spec.weight_type),
        _qtype(spec.activation_type),
        TensorsData(CalibrationMethod.MinMax, data),
        None,
        list(exclude),
        list(op_types if op_types is not None else spec.op_types),
        {
            "ActivationSymmetric": spec.symmetric_activations,
            "WeightSymmetric": True,
            "AddQDQPairToWeight": False,  # weights stored as int8, no float copy
            # Tensors feeding contrib ops (fused graphs) have no inferred type; they are float.
            "DefaultTensorType": onnx.TensorProto.FLOAT,
            **extra,
        },
    )
    quantizer.quantize_model()
    return quantizer.model.model


def _adopt(model: Model, proto: onnx.ModelProto) -> None:
    """``model`` becomes ``proto`` (graph and model fields), in place: the pass manager and
    the caller hold ``model`` and its graph."""
    new = Model.from_proto(proto)
    graph = model.graph
    graph.nodes, graph.inputs, graph.outputs = new.graph.nodes, new.graph.inputs, new.graph.outputs
    graph.opset, graph.import_domains = new.graph.opset, new.graph.import_domains
    model.meta.CopyFrom(new.meta)
    model.overridable_inputs, model.input_order = new.overridable_inputs, new.input_order
    model.value_types = new.value_types


PASSES = (OrtStaticQdq,)
