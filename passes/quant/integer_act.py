"""Integer HardSwish / HardSigmoid for onnxruntime's CPU provider (QDQ rewrite).

onnxruntime's CPU provider has no integer kernel for HardSwish or HardSigmoid
(HardSwish even runs as a function: HardSigmoid then Mul), so in a QDQ model
each one costs DequantizeLinear + float op(s) + QuantizeLinear on a full
activation tensor and breaks the NHWC chain of integer convolutions. Both are
rewritten here into ops onnxruntime fuses into QLinearAdd / QLinearMul:

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

  Add of a constant: u = h + c with c the same for every element, read only
    through Q -> DQ: when c is k steps of h's grid (k = round(c / s)), the DQs
    that read u read h's integers instead with zero point z - k. No kernel at
    all, and convolutions that read it pad with the zero point, i.e. with the
    real 0 of u, as the float model did. The rounding of c to k s (at most half
    a step, the same for every element) is left to bias correction.

Preconditions (per node, else left as it is): the input is a DequantizeLinear
of a u8 per-tensor activation; the output feeds exactly one QuantizeLinear (u8,
per tensor, scalar scale) and nothing else; HardSigmoid alpha > 0.
Extra error: HardSwish's r has a step of 6/255, so |delta| <= |y| / 510;
HardSigmoid adds no rounding beyond its own output grid (1/255).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .equalize import graph_maps


def integer_activations(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Rewrite HardSwish/HardSigmoid between Q/DQ in ``model`` (in place); returns (model, count)."""
    graph = model.graph
    producer, consumers, inits, _outputs = graph_maps(model)
    rewritten = 0
    dropped: set[int] = set()
    for node in graph.node:
        gone = _shift_into_zero_point(node, producer, consumers, graph, inits)
        if gone:
            dropped.update(id(n) for n in gone)
            rewritten += 1
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if id(node) in dropped:
            continue
        site = _site(node, producer, consumers, inits)
        if site is None:
            new_nodes.append(node)
            continue
        dq, q = site
        if node.op_type == "HardSwish":
            new_nodes.extend(_hardswish(node, dq, q, graph, inits))
        else:
            new_nodes.extend(_hardsigmoid(node, q, consumers, graph, inits))
        rewritten += 1
    if rewritten:
        new_nodes = [n for n in new_nodes if id(n) not in dropped]
        del graph.node[:]
        graph.node.extend(new_nodes)  # each rewrite sits where its node was: still topological
    return model, rewritten


def _site(node, producer, consumers, inits):
    """(input DQ, output Q) when ``node`` is a rewritable HardSwish/HardSigmoid."""
    if node.op_type not in ("HardSwish", "HardSigmoid") or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "HardSigmoid" and node_attr(node, "alpha", 0.2) <= 0:
        return None
    dq = producer.get(node.input[0])
    users = consumers.get(node.output[0], [])
    if dq is None or dq.op_type != "DequantizeLinear" or len(users) != 1 or users[0].op_type != "QuantizeLinear":
        return None
    q = users[0]
    for qdq in (dq, q):
        if len(qdq.input) < 3 or not _scalar_u8(inits, qdq.input[1], qdq.input[2]) or node_attr(qdq, "axis", None) not in (None, 1):
            return None
    return dq, q


def _scalar_u8(inits, scale_name, zero_name) -> bool:
    scale, zero = inits.get(scale_name), inits.get(zero_name)
    return (
        scale is not None and zero is not None and zero.data_type == TensorProto.UINT8
        and scale.data_type == TensorProto.FLOAT and int(np.prod(scale.dims)) == 1
    )


def _hardswish(node, dq, q, graph, inits):
    """y -> Add(+3) -> Q(6/255) -> DQ -> Mul(y, .) -> Q(6 s, z) (the old Q, rescaled)."""
    base = node.name or node.output[0]
    y_again = f"{base}_y"
    plus3, r_q, r = f"{base}_plus3", f"{base}_relu6_q", f"{base}_relu6"
    three_q, three_s, three_z = _const(graph, inits, f"{base}_three", 3.0)
    r_s, r_z = _scale(graph, inits, f"{base}_relu6_scale", 6.0 / 255.0), _zero(graph, inits, f"{base}_relu6_zero")
    old_scale = float(numpy_helper.to_array(inits[q.input[1]]).reshape(-1)[0])
    m_s = _scale(graph, inits, f"{base}_product_scale", 6.0 * old_scale)
    nodes = [
        # a DQ of its own per consumer: onnxruntime's QDQ node units want unshared DQs
        helper.make_node("DequantizeLinear", list(dq.input), [y_again], name=f"{base}_dq_y"),
        helper.make_node("DequantizeLinear", [three_q, three_s, three_z], [f"{base}_three_dq"], name=f"{base}_dq_three"),
        helper.make_node("Add", [y_again, f"{base}_three_dq"], [plus3], name=f"{base}_add3"),
        helper.make_node("QuantizeLinear", [plus3, r_s, r_z], [r_q], name=f"{base}_q_relu6"),
        helper.make_node("DequantizeLinear", [r_q, r_s, r_z], [r], name=f"{base}_dq_relu6"),
        helper.make_node("Mul", [node.input[0], r], [node.output[0]], name=f"{base}_mul"),
    ]
    q.input[1] = m_s
    return nodes


