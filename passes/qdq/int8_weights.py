"""MatMuls reading an int8 weight dequantized by Cast + Mul run as DynamicQuantizeMatMul on
the same int8 values (quant/detect.py finds these models and says why they are not
quantized again):

  MatMul(X, Cast(Wq) * s) == DynamicQuantizeMatMul(X, Wq, s, 0)

up to the dynamic (per call) u8 quantization of X; no weight is re-rounded. Without VNNI,
onnxruntime's u8 x s8 kernel (VPMADDUBSW) saturates the 16-bit sum of two products,
255 * 127 * 2 > 32767: with the option ``saturating`` int8 weights past the 7-bit range
([-64, 64] cannot saturate) are stored shifted, exactly, as uint8 with zero point 128:

  DynamicQuantizeMatMul(X, Wq + 128, s, 128)

Preconditions: an int8/uint8 constant 2-D weight read through one Cast by one Mul with a
constant per-tensor or per-column scale; the weight is one the caller lets go (option
``weights``: the int8 initializers whose readers may all be rewritten). The quantizer runs
this pass (quant/plan.py); it is not in an -O level.

Rule dynamic-matmul-bias: a constant bias added to the product goes into the kernel's bias
input, Add(DynamicQuantizeMatMul(X, W, s, z), b) == DynamicQuantizeMatMul(X, W, s, z, b)
(the kernel adds b to each output row after scaling: the same float sum, up to FMA
rounding). onnxruntime does not fold that Add itself: on minilm_l6_w8 its 36 Adds took
15 ms of a 230 ms run (AVX2 profile, benchmarks/results/quant_avx2.md). Preconditions:
b is a constant with one value per weight column (1-D, or leading dims of 1), the product
is read by that Add alone and is no graph output.
"""
from __future__ import annotations

import dataclasses
from types import MappingProxyType

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.passes.base import Match, Rule, RulePass
from onnxforge.passes.fusion._match import MS_DOMAIN, const_value, either_order, need_ms_domain
from onnxforge.passes.matching import DEFAULT_DOMAINS, producer

PASS_NAME = "int8-weights-to-dynamic-matmul"
SATURATION_FREE = 64  # |w| <= 64: two u8 x s8 products stay within int16 (255 * 64 * 2 = 32640)


def _shared(graph: gs.Graph, name: str, make) -> gs.Constant:
    """The constant ``name`` when the graph holds it already (a weight read by two MatMuls), else make()."""
    existing = graph.tensors().get(name)
    return existing if isinstance(existing, gs.Constant) else gs.Constant(name, make())


@dataclasses.dataclass(frozen=True)
class Int8WeightMatch:
    q: gs.Constant  # the int8 / uint8 weight
    scale: gs.Constant


