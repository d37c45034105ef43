"""Movement that onnxruntime's CPU provider runs slowly in its int8 layout, rewritten exactly.

onnxruntime runs quantized convolutions channels-last (NHWC) and pushes the
layout transposes through the ops around them, so data movement between
integer kernels runs in NHWC too. Three patterns pay for it (the third,
per-channel scales of squeeze-excitation blocks, in wide_channel_scales):

  * ConvTranspose has no integer kernel: it stays float with a
    DequantizeLinear before and a QuantizeLinear after. Without overlapping
    windows it is a 1x1 convolution and a pixel shuffle: the registered pass
    convtranspose-shuffle (passes/fusion/convtranspose_shuffle.py, its math and
    preconditions there), run by convtranspose_as_conv_shuffle.
  * Resize (nearest, integer factors) on u8 in NHWC takes onnxruntime's
    generic per-element path (2.2 ms for 80x80x96 -> 160x160x96 where NCHW
    takes 0.09 ms), and DepthToSpace on u8 is slower still.

nhwc_data_movement rewrites DQ(q) -> {Resize | DepthToSpace} [-> Q] into the
same movement of the integer tensor q written in NHWC:

    Transpose(NCHW->NHWC) -> NHWC movement -> Transpose(NHWC->NCHW) [-> DQ]

  Resize, factors (sh, sw):  Unsqueeze(axes 2, 4) -> Expand(1,1,sh,1,sw,1)
                             -> Reshape(N, H*sh, W*sw, C)     (repeats rows of C)
  DepthToSpace DCR, block k: Split(channels, k) -> Unsqueeze(2) each -> Concat(2)
                             -> Reshape(N, H*k, W*k, C)       (moves runs of k*C;
                             half the time of the equivalent 5-D Transpose)

Moving integers commutes with the elementwise DQ, and a Q with the DQ's scale
and zero point after pure movement gives back the same integers, so the result
is bit-exact. onnxruntime cancels the two outer transposes against the ones it
puts around the NHWC kernels; where it cannot (no integer kernel beside the
op), they would run for real, so the caller (formats.static_qdq) keeps each
kind of rewrite only when the optimized graph has no more Transpose nodes than
before (``ort_transposes``).

Resize counts as nearest repetition when mode is nearest, scales are
[1, 1, sh, sw] with integer sh, sw >= 1 and the coordinate mapping sends
output i to input floor(i / s): asymmetric with nearest_mode floor, or
half_pixel / pytorch_half_pixel with either round_prefer mode (the source
coordinate (i + 0.5) / s - 0.5 lies strictly within half a step of i // s).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxforge.opsets import default_opset

from .equalize import graph_maps
from .ortsession import static_shapes

REPEATING_MODES = {
    ("asymmetric", "floor"),
    ("half_pixel", "round_prefer_floor"),
    ("half_pixel", "round_prefer_ceil"),
    ("pytorch_half_pixel", "round_prefer_floor"),
    ("pytorch_half_pixel", "round_prefer_ceil"),
}
TO_NHWC, TO_NCHW = [0, 2, 3, 1], [0, 3, 1, 2]


# ------------------------------------------------------------------ float: ConvTranspose -> Conv + DepthToSpace


def convtranspose_as_conv_shuffle(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Non-overlapping ConvTranspose -> 1x1 Conv + DepthToSpace(DCR), the activation moved
    before the shuffle: the registered pass convtranspose-shuffle (its math and
    preconditions in passes/fusion/convtranspose_shuffle.py); (model, ConvTransposes rewritten)."""
    from .registered import apply_passes

    before = sum(n.op_type == "ConvTranspose" for n in model.graph.node)
    if not before:
        return model, 0
    out, _fired = apply_passes(model, ("convtranspose-shuffle",))
    return out, before - sum(n.op_type == "ConvTranspose" for n in out.graph.node)


# ------------------------------------------------------------------ int8: movement of the integers in NHWC