def _hardsigmoid(node, q, consumers, graph, inits):
    """y -> Add(b/a) -> Q(1/(255 a), 0); the DQs reading it use (1/255, 0)."""
    base = node.name or node.output[0]
    alpha, beta = node_attr(node, "alpha", 0.2), node_attr(node, "beta", 0.5)
    shift = beta / alpha
    shift_q, shift_s, shift_z = _const(graph, inits, f"{base}_shift", shift)
    q.input[1] = _scale(graph, inits, f"{base}_presat_scale", 1.0 / (255.0 * alpha))
    q.input[2] = _zero(graph, inits, f"{base}_presat_zero")
    out_s, out_z = _scale(graph, inits, f"{base}_out_scale", 1.0 / 255.0), _zero(graph, inits, f"{base}_out_zero")
    for reader in consumers.get(q.output[0], []):
        if reader.op_type == "DequantizeLinear":
            reader.input[1], reader.input[2] = out_s, out_z
    return [
        helper.make_node("DequantizeLinear", [shift_q, shift_s, shift_z], [f"{base}_shift_dq"], name=f"{base}_dq_shift"),
        helper.make_node("Add", [node.input[0], f"{base}_shift_dq"], [node.output[0]], name=f"{base}_add_shift"),
    ]


def _shift_into_zero_point(add, producer, consumers, graph, inits) -> list[onnx.NodeProto]:
    """Nodes made dead when Add(DQ(h), c) -> Q -> DQs becomes DQs of h with zero point z - k."""
    if add.op_type != "Add" or len(add.input) != 2:
        return []
    sources = [producer.get(name) for name in add.input]
    if any(s is None or s.op_type != "DequantizeLinear" for s in sources):
        return []
    const = [i for i, s in enumerate(sources) if s.input[0] in inits]
    if len(const) != 1:
        return []
    h_dq, c_dq = sources[1 - const[0]], sources[const[0]]
    c = _dequantized(c_dq, inits)
    users = consumers.get(add.output[0], [])
    if c is None or c.size == 0 or not np.all(c == c.flat[0]) or len(users) != 1 or users[0].op_type != "QuantizeLinear":
        return []
    q = users[0]
    readers = consumers.get(q.output[0], [])
    if not readers or any(r.op_type != "DequantizeLinear" for r in readers) or len(consumers.get(h_dq.output[0], [])) != 1:
        return []
    if not _scalar_u8(inits, h_dq.input[1], h_dq.input[2]) or h_dq.input[0] in inits:
        return []
    scale = float(numpy_helper.to_array(inits[h_dq.input[1]]).reshape(-1)[0])
    zero = int(numpy_helper.to_array(inits[h_dq.input[2]]).reshape(-1)[0])
    k = int(round(float(c.flat[0]) / scale))
    if not 0 <= zero - k <= 255:
        return []
    shifted = add_initializer(graph, inits, numpy_helper.from_array(np.array(zero - k, dtype=np.uint8), f"{add.name or add.output[0]}_shifted_zero_point"))
    for reader in readers:
        reader.input[:] = [h_dq.input[0], h_dq.input[1], shifted]
        for a in list(reader.attribute):
            if a.name == "axis":
                reader.attribute.remove(a)
    gone = [add, q, h_dq]
    if len(consumers.get(c_dq.output[0], [])) == 1:
        gone.append(c_dq)
    return gone


def _dequantized(dq, inits) -> np.ndarray | None:
    try:
        q = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float64)
        s = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
        z = numpy_helper.to_array(inits[dq.input[2]]).astype(np.float64) if len(dq.input) > 2 else 0.0
    except KeyError:
        return None
    if np.ndim(s) or np.ndim(z):
        return None  # per-axis constants: not one value
    return (q - z) * s


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


def _scale(graph, inits, name, value):
    return add_initializer(graph, inits, numpy_helper.from_array(np.array(value, dtype=np.float32), name))


def _zero(graph, inits, name):
    return add_initializer(graph, inits, numpy_helper.from_array(np.array(0, dtype=np.uint8), name))


def _const(graph, inits, name, value):
    """A scalar constant as u8 (quantized, scale, zero point), exact up to float32
    rounding, so DQ -> op -> Q fuses (QLinearAdd wants both inputs u8)."""
    if value == 0:
        q, scale, zero = 0, 1.0, 0
    elif value > 0:
        q, scale, zero = 255, value / 255.0, 0
    else:
        q, scale, zero = 0, -value / 255.0, 255
    return (
        add_initializer(graph, inits, numpy_helper.from_array(np.array(q, dtype=np.uint8), name + "_quantized")),
        _scale(graph, inits, name + "_scale", scale),
        add_initializer(graph, inits, numpy_helper.from_array(np.array(zero, dtype=np.uint8), name + "_zero_point")),
    )