class Int8WeightMatMul(Rule):
    name = "int8-weight-matmul"
    anchor_ops = ("MatMul",)

    def match(self, graph, node):
        mul = producer(node.inputs[1], "Mul") if node.domain in DEFAULT_DOMAINS and len(node.inputs) == 2 else None
        if mul is None:
            return None
        for weight, scale in either_order(mul):
            cast = producer(weight, "Cast")
            if cast is None or not isinstance(cast.inputs[0], gs.Constant) or not isinstance(scale, gs.Constant):
                continue
            if np.dtype(cast.inputs[0].dtype) in (np.int8, np.uint8) and len(weight.outputs) == 1:
                return Match([node, mul, cast], Int8WeightMatch(cast.inputs[0], scale))
        return None

    def check(self, graph, match, ctx):
        q, scale = match.info.q, match.info.scale
        if q.name not in ctx.option(PASS_NAME, "weights", ()):
            return self.refusal(f"the caller keeps the readers of {q.name} float", match)
        if len(q.shape) != 2:
            return self.refusal("the int8 weight is not 2-D", match)
        s = np.asarray(scale.values)
        columns = q.shape[1]
        if not (s.size == 1 or (s.size == columns and (s.ndim == 1 or s.shape[-1] == columns))):
            return self.refusal("the scale is neither per tensor nor per column", match)
        return None

    def rewrite(self, graph, match, ctx):
        node, q, scale = match.nodes[0], match.info.q, match.info.scale
        columns = q.shape[1]
        s = _shared(graph, f"{q.name}_dq_scale",
                    lambda: np.broadcast_to(np.asarray(scale.values, np.float32).reshape(-1), (columns,)).copy())
        values, zero_value, zero_dtype = q, 0, np.dtype(q.dtype)
        w = np.asarray(q.values)
        if ctx.option(PASS_NAME, "saturating", False) and w.dtype == np.int8 and w.size \
                and max(-int(w.min()), int(w.max())) > SATURATION_FREE:
            values = _shared(graph, f"{q.name}_u8", lambda: (w.astype(np.int16) + 128).astype(np.uint8))
            zero_value, zero_dtype = 128, np.dtype(np.uint8)
        zero = _shared(graph, f"{q.name}_dq_zero_point", lambda: np.full(columns, zero_value, zero_dtype))
        node.op, node.domain = "DynamicQuantizeMatMul", MS_DOMAIN
        node.name = (node.name or node.outputs[0].name) + "_int8"
        x = node.inputs[0]
        node.inputs.clear()
        node.inputs.extend([x, values, s, zero])
        need_ms_domain(ctx)


class DynamicMatMulBias(Rule):
    name = "dynamic-matmul-bias"
    anchor_ops = ("DynamicQuantizeMatMul",)

    def match(self, graph, node):
        if node.domain != MS_DOMAIN or (len(node.inputs) > 4 and node.inputs[4].name):
            return None
        readers = node.outputs[0].outputs
        add = readers[0] if readers else None
        if add is None or add.op != "Add" or add.domain not in DEFAULT_DOMAINS or len(add.inputs) != 2:
            return None
        bias = add.inputs[1] if add.inputs[0] is node.outputs[0] else add.inputs[0]
        return Match([node, add], bias)

    def check(self, graph, match, ctx):
        node, add = match.nodes
        bias = const_value(match.info)
        if len(node.outputs[0].outputs) != 1 or node.outputs[0] in graph.outputs:
            return self.refusal("the product is read outside the Add", match)
        if bias is None:
            return self.refusal("the added tensor is not a constant", match)
        columns = node.inputs[1].shape[-1] if isinstance(node.inputs[1], gs.Constant) else None
        if bias.dtype != np.float32 or columns is None or bias.size != columns or bias.shape[-1:] != (columns,):
            return self.refusal(f"the added constant (shape {list(bias.shape)}) is not one float per weight column "
                                f"({columns})", match)
        return bias.reshape(-1)

    def rewrite(self, graph, match, ctx):
        node, add = match.nodes
        inputs = list(node.inputs)
        if len(inputs) < 4:  # the zero point is optional before the bias
            inputs.append(gs.Variable.empty())
        node.inputs.clear()
        node.inputs.extend(inputs[:4] + [gs.Constant(f"{node.name}_bias", np.ascontiguousarray(match.plan, np.float32))])
        out = add.outputs[0]
        add.outputs.clear()
        add.inputs.clear()
        node.outputs.clear()
        node.outputs.append(out)


class Int8WeightsToDynamicMatMul(RulePass):
    name = PASS_NAME
    description = ("MatMul reading an int8 weight dequantized by Cast+Mul -> DynamicQuantizeMatMul on the same int8 "
                   "values, a constant bias added to it folded into the kernel")
    tolerance = (float("inf"), float("inf"))  # X quantized per call: judged by the quantizer's budget
    rules = (Int8WeightMatMul, DynamicMatMulBias)
    options = MappingProxyType({
        "weights": (list, "the int8 initializers whose MatMul readers may be rewritten (quantize passes the ones not kept float)"),
        "saturating": (bool, "the CPU's u8 x s8 products saturate (no VNNI): store weights past 7 bits as uint8 + 128"),
    })


PASSES = (Int8WeightsToDynamicMatMul,)