def nhwc_data_movement(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """DQ -> Resize/DepthToSpace [-> Q] as NHWC movement of the integers (in place); (model, count)."""

    graph = model.graph
    producers, readers, inits, outputs = graph_maps(model)
    shapes = static_shapes(model)
    opset = default_opset(model)
    new_nodes, dropped, bypassed, changed = [], set(), [], 0
    for node in graph.node:
        site = _movement_site(node, producers, readers, inits, outputs)
        if site is None:
            new_nodes.append(node)
            continue
        dq, requantizers, chain = site
        new_nodes.extend(_integer_chain(node, dq, requantizers, chain, shapes.get(node.input[0]), opset, graph, inits))
        dropped.update(id(q) for q in requantizers)
        bypassed.append(dq)
        changed += 1
    if changed:
        del graph.node[:]
        graph.node.extend(n for n in new_nodes if id(n) not in dropped)
        _drop_unread(graph, bypassed, outputs)  # the DQs the moved integers bypass
    return model, changed


def _fresh_name(model: onnx.ModelProto, stem: str) -> str:
    taken = {name for n in model.graph.node for name in (*n.input, *n.output)}
    name, i = stem, 0
    while name in taken:
        i += 1
        name = f"{stem}_{i}"
    return name


def _movement_site(node, producers, readers, inits, outputs):
    """(input DQ, output Qs that only restore the same grid, chain spec) or None."""
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Resize":
        chain = _resize_factors(node, inits)
    elif node.op_type == "DepthToSpace":
        mode = node_attr(node, "mode", "DCR")
        chain = ("d2s", node_attr(node, "blocksize", 0)) if mode == "DCR" else None
    else:
        return None
    if chain is None:
        return None
    dq = producers.get(node.input[0])
    if dq is None or dq.op_type != "DequantizeLinear" or dq.domain not in ("", "ai.onnx") or dq.input[0] in inits:
        return None
    if not _per_tensor(dq, inits) or len(dq.input) < 3 or not dq.input[2]:
        return None  # without a zero point the integer type is not known here
    users = readers.get(node.output[0], [])
    same_grid = [u for u in users if u.op_type == "QuantizeLinear" and u.domain in ("", "ai.onnx") and _per_tensor(u, inits) and _same_grid(dq, u, inits)]
    if node.output[0] in outputs:
        same_grid = []
    return dq, same_grid if len(same_grid) == len(users) else [], chain


def _resize_factors(node, inits):
    if len(node.input) < 3 or node.input[2] not in inits or (len(node.input) > 3 and node.input[3]):
        return None
    if node_attr(node, "mode", "nearest") != "nearest":
        return None
    if (node_attr(node, "coordinate_transformation_mode", "half_pixel"), node_attr(node, "nearest_mode", "round_prefer_floor")) not in REPEATING_MODES:
        return None
    scales = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64).reshape(-1)
    if scales.size != 4 or scales[0] != 1 or scales[1] != 1:
        return None
    sh, sw = scales[2:]
    if sh < 1 or sw < 1 or sh != int(sh) or sw != int(sw) or (sh, sw) == (1, 1):
        return None
    return ("repeat", int(sh), int(sw))


def _integer_chain(node, dq, requantizers, chain, dims, opset, graph, inits) -> list[onnx.NodeProto]:
    """``dims``: the NCHW input shape when known (the output shape is then a constant)."""
    base = node.name or node.output[0]
    q_in = dq.input[0]
    moved = f"{base}_nhwc_moved"
    nodes = [helper.make_node("Transpose", [q_in], [f"{base}_nhwc_in"], name=f"{base}_to_nhwc", perm=TO_NHWC)]
    if chain[0] == "repeat":
        _, sh, sw = chain
        out_shape = _out_shape(nodes, base, dims, (sh, sw, 1), graph, inits)
        nodes += [
            helper.make_node("Unsqueeze", [f"{base}_nhwc_in", _i64(graph, inits, f"{base}_unsqueeze_axes", [2, 4])], [f"{base}_nhwc_6d"], name=f"{base}_nhwc_unsqueeze"),
            helper.make_node("Expand", [f"{base}_nhwc_6d", _i64(graph, inits, f"{base}_repeats", [1, 1, sh, 1, sw, 1])], [f"{base}_nhwc_repeated"], name=f"{base}_nhwc_expand"),
            helper.make_node("Reshape", [f"{base}_nhwc_repeated", out_shape], [moved], name=f"{base}_nhwc_merge"),
        ]
    else:
        _, k = chain
        out_shape = _out_shape(nodes, base, dims, (k, k, k * k), graph, inits)
        nodes += [
            # row k*i + a of the output is the a-th k*C run of every pixel of row i:
            # split the channels into k runs and stack them under each row
            helper.make_node("Split", [f"{base}_nhwc_in"], [f"{base}_nhwc_run{a}" for a in range(k)], name=f"{base}_nhwc_runs", axis=3,
                             **({"num_outputs": k} if opset >= 18 else {})),
            *[helper.make_node("Unsqueeze", [f"{base}_nhwc_run{a}", _i64(graph, inits, f"{base}_row_axis", [2])], [f"{base}_nhwc_row{a}"], name=f"{base}_nhwc_row{a}") for a in range(k)],
            helper.make_node("Concat", [f"{base}_nhwc_row{a}" for a in range(k)], [f"{base}_nhwc_interleaved"], name=f"{base}_nhwc_interleave", axis=2),
            helper.make_node("Reshape", [f"{base}_nhwc_interleaved", out_shape], [moved], name=f"{base}_nhwc_merge"),
        ]
    if requantizers:  # the Qs gave back the same integers: their readers read the moved ones
        nodes.append(helper.make_node("Transpose", [moved], [requantizers[0].output[0]], name=f"{base}_to_nchw", perm=TO_NCHW))
        nodes += [helper.make_node("Identity", [requantizers[0].output[0]], [q.output[0]], name=f"{base}_same_grid{i}") for i, q in enumerate(requantizers[1:])]
    else:
        nodes.append(helper.make_node("Transpose", [moved], [f"{base}_nchw_q"], name=f"{base}_to_nchw", perm=TO_NCHW))
        nodes.append(helper.make_node("DequantizeLinear", [f"{base}_nchw_q", *dq.input[1:]], [node.output[0]], name=f"{base}_dq"))
    return nodes


