"""onnxruntime's dynamic MatMul quantizer as a registered pass: ``onnxruntime-dynamic``, rule
``onnxruntime-dynamic-matmul`` (``quantize``'s INT8 dynamic format and ``--bits auto``'s
INT8 candidate run it: formats.spec_for says when).

What it writes: for each accepted MatMul y = x W with a constant float weight W,
DynamicQuantizeLinear on x (u8, one scale and zero point per call: s = (max(x, 0) -
min(x, 0)) / 255), W stored as integers per output column (s_w, z_w; the format says u8
or s8), MatMulInteger -> Cast -> Mul by s * s_w: y ~= s s_w (q_x - z)(q_w - z_w).

Why it is wrapped and not written as rules of its own: the rewrite is onnxruntime's
ONNXQuantizer (IntegerOps mode), a black box that quantizes the whole graph in one call,
as the static placement is (ort_qdq.py, whose docstring says more). The rule states, node
by node, what that call is given and what it is not, with the reason (``--explain``
shows it): a Gemm onnxruntime keeps as it is (alpha or beta not 1, or transA; it writes
the others as MatMul ``<name>_MatMul`` (+ Add) and quantizes that, so a refused Gemm is
excluded under both names), a MatMul or Gemm whose second input is not a constant (activation x activation: onnxruntime
quantizes constant weights only) or not float, a node inside a subgraph (the quantizer
does not enter them), a MatMul whose input has outlier channels on the calibration data
(``input_stats`` and ``max_input_error``: the decision of outliers.outlier_reason, with
its figures), a node the caller keeps float (the plan's exclusions and the accuracy
search's), a node the pass manager rolled back. Refused nodes are handed to onnxruntime
as excluded; the accepted ones are this pass's rewrites.

Memory: the model onnxruntime quantizes is this pass's own export of the graph (weights in
external files read into it here), changed in place, never copied again: on Llama 570M
(2.2 GB of weights) the peak is the caller's model, this export and the integer weights.

Exactness: u8 rounding of activations per call changes numbers by design; the quantizer
judges the result on the model's accuracy (its budget), not elementwise.
"""
from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxforge.context import PassContext
from onnxforge.model import iter_graphs
from onnxforge.opsets import one_default_domain
from onnxforge.passes.base import Match, Rule
from onnxforge.passes.matching import DEFAULT_DOMAINS

from .ort_qdq import OnnxruntimeCall
from .outliers import outlier_reason

PASS_NAME = "onnxruntime-dynamic"
FLOAT_WEIGHTS = (np.dtype(np.float32), np.dtype(np.float16))  # what onnxruntime quantizes as a weight


@dataclasses.dataclass(frozen=True)
class WeightedProduct:
    activation: gs.Tensor  # x, quantized per call
    weight: gs.Tensor  # W, a constant for the rule to accept it


class OrtDynamicMatMul(Rule):
    """A MatMul onnxruntime's dynamic quantizer will quantize (check: or why not)."""

    name = "onnxruntime-dynamic-matmul"
    anchor_ops = ("MatMul", "Gemm")

    def match(self, graph, node):
        if node.domain not in DEFAULT_DOMAINS or len(node.inputs) < 2:
            return None
        return Match([node], WeightedProduct(node.inputs[0], node.inputs[1]))

    def check(self, graph, match, ctx):
        node, weight = match.nodes[0], match.info.weight
        if ctx.model is not None and graph is not ctx.model.graph:
            return self.refusal("inside a subgraph: onnxruntime's dynamic quantizer quantizes the main graph only", match)
        if node.op == "Gemm":
            alpha, beta, trans_a = node.attrs.get("alpha", 1.0), node.attrs.get("beta", 1.0), node.attrs.get("transA", 0)
            if (alpha, beta, trans_a) != (1.0, 1.0, 0):
                return self.refusal(f"Gemm with alpha {alpha:g}, beta {beta:g}, transA {trans_a}: onnxruntime's dynamic "
                                    "quantizer quantizes only alpha = beta = 1, transA = 0", match)
        if not isinstance(weight, gs.Constant):
            return self.refusal(f"activation x activation product: {weight.name} is not a constant "
                                "(onnxruntime quantizes constant weights only)", match)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(weight.dtype) if isinstance(weight.dtype, int) else np.dtype(weight.dtype)
        if dtype not in FLOAT_WEIGHTS:
            return self.refusal(f"its weight {weight.name} is {dtype}, not float", match)
        max_error = ctx.option(PASS_NAME, "max_input_error")
        if max_error is not None:
            stats = (ctx.option(PASS_NAME, "input_stats") or {}).get(match.info.activation.name)
            outliers = outlier_reason(match.info.activation.name, stats, max_error)
            if outliers is not None:
                return self.refusal(outliers, match)
        kept = (ctx.option(PASS_NAME, "exclude") or {}).get(node.name)
        if node.name and kept is not None:
            return self.refusal(f"kept float: {kept}", match)
        return None


class OrtDynamicQuant(OnnxruntimeCall):
    name = PASS_NAME
    description = "onnxruntime's dynamic MatMul quantization: u8 activations per call, integer weights (the quantizer runs it)"
    tolerance = (float("inf"), float("inf"))  # INT8 rounding: judged by the quantizer's accuracy budget
    rules = (OrtDynamicMatMul,)  # listed by ``onnxforge passes``; one call quantizes all it accepts
    options: Mapping = MappingProxyType({
        "spec": (object, "the format (formats.FormatSpec; default: the CPU dynamic format for this machine)"),
        "exclude": (dict, "node name -> why the caller keeps it float"),
        "input_stats": (dict, "activation tensor -> outliers.InputStats measured on calibration feeds"),
        "max_input_error": (float, "keep float a MatMul whose input_stats error exceeds this (outliers.py)"),
    })

    def call(self, ctx: PassContext, excluded: list[str]) -> onnx.ModelProto:
        from .formats import dynamic_matmul_in_place, spec_for
        from .ortsession import with_external_data_loaded

        # onnxruntime writes a Gemm as MatMul "<name>_MatMul" (+ Add) before it looks at the
        # names it excludes: a refused Gemm is excluded under that name too
        gemms = {n.name for g in iter_graphs(ctx.model.graph) for n in g.nodes if n.op == "Gemm" and n.name}
        excluded = excluded + [f"{name}_MatMul" for name in excluded if name in gemms]
        source = ctx.model.source
        # this export is the quantizer's to change: weights read once, no further copy. The
        # nodes keep their order (a model's order is topological): onnxruntime's output
        # follows it, and sorting by depth first would reorder what it writes
        working = with_external_data_loaded(one_default_domain(ctx.model.to_proto(toposort=False)),
                                            source.resolve().parent if source is not None else None)
        spec = ctx.option(PASS_NAME, "spec") or spec_for("cpu", working, "dynamic")
        return dynamic_matmul_in_place(working, spec, excluded)


PASSES = (OrtDynamicQuant,)
