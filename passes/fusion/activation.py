"""Activation functions written out as several ops -> one op.

Identities (x is the activation input):
  * exact GELU      0.5 * x * (1 + erf(x / sqrt(2)))                 -> com.microsoft Gelu(x)
                    with x = a + b, b a constant 1-D bias on the last axis -> com.microsoft BiasGelu(a, b)
  * tanh GELU       0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))) -> com.microsoft FastGelu(x[, b])
  * QuickGelu/SiLU  x * sigmoid(alpha * x) (SiLU/Swish: alpha = 1)    -> com.microsoft QuickGelu(x, alpha)
(HardSwish and HardSigmoid: hardswish.py.)

Preconditions: every constant named above is a constant of that value (within 1e-4
relative: exporters write float32 roundings of sqrt(2) etc.), the Clip bounds are
constants, no intermediate tensor is read outside the pattern, and for the contrib
ops the activation input is floating point. The product 0.5 * x * (...) may be
associated in any order (TorchScript, dynamo, tf2onnx and paddle2onnx each pick
their own).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.context import PassContext
from onnxforge.passes.base import Match, RulePass

from ._match import (
    MS_DOMAIN,
    FusionRule,
    const_value,
    consumer_op,
    either_order,
    float_dtype,
    is_const,
    near,
    need_ms_domain,
    other_input,
    producer_op,
    replace,
    scalar,
    split_const,
)
from .attention_match import last_dim

SQRT2 = math.sqrt(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _half_x_product(start: gs.Tensor, x: gs.Tensor) -> tuple[list[gs.Node], gs.Tensor, gs.Tensor] | None:
    """Follow Mul consumers of ``start`` until the product is start * x * c (c constant).

    Returns (nodes, output, c) or None; accepts (start*x)*c, (start*c)*x and start*(x*c)."""
    need_x, half = True, None
    nodes: list[gs.Node] = []
    cur = start
    for _ in range(2):
        mul = consumer_op(cur, "Mul")
        if mul is None:
            return None
        other = other_input(mul, cur)
        inner = producer_op(other, "Mul") if other is not None else None
        if other is x and need_x:
            need_x = False
        elif other is not None and half is None and is_const(other):
            half = other
        elif need_x and half is None and inner is not None and other_input(inner, x) is not None:
            c = other_input(inner, x)
            if not is_const(c):
                return None
            need_x, half = False, c
            nodes.append(inner)
        else:
            return None
        nodes.append(mul)
        cur = mul.outputs[0]
        if not need_x and half is not None:
            return nodes, cur, half
    return None


def _bias_of(x: gs.Tensor, readers: list[gs.Node]) -> tuple[gs.Node, gs.Tensor, gs.Tensor] | None:
    """x = a + b with b a constant 1-D vector the size of a's last dim, x read only by
    ``readers``: (add node, a, b)."""
    add = producer_op(x, "Add")
    inside = {id(n) for n in readers}
    if add is None or any(id(n) not in inside for n in x.outputs):
        return None
    split = split_const(add)
    if split is None:
        return None
    a, b = split
    bias = const_value(b)
    if bias is None or bias.ndim != 1 or not float_dtype(bias):
        return None
    last = last_dim(a)
    return (add, a, b) if last == bias.shape[0] else None


def _bias_constant(graph: gs.Graph, b: gs.Tensor) -> gs.Tensor:
    return b if isinstance(b, gs.Constant) else gs.Constant(f"{b.name}_bias", np.asarray(const_value(b)))


@dataclasses.dataclass(frozen=True)
class GeluErfMatch:
    """x * half * (one + erf(x / scale))  (or x * scale when not ``divides``)"""

    x: gs.Tensor
    scale: gs.Tensor
    one: gs.Tensor
    half: gs.Tensor
    divides: bool
    outputs: tuple[gs.Tensor, ...]


@dataclasses.dataclass(frozen=True)
class GeluTanhMatch:
    """x * half * (one + tanh(k * (x + c * x^3)))"""

    x: gs.Tensor
    k: gs.Tensor
    c: gs.Tensor
    one: gs.Tensor
    half: gs.Tensor
    outputs: tuple[gs.Tensor, ...]


@dataclasses.dataclass(frozen=True)
class SiluMatch:
    """x * sigmoid(alpha * x)"""

    x: gs.Tensor
    alpha: gs.Tensor | None  # None: no scale (alpha = 1)
    outputs: tuple[gs.Tensor, ...]


class _GeluBase(FusionRule):
    """Shared rewrite: the Gelu-family op, absorbing a preceding bias Add when it can."""

    fused_op = ""
    biased_op = ""

    def rewrite(self, graph: gs.Graph, match: Match, ctx: PassContext) -> None:
        need_ms_domain(ctx)
        x = match.info.x
        bias = _bias_of(x, match.nodes)
        if bias is not None:
            add, a, b = bias
            match.nodes.append(add)
            op = self.biased_op
            inputs = [a, _bias_constant(graph, b)]
        else:
            op, inputs = self.fused_op, [x]
        replace(graph, match, op, inputs, domain=MS_DOMAIN)


class GeluErf(_GeluBase):
    """0.5 * x * (1 + erf(x / sqrt(2))) -> Gelu / BiasGelu."""

    name = "gelu-erf"
    anchor_ops = ("Erf",)
    fused_op, biased_op = "Gelu", "BiasGelu"

    def match(self, graph, node):
        scale_node = producer_op(node.inputs[0], "Div", "Mul")
        if scale_node is None:
            return None
        split = split_const(scale_node)
        if split is None:
            return None
        x, scale = split
        if scale_node.op == "Div" and scale_node.inputs[0] is not x:
            return None
        add = consumer_op(node.outputs[0], "Add")
        if add is None or other_input(add, node.outputs[0]) is None:
            return None
        found = _half_x_product(add.outputs[0], x)
        if found is None:
            return None
        nodes, out, half = found
        return Match([node, scale_node, add, *nodes], GeluErfMatch(
            x, scale, other_input(add, node.outputs[0]), half, scale_node.op == "Div", (out,)))

    def preconditions(self, graph, match, ctx):
        info = match.info
        target = SQRT2 if info.divides else 1.0 / SQRT2
        if not near(scalar(info.scale), target):
            return f"erf argument is not x / sqrt(2) (scale {scalar(info.scale)})"
        if not near(scalar(info.one), 1.0):
            return "erf is not shifted by 1"
        if not near(scalar(info.half), 0.5):
            return "product is not multiplied by 0.5"
        return None


class GeluTanh(_GeluBase):
    """0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))) -> FastGelu (with bias when present)."""

    name = "gelu-tanh"
    anchor_ops = ("Tanh",)
    fused_op, biased_op = "FastGelu", "FastGelu"

    def match(self, graph, node):
        outer = producer_op(node.inputs[0], "Mul")
        split = split_const(outer) if outer is not None else None
        if split is None:
            return None
        inner_sum, k = split
        add = producer_op(inner_sum, "Add")
        if add is None:
            return None
        for x, cube_t in either_order(add):
            cube = _cube_times_const(x, cube_t)
            if cube is not None:
                break
        else:
            return None
        cube_nodes, c = cube
        plus = consumer_op(node.outputs[0], "Add")
        if plus is None or other_input(plus, node.outputs[0]) is None:
            return None
        found = _half_x_product(plus.outputs[0], x)
        if found is None:
            return None
        nodes, out, half = found
        return Match([node, outer, add, *cube_nodes, plus, *nodes],
                     GeluTanhMatch(x, k, c, other_input(plus, node.outputs[0]), half, (out,)))

    def preconditions(self, graph, match, ctx):
        info = match.info
        if not near(scalar(info.k), SQRT_2_OVER_PI):
            return "tanh argument is not scaled by sqrt(2/pi)"
        if not near(scalar(info.c), 0.044715):
            return "cubic coefficient is not 0.044715"
        if not near(scalar(info.one), 1.0) or not near(scalar(info.half), 0.5):
            return "not 0.5 * x * (1 + tanh(...))"
        return None


def _cube_times_const(x: gs.Tensor, t: gs.Tensor) -> tuple[list[gs.Node], gs.Tensor] | None:
    """Is ``t`` c * x^3, written as Pow(x, 3) * c or as a product of three x and c? -> (nodes, c)."""
    nodes: list[gs.Node] = []
    factors: list[gs.Tensor] = []
    stack = [t]
    while stack:  # flatten the Mul tree (at most 4 leaves)
        cur = stack.pop()
        mul = producer_op(cur, "Mul")
        if mul is not None and cur is not x and not is_const(cur) and len(nodes) < 4:
            nodes.append(mul)
            stack.extend(mul.inputs)
            continue
        pow_node = producer_op(cur, "Pow")
        if pow_node is not None and pow_node.inputs[0] is x:
            if not near(scalar(pow_node.inputs[1]), 3.0):
                return None
            nodes.append(pow_node)
            factors.extend([x, x, x])
            continue
        factors.append(cur)
    consts = [f for f in factors if f is not x]
    if sum(f is x for f in factors) != 3 or len(consts) != 1 or not is_const(consts[0]):
        return None
    return nodes, consts[0]


class QuickGelu(FusionRule):
    """x * sigmoid(alpha * x) (alpha = 1: SiLU/Swish) -> com.microsoft QuickGelu(alpha)."""

    name = "silu-quickgelu"
    anchor_ops = ("Sigmoid",)

    def match(self, graph, node):
        s_in = node.inputs[0]
        mul = consumer_op(node.outputs[0], "Mul")
        if mul is None:
            return None
        other = other_input(mul, node.outputs[0])
        if other is s_in:
            return Match([node, mul], SiluMatch(s_in, None, (mul.outputs[0],)))
        scale = producer_op(s_in, "Mul")
        if scale is not None and other is not None and other_input(scale, other) is not None:
            alpha = other_input(scale, other)
            return Match([node, mul, scale], SiluMatch(other, alpha, (mul.outputs[0],)))
        return None

    def preconditions(self, graph, match, ctx):
        alpha = match.info.alpha
        if alpha is not None and scalar(alpha) is None:
            return "sigmoid scale is not a constant scalar"
        return None

    def rewrite(self, graph, match, ctx):
        need_ms_domain(ctx)
        alpha = 1.0 if match.info.alpha is None else scalar(match.info.alpha)
        replace(graph, match, "QuickGelu", [match.info.x], {"alpha": float(alpha)}, domain=MS_DOMAIN)


class FuseGelu(RulePass):
    name = "fuse-gelu"
    description = "exact and tanh GELU (with bias) -> com.microsoft Gelu / BiasGelu / FastGelu"
    # Gelu/BiasGelu use MLAS's erf and FastGelu computes tanh's argument as x(c'x^2 + k):
    # last-bit differences from the written-out form (~1e-7 of the activation), which a
    # later variance written as E[x^2] - E[x]^2 multiplies by mean^2/var (magika_v3_3:
    # 2e-4 of the output). No atol: the bound is the project's "equal" (max error <=
    # 1e-4 of max |output|), so such a rewrite is rolled back by the verifier.
    tolerance = (1e-4, 0.0)
    rules = (GeluErf, GeluTanh)


class FuseSilu(RulePass):
    name = "fuse-silu"
    description = "x * sigmoid(alpha x) (SiLU/Swish, QuickGelu) -> com.microsoft QuickGelu"
    # QuickGelu uses MLAS's vectorised logistic: a few ulp from Sigmoid+Mul.
    tolerance = (1e-4, 1e-5)
    rules = (QuickGelu,)


PASSES = (FuseGelu, FuseSilu)
