"""Normalisations written out as several ops -> one op.

LayerNorm over the last k axes (TorchScript and paddle2onnx write it this way;
the Cast variant wraps it in Casts to float32):
    mean = ReduceMean(x);  d = x - mean;  var = ReduceMean(d^2)  (Pow(d, 2) or d*d)
    y = d / Sqrt(var + eps)   (or d * Reciprocal(Sqrt(var + eps)))   [* gamma] [+ beta]
  = LayerNormalization(x, gamma, beta, axis=-k, epsilon=eps)                      (opset >= 17)
RMSNorm (Llama):
    y = x / Sqrt(ReduceMean(x^2) + eps)  (or x * 1/Sqrt(..), x * Reciprocal(Sqrt(..)))  [* gamma]
  = SimplifiedLayerNormalization(x, gamma, axis=-k, epsilon=eps)   (onnxruntime's op, default domain)
Residual + norm:
    LayerNormalization(a + b [+ bias]) = com.microsoft SkipLayerNormalization(a, b, gamma, beta, bias)
    SimplifiedLayerNormalization(a + b) = com.microsoft SkipSimplifiedLayerNormalization(a, b, gamma)
  the sum a + b, when read elsewhere, is the fused op's 4th output.

Preconditions: both ReduceMeans keep dims and reduce the same trailing axes; eps is a
constant scalar; gamma/beta are constants shaped like the normalised axes (leading 1s
allowed); a Cast inside the pattern is absorbed only when it is a no-op (casts to the
type the norm computes in); no intermediate tensor is read outside the pattern.
LayerNormalization is standard only from opset 17: below that ``fuse-layernorm``
refuses (the TensorRT profile stays standard), while ``fuse-layernorm-ort`` (CPU/CUDA
profiles) emits onnxruntime's own pre-17 registration of the same op, which
onnxruntime runs but onnx.checker does not know. SkipLayerNormalization needs the
two summands to have the same, known shape of rank 3 (what onnxruntime accepts).

Pass order: fuse-skip-layernorm must run before the attention fusions. It proves the
summands' shapes by onnx shape inference, which cannot see through MultiHeadAttention /
Attention: run after them it refuses every layer (minilm_l6_real: 0 of 12). The
provider FUSIONS tuples keep norms and activations first (tested).

Not fused: tf2onnx/jax2tf's form that computes var = E[x^2] - E[x]^2 (magika): it
is not the same arithmetic (cancellation) and in magika it normalises a non-last
axis; it is left as is.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxforge.passes.base import Match, RulePass

from ._match import (
    MS_DOMAIN,
    FusionRule,
    ShapeOracle,
    const_value,
    consumer_op,
    either_order,
    float_dtype,
    fresh_constant,
    is_const,
    is_graph_output,
    model_opset,
    near,
    need_ms_domain,
    other_input,
    producer_op,
    replace,
    scalar,
    split_const,
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


class _NormBase(FusionRule):
    """Shared checks of eps, axes, Cast and the affine parameters."""

    def _common(self, match: Match) -> str | None:
        info = match.info
        for node in info["reduces"]:
            if int(node.attrs.get("keepdims", 1)) != 1:
                return "ReduceMean does not keep dims"
        axes = [reduce_axes(n) for n in info["reduces"]]
        if any(a is None for a in axes) or len(set(axes)) != 1:
            return "mean axes are not constant or differ"
        k = trailing_axes(axes[0], _rank(info["x"]))
        if k is None:
            return f"mean axes {axes[0]} are not the last axes"
        eps = const_value(info["eps"])
        if eps is None or eps.size != 1:
            return "epsilon not a constant"
        if not float_dtype(eps):
            return "not a floating-point norm"
        for node in match.nodes:
            if node.op == "Cast" and int(node.attrs["to"]) != onnx.helper.np_dtype_to_tensor_dtype(eps.dtype):
                return "a Cast inside the pattern changes the type"
        norm_shape = _norm_shape(info["x"], k, const_value(info["gamma"]), const_value(info["beta"]))
        if norm_shape is None:
            return "normalised shape unknown"
        for key in ("gamma", "beta"):
            if info[key] is not None and _param(const_value(info[key]), norm_shape) is None:
                return f"{key} does not broadcast over the normalised axes only"
        info["k"], info["epsilon"], info["norm_shape"], info["dtype"] = k, float(eps.reshape(-1)[0]), norm_shape, eps.dtype
        return None

    def _params(self, graph: gs.Graph, match: Match, with_beta: bool) -> list[gs.Tensor]:
        info = match.info
        shape, dtype = info["norm_shape"], info["dtype"]
        gamma = _param(const_value(info["gamma"]), shape)
        params = [fresh_constant(graph, f"{info['x'].name}_norm_scale",
                                 (gamma if gamma is not None else np.ones(shape)).astype(dtype))]
        if with_beta:
            beta = _param(const_value(info["beta"]), shape)
            params.append(fresh_constant(graph, f"{info['x'].name}_norm_bias",
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
        return Match([node, sub, *sq_nodes, *es_nodes, *norm_nodes, *tail], {
            "x": x, "eps": eps, "gamma": gamma, "beta": beta, "reduces": [node, var_mean],
            "square": sq_nodes[0], "outputs": [out],
        })

    def preconditions(self, graph, match, ctx):
        square = match.info["square"]
        if square.op == "Pow" and not near(scalar(square.inputs[1]), 2.0):
            return "variance is not a mean of squares (Pow exponent is not 2)"
        if model_opset(graph, ctx) < 17 and not self.below_17:
            return "opset < 17 has no LayerNormalization"
        return self._common(match)

    def rewrite(self, graph, match, ctx):
        info = match.info
        replace(graph, match, "LayerNormalization", [info["x"], *self._params(graph, match, True)],
                {"axis": -info["k"], "epsilon": info["epsilon"]})


class LayerNormOrt(LayerNorm):
    name = "layernorm-ort"
    below_17 = True


class RmsNorm(_NormBase):
    """x / Sqrt(ReduceMean(x^2) + eps) [* gamma] -> SimplifiedLayerNormalization."""

    name = "rmsnorm"
    anchor_ops = ("ReduceMean",)

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
        return Match([node, square, *es_nodes, *norm_nodes, *tail], {
            "x": x, "eps": eps, "gamma": gamma, "beta": None, "reduces": [node], "square": square,
            "outputs": [out],
        })

    def preconditions(self, graph, match, ctx):
        square = match.info["square"]
        if square.op == "Pow" and not near(scalar(square.inputs[1]), 2.0):
            return "not a mean of squares (Pow exponent is not 2)"
        if ctx.provider not in ("cpu", "cuda"):
            return f"SimplifiedLayerNormalization is an onnxruntime op (provider {ctx.provider})"
        return self._common(match)

    def rewrite(self, graph, match, ctx):
        info = match.info
        replace(graph, match, "SimplifiedLayerNormalization", [info["x"], *self._params(graph, match, False)],
                {"axis": -info["k"], "epsilon": info["epsilon"]})


@dataclasses.dataclass(frozen=True)
class SkipMatch:
    """residual a + b (+ bias) -> [Cast] -> norm; ``total`` is the sum the norm reads, also an
    output of the fused op when read elsewhere (``keep_sum``)."""

    a: gs.Tensor
    b: gs.Tensor
    bias: gs.Tensor | None
    cast: gs.Node | None
    total: gs.Tensor
    keep_sum: bool


class SkipLayerNorm(FusionRule):
    """(a + b [+ bias]) -> LayerNormalization / SimplifiedLayerNormalization  ->  Skip* op."""

    name = "skip-layernorm"
    anchor_ops = ("LayerNormalization", "SimplifiedLayerNormalization")

    def __init__(self):
        self._shapes: ShapeOracle | None = None  # inferred once per run, on first need

    def match(self, graph, node):
        if node.domain or any(o.outputs or is_graph_output(graph, o) for o in node.outputs[1:]):
            return None
        cast = producer_op(node.inputs[0], "Cast")  # TorchScript's Llama casts the sum to float
        add = producer_op(cast.inputs[0] if cast is not None else node.inputs[0], "Add")
        if add is None or any(is_const(t) for t in add.inputs):
            return None
        a, b = add.inputs
        nodes, bias = [node, add] + ([cast] if cast is not None else []), None
        for side, other in either_order(add):
            bias_add = producer_op(side, "Add")
            if bias_add is not None and len(side.outputs) == 1 and split_const(bias_add) is not None:
                value = const_value(split_const(bias_add)[1])
                if value is not None and value.ndim == 1:
                    a, b, bias = split_const(bias_add)[0], other, split_const(bias_add)[1]
                    nodes.append(bias_add)
                    break
        total = cast.outputs[0] if cast is not None else add.outputs[0]  # a Cast to check: a no-op's output is the sum
        keep_sum = len(total.outputs) > 1 or is_graph_output(graph, total)
        return Match(nodes, SkipMatch(a, b, bias, cast, total, keep_sum))

    def check(self, graph, match, ctx):
        node, add, info = match.nodes[0], match.nodes[1], match.info
        if self._shapes is None:
            self._shapes = ShapeOracle(graph, ctx)
        if info.cast is not None:
            if self._shapes.dtype(add.outputs[0]) != int(info.cast.attrs["to"]):
                return self.refusal("a Cast between the residual sum and the norm changes the type", match)
            if add.outputs[0].outputs != [info.cast] or is_graph_output(graph, add.outputs[0]):
                return self.refusal("the residual sum is read both before and after its Cast", match)
        bias_add = next((n for n in match.nodes[2:] if n.op == "Add"), None)
        if bias_add is not None and bias_add.outputs[0].outputs != [add]:
            return self.refusal(f"bias output {match.nodes[2].outputs[0].name} has other consumers", match)
        if int(node.attrs.get("axis", -1)) not in (-1, 2) or int(node.attrs.get("stash_type", 1)) != 1:
            return self.refusal("norm is not over the last axis of a 3-D input", match)
        if len(node.inputs) < 2 or not all(is_const(t) for t in node.inputs[1:] if t.name):
            return self.refusal("norm scale/bias not constant", match)
        sa = self._shapes.shape(info.a)
        if not (self._shapes.same(info.a, info.b) and len(sa) == 3):
            return self.refusal(f"residual inputs do not surely have the same 3-D shape ({sa} vs "
                                f"{self._shapes.shape(info.b)})", match)
        if info.bias is not None and const_value(info.bias).shape[0] != sa[-1]:
            return self.refusal("bias is not over the hidden axis", match)
        return None

    def rewrite(self, graph, match, ctx):
        need_ms_domain(ctx)
        node, info = match.nodes[0], match.info
        simplified = node.op == "SimplifiedLayerNormalization"
        params = [t for t in node.inputs[1:] if t.name]
        if simplified:
            op, params = "SkipSimplifiedLayerNormalization", params[:1]
        else:
            op = "SkipLayerNormalization"
            if len(params) == 1:
                gamma = const_value(params[0])
                params.append(fresh_constant(graph, f"{node.name}_zero_bias", np.zeros_like(gamma)))
        inputs = [info.a, info.b, *params]
        if info.bias is not None:
            bias = info.bias
            inputs.append(bias if isinstance(bias, gs.Constant) else fresh_constant(graph, f"{node.name}_bias",
                                                                                 const_value(bias)))
        outputs = [node.outputs[0]]
        if info.keep_sum:
            outputs += [gs.Variable.empty(), gs.Variable.empty(), info.total]
        eps = float(node.attrs.get("epsilon", 1e-5))
        replace(graph, match, op, inputs, {"epsilon": eps}, domain=MS_DOMAIN, outputs=outputs)


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


class FuseSkipLayerNorm(RulePass):
    name = "fuse-skip-layernorm"
    description = "residual Add + (Simplified)LayerNormalization -> com.microsoft Skip(Simplified)LayerNormalization"
    # The fused kernel adds and normalises in one sweep with its own accumulation order.
    tolerance = (1e-4, 1e-5)
    rules = (SkipLayerNorm,)


PASSES = (FuseLayerNorm, FuseLayerNormOrt, FuseRmsNorm, FuseSkipLayerNorm)
