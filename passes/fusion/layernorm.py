"""Normalisations written out as several ops -> one op.

LayerNorm over the last k axes (TorchScript and paddle2onnx write it this way;
the Cast variant wraps it in Casts to float32):
    mean = ReduceMean(x);  d = x - mean;  var = ReduceMean(d^2)  (Pow(d, 2) or d*d)
    y = d / Sqrt(var + eps)   (or d * Reciprocal(Sqrt(var + eps)))   [* gamma] [+ beta]
  = LayerNormalization(x, gamma, beta, axis=-k, epsilon=eps)                      (opset >= 17)
RMSNorm (Llama):
    y = x / Sqrt(ReduceMean(x^2) + eps)  (or x * 1/Sqrt(..), x * Reciprocal(Sqrt(..)))  [* gamma]
  = SimplifiedLayerNormalization(x, gamma, axis=-k, epsilon=eps)   (onnxruntime's op, default domain)
(Residual + norm -> Skip(Simplified)LayerNormalization: skip_layernorm.py.)

Preconditions: both ReduceMeans keep dims and reduce the same trailing axes; eps is a
constant scalar; gamma/beta are constants shaped like the normalised axes (leading 1s
allowed); a Cast inside the pattern is absorbed only when it is a no-op (casts to the
type the norm computes in); no intermediate tensor is read outside the pattern.
LayerNormalization is standard only from opset 17: below that ``fuse-layernorm``
refuses (the TensorRT profile stays standard), while ``fuse-layernorm-ort`` (CPU/CUDA
profiles) emits onnxruntime's own pre-17 registration of the same op, which
onnxruntime runs but onnx.checker does not know.

Not fused: tf2onnx/jax2tf's form that computes var = E[x^2] - E[x]^2 (magika): it
is not the same arithmetic (cancellation) and in magika it normalises a non-last
axis; it is left as is.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxforge.passes.base import Match, RulePass

from ._match import (
    FusionRule,
    const_value,
    consumer_op,
    float_dtype,
    fresh_constant,
    is_const,
    model_opset,
    near,
    other_input,
    producer_op,
    replace,
    scalar,
)


def reduce_axes(node: gs.Node) -> tuple[int, ...] | None:
    """Axes of a Reduce* node from its attribute (opset < 18) or constant input; None if unknown."""
    if "axes" in node.attrs:
        return tuple(int(a) for a in node.attrs["axes"])
    if len(node.inputs) > 1 and node.inputs[1].name:
        value = const_value(node.inputs[1])
        return tuple(int(a) for a in value.reshape(-1)) if value is not None else None
    return None


def trailing_axes(axes: tuple[int, ...] | None, rank: int | None) -> int | None:
    """k when ``axes`` are exactly the last k axes (negative, or positive with a known rank)."""
    if not axes:
        return None
    if rank is not None:
        axes = tuple(a + rank if a < 0 else a for a in axes)
        return len(axes) if sorted(axes) == list(range(rank - len(axes), rank)) else None
    return len(axes) if sorted(axes) == list(range(-len(axes), 0)) else None


def _rank(tensor: gs.Tensor) -> int | None:
    return len(tensor.shape) if tensor.shape is not None else None


def _affine_tail(norm_out: gs.Tensor) -> tuple[list[gs.Node], gs.Tensor, gs.Tensor | None, gs.Tensor | None]:
    """After the normalised tensor: an optional no-op Cast, Mul by a constant gamma, Add of a
    constant beta. Returns (nodes, output, gamma, beta)."""
    nodes: list[gs.Node] = []
    out, gamma, beta = norm_out, None, None
    cast = consumer_op(out, "Cast")
    if cast is not None and len(out.outputs) == 1:
        nodes.append(cast)
        out = cast.outputs[0]
    mul = consumer_op(out, "Mul")
    if mul is not None and len(out.outputs) == 1 and is_const(other_input(mul, out)):
        gamma = other_input(mul, out)
        nodes.append(mul)
        out = mul.outputs[0]
        add = consumer_op(out, "Add")
        if add is not None and len(out.outputs) == 1 and is_const(other_input(add, out)):
            beta = other_input(add, out)
            nodes.append(add)
            out = add.outputs[0]
    return nodes, out, gamma, beta


def _param(value: np.ndarray | None, norm_shape: tuple[int, ...] | None) -> np.ndarray | None:
    """A gamma/beta value reshaped to the normalised shape (leading 1s dropped, broadcasting)."""
    if value is None:
        return None
    k = len(norm_shape) if norm_shape else None
    while value.ndim > (k or value.ndim) and value.shape[0] == 1:
        value = value.reshape(value.shape[1:])
    if norm_shape is None:
        return value
    try:
        return np.ascontiguousarray(np.broadcast_to(value, norm_shape))
    except ValueError:
        return None


def _norm_shape(x: gs.Tensor, k: int, *params: np.ndarray | None) -> tuple[int, ...] | None:
    if x.shape is not None and len(x.shape) >= k and all(isinstance(d, int) and d > 0 for d in x.shape[-k:]):
        return tuple(x.shape[-k:])
    for p in params:
        if p is not None:
            squeezed = p
            while squeezed.ndim > k and squeezed.shape[0] == 1:
                squeezed = squeezed.reshape(squeezed.shape[1:])
            if squeezed.ndim == k and all(d > 1 for d in squeezed.shape):
                return tuple(squeezed.shape)
    return None


@dataclasses.dataclass(frozen=True)
class NormMatch:
    """(x - mean) / sqrt(var + eps) [* gamma] [+ beta], or x / sqrt(mean(x^2) + eps) [* gamma]."""

    x: gs.Tensor
    eps: gs.Tensor
    gamma: gs.Tensor | None
    beta: gs.Tensor | None
    reduces: tuple[gs.Node, ...]  # the ReduceMeans (of x and of the squares)
    square: gs.Node  # the Pow or Mul making the squares
    outputs: tuple[gs.Tensor, ...]


@dataclasses.dataclass(frozen=True)
class NormPlan:
    """What the checks found: the norm is over the last ``k`` axes of shape ``norm_shape``,
    with ``epsilon``, computing in ``dtype``."""

    k: int
    epsilon: float
    norm_shape: tuple[int, ...]
    dtype: np.dtype


class _NormBase(FusionRule):
    """Shared checks of eps, axes, Cast and the affine parameters, and the rewrite to ``fused_op``
    (with a bias input when ``with_beta``)."""

    fused_op: ClassVar[str] = ""
    with_beta: ClassVar[bool] = True

    def rewrite(self, graph, match, ctx):
        replace(graph, match, self.fused_op, [match.info.x, *self._params(graph, match, self.with_beta)],
                {"axis": -match.plan.k, "epsilon": match.plan.epsilon})

    def _common(self, match: Match) -> str | NormPlan:
        """The reason to refuse, or the plan."""
        info = match.info
        for node in info.reduces:
            if int(node.attrs.get("keepdims", 1)) != 1:
                return "ReduceMean does not keep dims"
        axes = [reduce_axes(n) for n in info.reduces]
        if any(a is None for a in axes) or len(set(axes)) != 1:
            return "mean axes are not constant or differ"
        k = trailing_axes(axes[0], _rank(info.x))
        if k is None:
            return f"mean axes {axes[0]} are not the last axes"
        eps = const_value(info.eps)
        if eps is None or eps.size != 1:
            return "epsilon not a constant"
        if not float_dtype(eps):
            return "not a floating-point norm"
        for node in match.nodes:
            if node.op == "Cast" and int(node.attrs["to"]) != onnx.helper.np_dtype_to_tensor_dtype(eps.dtype):
                return "a Cast inside the pattern changes the type"
        norm_shape = _norm_shape(info.x, k, const_value(info.gamma), const_value(info.beta))
        if norm_shape is None:
            return "normalised shape unknown"
        for key, param in (("gamma", info.gamma), ("beta", info.beta)):
            if param is not None and _param(const_value(param), norm_shape) is None:
                return f"{key} does not broadcast over the normalised axes only"
        return NormPlan(k, float(eps.reshape(-1)[0]), norm_shape, eps.dtype)

    def _params(self, graph: gs.Graph, match: Match, with_beta: bool) -> list[gs.Tensor]:
        info, plan = match.info, match.plan
        shape, dtype = plan.norm_shape, plan.dtype
        gamma = _param(const_value(info.gamma), shape)
        params = [fresh_constant(graph, f"{info.x.name}_norm_scale",
                                 (gamma if gamma is not None else np.ones(shape)).astype(dtype))]
        if with_beta:
            beta = _param(const_value(info.beta), shape)
            params.append(fresh_constant(graph, f"{info.x.name}_norm_bias",
                                         (beta if beta is not None else np.zeros(shape)).astype(dtype)))
        return params


def _normalise_step(d: gs.Tensor, sqrt_out: gs.Tensor) -> tuple[list[gs.Node], gs.Tensor] | None:
    """d / s, d * Reciprocal(s) or d * (1 / s) with s = ``sqrt_out``: (nodes, output)."""
    div = consumer_op(sqrt_out, "Div")
    if div is not None and div.inputs[1] is sqrt_out:
        if div.inputs[0] is d:
            return [div], div.outputs[0]
        if near(scalar(div.inputs[0]), 1.0):
            mul = consumer_op(div.outputs[0], "Mul")
            if mul is not None and other_input(mul, div.outputs[0]) is d:
                return [div, mul], mul.outputs[0]
    recip = consumer_op(sqrt_out, "Reciprocal")
    if recip is not None:
        mul = consumer_op(recip.outputs[0], "Mul")
        if mul is not None and other_input(mul, recip.outputs[0]) is d:
            return [recip, mul], mul.outputs[0]
    return None


def _square_mean(t: gs.Tensor) -> tuple[list[gs.Node], gs.Node] | None:
    """Pow(t, 2) or t*t followed by ReduceMean: (nodes, reduce node)."""
    for node in t.outputs:
        if node.domain or node.inputs[0] is not t:
            continue
        if (node.op == "Pow" and len(node.inputs) == 2) or (node.op == "Mul" and node.inputs[1] is t):
            mean = consumer_op(node.outputs[0], "ReduceMean")
            if mean is not None:
                return [node, mean], mean
    return None


def _eps_sqrt(var: gs.Tensor) -> tuple[list[gs.Node], gs.Tensor, gs.Tensor] | None:
    add = consumer_op(var, "Add")
    if add is None:
        return None
    sqrt = consumer_op(add.outputs[0], "Sqrt")
    if sqrt is None:
        return None
    return [add, sqrt], other_input(add, var), sqrt.outputs[0]


class LayerNorm(_NormBase):
    """ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div [Mul gamma] [Add beta] -> LayerNormalization."""

    name = "layernorm"
    anchor_ops = ("ReduceMean",)
    fused_op = "LayerNormalization"
    below_17 = False  # emit onnxruntime's pre-17 registration instead of refusing

    def match(self, graph, node):
        x, mean = node.inputs[0], node.outputs[0]
        sub = consumer_op(mean, "Sub")
        if sub is None or sub.inputs[0] is not x or sub.inputs[1] is not mean:
            return None
        d = sub.outputs[0]
        square = _square_mean(d)
        if square is None:
            return None
        sq_nodes, var_mean = square
        eps_sqrt = _eps_sqrt(var_mean.outputs[0])
        if eps_sqrt is None:
            return None
        es_nodes, eps, std = eps_sqrt
        step = _normalise_step(d, std)
        if step is None:
            return None
        norm_nodes, normed = step
        tail, out, gamma, beta = _affine_tail(normed)
        return Match([node, sub, *sq_nodes, *es_nodes, *norm_nodes, *tail],
                     NormMatch(x, eps, gamma, beta, (node, var_mean), sq_nodes[0], (out,)))

    def preconditions(self, graph, match, ctx):
        square = match.info.square
        if square.op == "Pow" and not near(scalar(square.inputs[1]), 2.0):
            return "variance is not a mean of squares (Pow exponent is not 2)"
        if model_opset(graph, ctx) < 17 and not self.below_17:
            return "opset < 17 has no LayerNormalization"
        return self._common(match)



class LayerNormOrt(LayerNorm):
    name = "layernorm-ort"
    below_17 = True


class RmsNorm(_NormBase):
    """x / Sqrt(ReduceMean(x^2) + eps) [* gamma] -> SimplifiedLayerNormalization."""

    name = "rmsnorm"
    anchor_ops = ("ReduceMean",)
    fused_op = "SimplifiedLayerNormalization"
    with_beta = False  # RMSNorm has no bias

    def match(self, graph, node):
        square = producer_op(node.inputs[0], "Pow", "Mul")
        if square is None:
            return None
        x = square.inputs[0]
        if square.op == "Mul" and square.inputs[1] is not x:
            return None
        eps_sqrt = _eps_sqrt(node.outputs[0])
        if eps_sqrt is None:
            return None
        es_nodes, eps, std = eps_sqrt
        step = _normalise_step(x, std)
        if step is None:
            return None
        norm_nodes, normed = step
        tail, out, gamma, _ = _affine_tail(normed)
        if gamma is not None and tail[-1].op == "Add":  # RMSNorm has no bias: keep a trailing Add outside
            tail, out = tail[:-1], tail[-2].outputs[0]
        return Match([node, square, *es_nodes, *norm_nodes, *tail],
                     NormMatch(x, eps, gamma, None, (node,), square, (out,)))

    def preconditions(self, graph, match, ctx):
        square = match.info.square
        if square.op == "Pow" and not near(scalar(square.inputs[1]), 2.0):
            return "not a mean of squares (Pow exponent is not 2)"
        if ctx.provider not in ("cpu", "cuda"):
            return f"SimplifiedLayerNormalization is an onnxruntime op (provider {ctx.provider})"
        return self._common(match)



class FuseLayerNorm(RulePass):
    name = "fuse-layernorm"
    description = "written-out LayerNorm -> LayerNormalization (opset >= 17 only)"
    tolerance = (1e-5, 1e-5)
    rules = (LayerNorm,)


class FuseLayerNormOrt(RulePass):
    name = "fuse-layernorm-ort"
    description = "written-out LayerNorm -> LayerNormalization, at opset < 17 as onnxruntime's own op"
    tolerance = (1e-5, 1e-5)
    rules = (LayerNormOrt,)


class FuseRmsNorm(RulePass):
    name = "fuse-rmsnorm"
    description = "RMSNorm (Llama) -> SimplifiedLayerNormalization (onnxruntime)"
    tolerance = (1e-5, 1e-5)
    rules = (RmsNorm,)


PASSES = (FuseLayerNorm, FuseLayerNormOrt, FuseRmsNorm)
