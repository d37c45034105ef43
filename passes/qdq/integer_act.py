"""Integer HardSwish / HardSigmoid and constant shifts for onnxruntime's CPU provider.

onnxruntime's CPU provider has no integer kernel for HardSwish or HardSigmoid (HardSwish
even runs as a function: HardSigmoid then Mul), so in a QDQ model each one costs
DequantizeLinear + float op(s) + QuantizeLinear on a full activation tensor and breaks
the NHWC chain of integer convolutions. Both are rewritten into ops onnxruntime fuses
into QLinearAdd / QLinearMul:

  HardSwish:   hardswish(y) = y * clip(y + 3, 0, 6) / 6
    r = Q(y + 3; scale 6/255, zero point 0)   the u8 saturation of QuantizeLinear
                                              *is* the clip to [0, 6]
    m = y * DQ(r)
    Q(m; 6 s, z) read back with DQ(.; s, z)   is exactly the grid the original
                                              Q(hardswish(y); s, z) used: the /6
                                              lives in the scale

  HardSigmoid: hardsigmoid(y) = clip(a y + b, 0, 1)
    t = y + b/a, Q(t; 1/(255 a), 0) saturates t to [0, 1/a]; read back with
    DQ(.; 1/255, 0) it is a t clipped to [0, 1]   (a > 0)

  Add of a constant: u = h + c with c the same for every element, read only through
    Q -> DQ: when c is k steps of h's grid (k = round(c / s)), the DQs that read u read
    h's integers instead with zero point z - k. No kernel at all, and convolutions that
    read it pad with the zero point, i.e. with the real 0 of u, as the float model did.
    The rounding of c to k s (at most half a step, the same for every element) is left
    to bias correction.

Preconditions (per node, else left as it is, with the reason): the input is a
DequantizeLinear of a u8 per-tensor activation; the output feeds exactly one
QuantizeLinear (u8, per tensor, scalar scale) and nothing else; HardSigmoid alpha > 0.
Extra error: HardSwish's r has a step of 6/255, so |delta| <= |y| / 510; HardSigmoid
adds no rounding beyond its own output grid (1/255).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.passes.base import Match, Rule, RulePass
from onnxforge.passes.matching import DEFAULT_DOMAINS, producer

from .common import fresh_name, grid, scalar_u8_grid


# The Adds the activation rules make feed a QuantizeLinear that clips (the point of them):
# they are not shifts of a grid.
MADE_ADDS = ("_add3", "_add_shift")


def _f32(graph, name, value) -> gs.Constant:
    return gs.Constant(fresh_name(graph, name), np.array(value, dtype=np.float32))


def _u8(graph, name, value) -> gs.Constant:
    return gs.Constant(fresh_name(graph, name), np.array(value, dtype=np.uint8))


def _u8_const(graph, name, value) -> tuple[gs.Constant, gs.Constant, gs.Constant]:
    """A scalar constant as u8 (quantized, scale, zero point), exact up to float32 rounding,
    so DQ -> op -> Q fuses (QLinearAdd wants both inputs u8)."""
    if value == 0:
        q, scale, zero = 0, 1.0, 0
    elif value > 0:
        q, scale, zero = 255, value / 255.0, 0
    else:
        q, scale, zero = 0, -value / 255.0, 255
    return _u8(graph, f"{name}_quantized", q), _f32(graph, f"{name}_scale", scale), _u8(graph, f"{name}_zero_point", zero)


@dataclasses.dataclass(frozen=True)
class ShiftMatch:
    h_dq: gs.Node  # the DequantizeLinear of the activation
    c_dq: gs.Node  # the DequantizeLinear of the constant


@dataclasses.dataclass(frozen=True)
class ActivationSiteMatch:
    dq: gs.Node  # the DequantizeLinear the activation reads
    q: gs.Node  # the QuantizeLinear reading it


class ShiftIntoZeroPoint(Rule):
    """Add(DQ(h), DQ(c)) -> Q -> DQs  =>  DQs of h with zero point z - round(c / s)."""

    name = "shift-into-zero-point"
    anchor_ops = ("Add",)

    def match(self, graph, node):
        if node.domain not in DEFAULT_DOMAINS or len(node.inputs) != 2:
            return None
        sources = [producer(t, "DequantizeLinear") for t in node.inputs]
        if any(s is None for s in sources):
            return None
        constant = [i for i, s in enumerate(sources) if isinstance(s.inputs[0], gs.Constant)]
        if len(constant) != 1:
            return None
        return Match([node], ShiftMatch(sources[1 - constant[0]], sources[constant[0]]))

    def check(self, graph, match, ctx):
        add, h_dq, c_dq = match.nodes[0], match.info.h_dq, match.info.c_dq
        if add.name.endswith(MADE_ADDS):
            return self.refusal("an Add this pass made: the QuantizeLinear after it clips", match)
        c = _dequantized(c_dq)
        if c is None or c.size == 0 or not np.all(c == c.flat[0]):
            return self.refusal("the constant is not one value on a per-tensor grid", match)
        users = add.outputs[0].outputs
        if len(users) != 1 or users[0].op != "QuantizeLinear" or any(o is add.outputs[0] for o in graph.outputs):
            return self.refusal("the sum is not read by exactly one QuantizeLinear", match)
        q = users[0]
        readers = q.outputs[0].outputs
        if not readers or any(r.op != "DequantizeLinear" for r in readers) or any(o is q.outputs[0] for o in graph.outputs):
            return self.refusal("the quantized sum is read by something other than DequantizeLinear", match)
        if len(h_dq.outputs[0].outputs) != 1 or any(o is h_dq.outputs[0] for o in graph.outputs):
            return self.refusal("the dequantized input has other readers", match)
        if not scalar_u8_grid(h_dq):
            return self.refusal("the input is not a u8 per-tensor activation", match)
        scale, zero = grid(h_dq)
        k = int(round(float(c.flat[0]) / scale))
        if not 0 <= zero - k <= 255:
            return self.refusal("the shift leaves the u8 zero-point range", match)
        return readers, zero - k  # the plan: the DQs to re-point and their zero point

    def rewrite(self, graph, match, ctx):
        add, h_dq = match.nodes[0], match.info.h_dq
        readers, shifted = match.plan
        zero = _u8(graph, f"{add.name or add.outputs[0].name}_shifted_zero_point", shifted)
        for reader in readers:
            reader.inputs.clear()
            reader.inputs.extend([h_dq.inputs[0], h_dq.inputs[1], zero])
            reader.attrs.pop("axis", None)


def _dequantized(dq: gs.Node) -> np.ndarray | None:
    parts = [dq.inputs[i] if i < len(dq.inputs) else None for i in range(3)]
    if not all(isinstance(p, gs.Constant) for p in parts[:2]) or (parts[2] is not None and not isinstance(parts[2], gs.Constant)):
        return None
    q, s = (np.asarray(p.values).astype(np.float64) for p in parts[:2])
    z = np.asarray(parts[2].values).astype(np.float64) if parts[2] is not None else 0.0
    if np.ndim(s) or np.ndim(z):
        return None  # per-axis constants: not one value
    return (q - z) * s


class IntegerActivation(Rule):
    """HardSwish / HardSigmoid between DQ and Q (base: the site and its reasons)."""

    def match(self, graph, node):
        if node.domain not in DEFAULT_DOMAINS:
            return None
        dq = producer(node.inputs[0], "DequantizeLinear")
        users = node.outputs[0].outputs
        if dq is None or len(users) != 1 or users[0].op != "QuantizeLinear":
            return None
        return Match([node], ActivationSiteMatch(dq, users[0]))

    def check(self, graph, match, ctx):
        node = match.nodes[0]
        if any(o is node.outputs[0] for o in graph.outputs):
            return self.refusal("the activation is a graph output", match)
        for qdq in (match.info.dq, match.info.q):
            if not scalar_u8_grid(qdq) or qdq.attrs.get("axis", 1) != 1:
                return self.refusal(f"{qdq.op} {qdq.name} is not u8 per tensor", match)
        return None


class IntegerHardSwish(IntegerActivation):
    name = "integer-hardswish"
    anchor_ops = ("HardSwish",)

    def rewrite(self, graph, match, ctx):
        node, dq, q = match.nodes[0], match.info.dq, match.info.q
        base = node.name or node.outputs[0].name
        y, out = node.inputs[0], node.outputs[0]
        node.outputs.clear()
        three_q, three_s, three_z = _u8_const(graph, f"{base}_three", 3.0)
        r_s, r_z = _f32(graph, f"{base}_relu6_scale", 6.0 / 255.0), _u8(graph, f"{base}_relu6_zero", 0)
        y_again, three, plus3, r_q, r = (gs.Variable(fresh_name(graph, f"{base}_{s}")) for s in
                                         ("y", "three_dq", "plus3", "relu6_q", "relu6"))
        graph.nodes += [
            # a DQ of its own per consumer: onnxruntime's QDQ node units want unshared DQs
            gs.Node("DequantizeLinear", f"{base}_dq_y", dict(dq.attrs), list(dq.inputs), [y_again]),
            gs.Node("DequantizeLinear", f"{base}_dq_three", inputs=[three_q, three_s, three_z], outputs=[three]),
            gs.Node("Add", f"{base}_add3", inputs=[y_again, three], outputs=[plus3]),
            gs.Node("QuantizeLinear", f"{base}_q_relu6", inputs=[plus3, r_s, r_z], outputs=[r_q]),
            gs.Node("DequantizeLinear", f"{base}_dq_relu6", inputs=[r_q, r_s, r_z], outputs=[r]),
            gs.Node("Mul", f"{base}_mul", inputs=[y, r], outputs=[out]),
        ]
        q.inputs[1] = _f32(graph, f"{base}_product_scale", 6.0 * grid(q)[0])


class IntegerHardSigmoid(IntegerActivation):
    name = "integer-hardsigmoid"
    anchor_ops = ("HardSigmoid",)

    def check(self, graph, match, ctx):
        if float(match.nodes[0].attrs.get("alpha", 0.2)) <= 0:
            return self.refusal("alpha <= 0: the output does not saturate like a u8 grid", match)
        return super().check(graph, match, ctx)

    def rewrite(self, graph, match, ctx):
        node, q = match.nodes[0], match.info.q
        base = node.name or node.outputs[0].name
        alpha, beta = float(node.attrs.get("alpha", 0.2)), float(node.attrs.get("beta", 0.5))
        y, out = node.inputs[0], node.outputs[0]
        node.outputs.clear()
        shift_q, shift_s, shift_z = _u8_const(graph, f"{base}_shift", beta / alpha)
        q.inputs[1] = _f32(graph, f"{base}_presat_scale", 1.0 / (255.0 * alpha))
        q.inputs[2] = _u8(graph, f"{base}_presat_zero", 0)
        out_s, out_z = _f32(graph, f"{base}_out_scale", 1.0 / 255.0), _u8(graph, f"{base}_out_zero", 0)
        for reader in q.outputs[0].outputs:
            if reader.op == "DequantizeLinear":
                reader.inputs[1], reader.inputs[2] = out_s, out_z
        shift = gs.Variable(fresh_name(graph, f"{base}_shift_dq"))
        graph.nodes += [
            gs.Node("DequantizeLinear", f"{base}_dq_shift", inputs=[shift_q, shift_s, shift_z], outputs=[shift]),
            gs.Node("Add", f"{base}_add_shift", inputs=[y, shift], outputs=[out]),
        ]


class IntegerActivations(RulePass):
    name = "integer-activations"
    description = "HardSwish/HardSigmoid between Q/DQ as QLinearAdd/QLinearMul; constant shifts into the zero point"
    tolerance = (float("inf"), float("inf"))  # new rounding on a u8 grid: judged by the quantizer's budget
    rules = (ShiftIntoZeroPoint, IntegerHardSwish, IntegerHardSigmoid)


PASSES = (IntegerActivations,)
