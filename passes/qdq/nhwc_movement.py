"""Nearest Resize / DepthToSpace of quantized activations written as NHWC movement of the integers.

onnxruntime runs quantized convolutions channels-last (NHWC) and pushes its layout
transposes through the ops around them, so data movement between integer kernels runs in
NHWC too, where Resize (nearest, integer factors) on u8 takes its generic per-element path
(2.2 ms for 80x80x96 -> 160x160x96 where NCHW takes 0.09 ms) and DepthToSpace on u8 is
slower still. DQ(q) -> {Resize | DepthToSpace} [-> Q] becomes the same movement of the
integer tensor q written in NHWC:

    Transpose(NCHW->NHWC) -> NHWC movement -> Transpose(NHWC->NCHW) [-> DQ]

  Resize, factors (sh, sw):  Unsqueeze(axes 2, 4) -> Expand(1,1,sh,1,sw,1)
                             -> Reshape(N, H*sh, W*sw, C)     (repeats rows of C)
  DepthToSpace DCR, block k: Split(channels, k) -> Unsqueeze(2) each -> Concat(2)
                             -> Reshape(N, H*k, W*k, C)       (moves runs of k*C;
                             half the time of the equivalent 5-D Transpose)

Moving integers commutes with the elementwise DQ, and a Q with the DQ's scale and zero
point after pure movement gives back the same integers, so the result is bit-exact (those
Qs go: their readers read the moved integers). Resize counts as nearest repetition when
mode is nearest, scales are [1, 1, sh, sw] with integer sh, sw >= 1 (not both 1) and the
coordinate mapping sends output i to input floor(i / s): asymmetric with nearest_mode
floor, or half_pixel / pytorch_half_pixel with either round_prefer mode (the source
coordinate (i + 0.5) / s - 0.5 lies strictly within half a step of i // s). Preconditions:
the input is a DequantizeLinear of an activation, per tensor, with a zero point (it gives
the integer type). The quantizer keeps the result only where onnxruntime's layout
transposes cancel around it (quant/layout.py).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.passes.base import Match, Rule, RulePass
from onnxforge.passes.fusion._match import infer_shapes, model_opset
from onnxforge.passes.matching import DEFAULT_DOMAINS

from .common import activation_dq, fresh_name, i64

REPEATING_MODES = {
    ("asymmetric", "floor"),
    ("half_pixel", "round_prefer_floor"),
    ("half_pixel", "round_prefer_ceil"),
    ("pytorch_half_pixel", "round_prefer_floor"),
    ("pytorch_half_pixel", "round_prefer_ceil"),
}
TO_NHWC, TO_NCHW = [0, 2, 3, 1], [0, 3, 1, 2]


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _scalar_constant(tensor) -> float | None:
    return float(np.asarray(tensor.values).reshape(-1)[0]) if isinstance(tensor, gs.Constant) else None


def per_tensor_with_zero(qdq: gs.Node) -> bool:
    scale = qdq.inputs[1] if len(qdq.inputs) > 1 else None
    zero = qdq.inputs[2] if len(qdq.inputs) > 2 and qdq.inputs[2].name else None
    return (isinstance(scale, gs.Constant) and np.asarray(scale.values).size == 1
            and isinstance(zero, gs.Constant) and np.asarray(zero.values).size == 1)


def same_grid(dq: gs.Node, q: gs.Node) -> bool:
    """``q`` gives back the integers ``dq`` read: same scale, same zero point of the same type."""
    if not per_tensor_with_zero(q) or q.attrs.get("output_dtype", 0):
        return False
    if np.asarray(dq.inputs[2].values).dtype != np.asarray(q.inputs[2].values).dtype:
        return False
    return _scalar_constant(dq.inputs[1]) == _scalar_constant(q.inputs[1]) and \
        _scalar_constant(dq.inputs[2]) == _scalar_constant(q.inputs[2])


@dataclasses.dataclass(frozen=True)
class MovementMatch:
    dq: gs.Node  # the DequantizeLinear of the moved activation


class IntegerMovement(Rule):
    name = "nhwc-integer-movement"
    anchor_ops = ("Resize", "DepthToSpace")

    def __init__(self):
        self._shapes = None  # inferred once per sweep, on the first rewrite

    def match(self, graph, node):
        if node.domain not in DEFAULT_DOMAINS:
            return None
        dq = activation_dq(node.inputs[0])
        return Match([node], MovementMatch(dq)) if dq is not None else None

    def check(self, graph, match, ctx):
        node, dq = match.nodes[0], match.info.dq
        chain = self._resize(node, match) if node.op == "Resize" else self._depth_to_space(node, match)
        if not isinstance(chain, tuple):
            return chain
        if not per_tensor_with_zero(dq):
            return self.refusal("the input is not quantized per tensor with a zero point", match)
        users = node.outputs[0].outputs
        same = [u for u in users if u.op == "QuantizeLinear" and u.domain in DEFAULT_DOMAINS and same_grid(dq, u)]
        if any(o is node.outputs[0] for o in graph.outputs):
            same = []
        return chain, same if len(same) == len(users) else []  # the plan: the movement, the Qs that go

    def _resize(self, node, match):
        scales = node.inputs[2] if len(node.inputs) > 2 else None
        if not isinstance(scales, gs.Constant) or (len(node.inputs) > 3 and node.inputs[3].name):
            return self.refusal("scales not constant, or sizes given", match)
        if _text(node.attrs.get("mode", "nearest")) != "nearest":
            return self.refusal("not nearest interpolation", match)
        mapping = (_text(node.attrs.get("coordinate_transformation_mode", "half_pixel")),
                   _text(node.attrs.get("nearest_mode", "round_prefer_floor")))
        if mapping not in REPEATING_MODES:
            return self.refusal(f"coordinate mapping {mapping[0]}/{mapping[1]} does not repeat pixels", match)
        s = np.asarray(scales.values, dtype=np.float64).reshape(-1)
        if s.size != 4 or s[0] != 1 or s[1] != 1 or min(s[2:]) < 1 or any(v != int(v) for v in s[2:]) or (s[2], s[3]) == (1, 1):
            return self.refusal(f"scales {s.tolist()} are not integer factors of H and W only", match)
        return ("repeat", int(s[2]), int(s[3]))

    def _depth_to_space(self, node, match):
        if _text(node.attrs.get("mode", "DCR")) != "DCR":
            return self.refusal("DepthToSpace in CRD mode", match)
        return ("d2s", int(node.attrs.get("blocksize", 0)))

    def rewrite(self, graph, match, ctx):
        node, dq = match.nodes[0], match.info.dq
        chain, requantizers = match.plan
        if self._shapes is None:
            self._shapes = infer_shapes(graph, ctx)
        dims = self._shapes.of(node.inputs[0])
        base = fresh_name(graph, node.name or node.outputs[0].name)
        q_in, out = dq.inputs[0], node.outputs[0]
        node.outputs.clear()

        def var(suffix):
            return gs.Variable(f"{base}_{suffix}", dtype=q_in.dtype)

        nodes, nhwc_in, moved = [], var("nhwc_in"), var("nhwc_moved")
        nodes.append(gs.Node("Transpose", f"{base}_to_nhwc", {"perm": TO_NHWC}, [q_in], [nhwc_in]))
        if chain[0] == "repeat":
            _, sh, sw = chain
            out_shape = _out_shape(nodes, base, nhwc_in, dims, (sh, sw, 1))
            six, repeated = var("nhwc_6d"), var("nhwc_repeated")
            nodes += [
                gs.Node("Unsqueeze", f"{base}_nhwc_unsqueeze", inputs=[nhwc_in, i64(f"{base}_unsqueeze_axes", [2, 4])], outputs=[six]),
                gs.Node("Expand", f"{base}_nhwc_expand", inputs=[six, i64(f"{base}_repeats", [1, 1, sh, 1, sw, 1])], outputs=[repeated]),
                gs.Node("Reshape", f"{base}_nhwc_merge", inputs=[repeated, out_shape], outputs=[moved]),
            ]
        else:
            _, k = chain
            out_shape = _out_shape(nodes, base, nhwc_in, dims, (k, k, k * k))
            runs, rows, interleaved = [var(f"nhwc_run{a}") for a in range(k)], [var(f"nhwc_row{a}") for a in range(k)], var("nhwc_interleaved")
            axis = i64(f"{base}_row_axis", [2])
            # row k*i + a of the output is the a-th k*C run of every pixel of row i:
            # split the channels into k runs and stack them under each row
            split_attrs = {"axis": 3, **({"num_outputs": k} if model_opset(graph, ctx) >= 18 else {})}
            nodes.append(gs.Node("Split", f"{base}_nhwc_runs", split_attrs, [nhwc_in], runs))
            nodes += [gs.Node("Unsqueeze", f"{base}_nhwc_row{a}", inputs=[runs[a], axis], outputs=[rows[a]]) for a in range(k)]
            nodes += [gs.Node("Concat", f"{base}_nhwc_interleave", {"axis": 2}, rows, [interleaved]),
                      gs.Node("Reshape", f"{base}_nhwc_merge", inputs=[interleaved, out_shape], outputs=[moved])]
        if requantizers:  # the Qs gave back the same integers: their readers read the moved ones
            outs = [q.outputs[0] for q in requantizers]
            for q in requantizers:
                q.outputs.clear()
            nodes.append(gs.Node("Transpose", f"{base}_to_nchw", {"perm": TO_NCHW}, [moved], [outs[0]]))
            nodes += [gs.Node("Identity", f"{base}_same_grid{i}", inputs=[outs[0]], outputs=[q_out])
                      for i, q_out in enumerate(outs[1:])]
        else:
            nchw = var("nchw_q")
            nodes += [gs.Node("Transpose", f"{base}_to_nchw", {"perm": TO_NCHW}, [moved], [nchw]),
                      gs.Node("DequantizeLinear", f"{base}_dq", dict(dq.attrs), [nchw, *dq.inputs[1:]], [out], domain=dq.domain)]
        graph.nodes += nodes


def _out_shape(nodes: list, base: str, nhwc_in: gs.Tensor, dims, factors) -> gs.Tensor:
    """The NHWC output shape [N, H*fh, W*fw, C/fc]: a constant when H, W, C are known
    (0 keeps N), else computed from the input's shape (appended to ``nodes``)."""
    fh, fw, fc = factors
    if dims is not None and len(dims) == 4 and all(isinstance(d, int) and d > 0 for d in dims[1:]):
        _n, c, h, w = dims
        return i64(f"{base}_nhwc_out_shape", [0, h * fh, w * fw, c // fc])
    shape, grown, out = (gs.Variable(f"{base}_{s}", dtype=np.int64) for s in ("nhwc_shape", "nhwc_grown", "nhwc_out_shape"))
    nodes += [
        gs.Node("Shape", f"{base}_nhwc_shape", inputs=[nhwc_in], outputs=[shape]),
        gs.Node("Mul", f"{base}_nhwc_grown", inputs=[shape, i64(f"{base}_grow", [1, fh, fw, 1])], outputs=[grown]),
        gs.Node("Div", f"{base}_nhwc_out_shape", inputs=[grown, i64(f"{base}_shrink", [1, 1, 1, fc])], outputs=[out]),
    ]
    return out


class NhwcIntegerMovement(RulePass):
    name = "nhwc-integer-movement"
    description = "DQ -> nearest Resize / DepthToSpace [-> same-grid Q] as NHWC movement of the integers (onnxruntime's CPU int8 layout)"
    tolerance = (0.0, 0.0)  # integers moved: bit-exact
    rules = (IntegerMovement,)


PASSES = (NhwcIntegerMovement,)
