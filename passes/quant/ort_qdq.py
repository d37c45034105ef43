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

import re

from types import MappingProxyType
from typing import Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxforge.context import PassContext, Refusal
from onnxforge.model import Model, iter_graphs
from onnxforge.passes.base import Match, Pass, PassResult, Rule, unique_node_names, verdict_of
from onnxforge.passes.matching import DEFAULT_DOMAINS

from .subgraph_pairs import unpair_before_subgraph_reads

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


class SevenBitGemmInput(Rule):
    """The u8 input of a GEMM-based integer kernel put on a 7-bit grid (formats.static_formats,
    formats.narrowed_range): run only for formats with ``narrow_gemm_inputs`` (8-bit s8 weights
    on a CPU without int8 dot products, where VPMADDUBSW adds two u8 x s8 products in int16)."""

    name = "seven-bit-gemm-input"
    anchor_ops = ("Conv", "Gemm", "MatMul")

    def match(self, graph, node):
        if node.domain not in DEFAULT_DOMAINS or len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
            return None
        return None if isinstance(node.inputs[0], gs.Constant) else Match([node], node.inputs[0].name)

    def check(self, graph, match, ctx):
        node = match.nodes[0]
        placed = OrtQdqPlacement().check(graph, match, ctx)
        if placed is not None:
            return self.refusal(f"the node stays float ({placed.reason})", match)
        weight = node.inputs[1]
        if node.op == "Conv" and node.attrs.get("group", 1) > 1 and len(weight.shape) > 1 and weight.shape[1] == 1:
            return self.refusal("depthwise Conv: MLAS's depthwise kernel widens u8 x s8 before it adds (no "
                                "saturation), its input keeps 8 bits", match)
        if match.info not in (ctx.option(PASS_NAME, "ranges") or {}):
            return self.refusal(f"its input {match.info} has no calibrated range", match)
        return None


def narrowed_ranges(graph: gs.Graph, ctx: PassContext) -> tuple[dict, list[tuple[str, ...]]]:
    """The ``ranges`` option with the inputs rule seven-bit-gemm-input accepts in ``graph``
    (the main graph: onnxruntime places Q/DQ there only) narrowed, and the accepted keys."""
    rule, ranges, accepted = SevenBitGemmInput(), dict(ctx.option(PASS_NAME, "ranges") or {}), []
    from .formats import narrowed_range

    for node in list(graph.nodes):
        match = rule.match(graph, node) if node.op in rule.anchor_ops else None
        if match is None:
            continue
        verdict, key = verdict_of(rule, graph, match, ctx)
        if isinstance(verdict, Refusal):
            ctx.refuse(verdict)
            continue
        ranges[match.info] = narrowed_range(*ranges[match.info])
        accepted.append(key[1])
    return ranges, accepted


class OnnxruntimeCall(Pass):
    """A pass wrapping one call of an onnxruntime quantizer (module docstring): its one rule says
    per node what the call is given (``verdicts``); ``call`` makes the quantized model from the
    refused names; the model becomes it."""

    def call(self, ctx: PassContext, excluded: list[str]) -> onnx.ModelProto:  # pragma: no cover - abstract
        raise NotImplementedError

    def tidy(self, graph: gs.Graph) -> None:
        """What the adopted graph needs (nothing by default)."""

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if ctx.model is None or ctx.model.graph is not graph:
            raise ValueError(f"{self.name} runs on a whole model (its graph is handed to onnxruntime)")
        rule = self.rules[0]()
        accepted, excluded = verdicts(rule, graph, ctx)
        if not accepted:
            return PassResult(False)
        adopt(ctx.model, self.call(ctx, excluded))
        ctx.rewrites.extend((self.name, rule.name, names) for names in accepted)
        unique_node_names(graph)
        self.tidy(graph)
        return PassResult.from_counts({rule.name: len(accepted)})