def _out_shape(nodes, base, dims, factors, graph, inits) -> str:
    """The NHWC output shape [N, H*fh, W*fw, C/fc]: a constant when H, W, C are known
    (0 keeps N), else computed from the input's shape (appended to ``nodes``)."""
    fh, fw, fc = factors
    if dims is not None and len(dims) == 4 and all(isinstance(d, int) and d > 0 for d in dims[1:]):
        _n, c, h, w = dims
        return _i64(graph, inits, f"{base}_nhwc_out_shape", [0, h * fh, w * fw, c // fc])
    nodes += [
        helper.make_node("Shape", [f"{base}_nhwc_in"], [f"{base}_nhwc_shape"], name=f"{base}_nhwc_shape"),
        helper.make_node("Mul", [f"{base}_nhwc_shape", _i64(graph, inits, f"{base}_grow", [1, fh, fw, 1])], [f"{base}_nhwc_grown"], name=f"{base}_nhwc_grown"),
        helper.make_node("Div", [f"{base}_nhwc_grown", _i64(graph, inits, f"{base}_shrink", [1, 1, 1, fc])], [f"{base}_nhwc_out_shape"], name=f"{base}_nhwc_out_shape"),
    ]
    return f"{base}_nhwc_out_shape"


def wide_channel_scales(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Per-channel scales [N, C, 1, 1] of a quantized Mul/Add widened along W: the registered
    pass wide-channel-scales (passes/qdq/wide_scales.py, its math and preconditions there);
    (model, scales widened)."""
    from .registered import apply_passes

    return apply_passes(model, ("wide-channel-scales",))


def _drop_unread(graph, dqs, outputs) -> None:
    """Remove the DQs in ``dqs`` that nothing (subgraphs included) reads any more."""
    from .formats import _all_nodes

    still_read = {name for n in _all_nodes(graph) for name in n.input} | set(outputs)
    for dq in dqs:
        if dq.output[0] not in still_read and dq in graph.node:
            graph.node.remove(dq)


def ort_transposes(model: onnx.ModelProto) -> int:
    """Transpose nodes in onnxruntime's optimized CPU graph of ``model``: the layout
    transposes written here cancel only where integer kernels run in NHWC around them."""
    from .prepare import ort_offline

    return sum(1 for n in ort_offline(model, level="all", weights=False).graph.node if n.op_type == "Transpose")


# ------------------------------------------------------------------ helpers


def node_attr(node, name, default):
    """An attribute's value (strings decoded), or ``default``."""
    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def add_initializer(graph, inits, tensor):
    """Append ``tensor`` to the graph and to ``inits``; returns its name."""
    graph.initializer.append(tensor)
    inits[tensor.name] = tensor
    return tensor.name


def _per_tensor(qdq, inits) -> bool:
    scale = inits.get(qdq.input[1])
    zero = inits.get(qdq.input[2]) if len(qdq.input) > 2 and qdq.input[2] else None
    return scale is not None and int(np.prod(scale.dims)) == 1 and (zero is None or int(np.prod(zero.dims)) == 1)


def _same_grid(dq, q, inits) -> bool:
    def value(name, default):
        return float(numpy_helper.to_array(inits[name]).reshape(-1)[0]) if name else default

    dq_zero = dq.input[2] if len(dq.input) > 2 else ""
    q_zero = q.input[2] if len(q.input) > 2 else ""
    # both zero points given and of one type: the Q's output type is the DQ's input type
    if not dq_zero or not q_zero or inits[dq_zero].data_type != inits[q_zero].data_type or node_attr(q, "output_dtype", 0):
        return False
    return value(dq.input[1], 1.0) == value(q.input[1], 1.0) and value(dq_zero, 0.0) == value(q_zero, 0.0)


def _i64(graph, inits, name, values) -> str:
    if name not in inits:
        add_initializer(graph, inits, numpy_helper.from_array(np.array(values, dtype=np.int64), name))
    return name