class OrtStaticQdq(OnnxruntimeCall):
    name = PASS_NAME
    description = "onnxruntime's static QDQ placement with calibrated ranges (the quantizer runs it)"
    tolerance = (float("inf"), float("inf"))  # INT8 rounding: judged by the quantizer's accuracy budget
    # listed by ``onnxforge passes``; one call places Q/DQ for all the first accepts, with the
    # inputs the second accepts narrowed (formats that ask for it)
    rules = (OrtQdqPlacement, SevenBitGemmInput)
    options: Mapping = MappingProxyType({
        "ranges": (dict, "tensor -> (low, high) calibrated activation range"),
        "spec": (object, "the format (formats.FormatSpec): types, symmetry, per channel, reduced range"),
        "op_types": (tuple, "op types to quantize (default: the format's)"),
        "exclude": (dict, "node name -> why the caller keeps it float"),
    })

    def call(self, ctx: PassContext, excluded: list[str]) -> onnx.ModelProto:
        spec, ranges = ctx.option(PASS_NAME, "spec"), ctx.option(PASS_NAME, "ranges") or {}
        if getattr(spec, "narrow_gemm_inputs", False):
            ranges, accepted = narrowed_ranges(ctx.model.graph, ctx)
            ctx.rewrites.extend((self.name, SevenBitGemmInput.name, names) for names in accepted)
        return place_qdq(ctx.model.to_proto(), ranges, spec, excluded, ctx.option(PASS_NAME, "op_types"))

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = super().run(graph, ctx)
        narrowed = sum(1 for r in ctx.rewrites if r[:2] == (self.name, SevenBitGemmInput.name))
        return PassResult.from_counts({**result.stats, SevenBitGemmInput.name: narrowed}) if narrowed else result

    def tidy(self, graph: gs.Graph) -> None:
        # onnxruntime appends Q/DQ after their readers; the float weights it replaced stay unread
        graph.cleanup(remove_unused_graph_inputs=False).toposort()


def verdicts(rule: Rule, graph: gs.Graph, ctx: PassContext, graphs=None) -> tuple[list[tuple[str, ...]], list[str]]:
    """The nodes (keys) ``rule`` accepts in ``graphs`` (default: ``graph`` and its subgraphs), and the names of
    those it refuses (an unnamed one as ``op:first output``; each refusal, with its reason, handed to ``ctx``;
    a rewrite the pass manager rolled back is refused): what a pass wrapping one call (of onnxruntime's
    quantizer, baseline_rules.py's) hands it as accepted and as excluded."""
    accepted: list[tuple[str, ...]] = []
    excluded: list[str] = []
    for g in (iter_graphs(graph) if graphs is None else graphs):
        for node in list(g.nodes):
            if rule.anchor_ops and node.op not in rule.anchor_ops:
                continue
            match = rule.match(g, node)
            if match is None:
                continue
            verdict, key = verdict_of(rule, g, match, ctx)
            if isinstance(verdict, Refusal):
                ctx.refuse(verdict)
                excluded.extend(key[1])
            else:
                accepted.append(key[1])
    return accepted, excluded


def place_qdq(model: onnx.ModelProto, ranges: Mapping[str, tuple[float, float]], spec, exclude: list[str],
              op_types: tuple[str, ...] | None) -> onnx.ModelProto:
    """onnxruntime's QDQQuantizer on ``model`` (a copy) with ``ranges`` as activation ranges.
    A tensor the quantizer wants a range for that calibration did not see (made in an If
    branch, or a constant it did not record) keeps the nodes reading and writing it float:
    they join ``exclude`` and the quantizer reruns, at most MAX_UNRANGED_RETRIES times.
    Pairs onnxruntime cannot load before a subgraph read are then dropped (the registered
    pass unpair-before-subgraph-reads, subgraph_pairs.py)."""
    exclude = list(exclude)
    for retry in range(MAX_UNRANGED_RETRIES + 1):
        try:
            placed = _place_qdq(model, ranges, spec, exclude, op_types)
            break
        except ValueError as exc:
            found = re.search(r"Quantization parameters are not specified for param (\S+?)\.? In static mode", str(exc))
            touching = [n.name for n in model.graph.node if n.name and n.name not in exclude
                        and (found.group(1) in n.input or found.group(1) in n.output)] if found else []
            if not touching or retry == MAX_UNRANGED_RETRIES:
                raise
            exclude += touching
    unpair_before_subgraph_reads(placed)
    return placed


MAX_UNRANGED_RETRIES = 16


def _place_qdq(model: onnx.ModelProto, ranges: Mapping[str, tuple[float, float]], spec, exclude: list[str],
               op_types: tuple[str, ...] | None) -> onnx.ModelProto:
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


def adopt(model: Model, proto: onnx.ModelProto) -> None:
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
