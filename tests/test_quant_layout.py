"""Upsampling rewritten for onnxruntime's int8 NHWC layout (passes/quant/layout.py):
ConvTranspose (kernel == stride) as 1x1 Conv + DepthToSpace in float, and nearest
Resize / DepthToSpace of integers written as NHWC movement in QDQ models."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import tensor_ranges

from onnxforge.passes.quant import formats
from onnxforge.passes.quant.layout import convtranspose_as_conv_shuffle, nhwc_data_movement, ort_transposes, wide_channel_scales
from onnxforge.passes.quant.prepare import ort_offline

RNG = np.random.default_rng(11)


def _model(nodes, inits, in_shape, out_shape=None, opset=17):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape or ["n", "c", "h", "w"])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _w(name, shape, scale=0.3):
    return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(np.float32), name)


def _run_all(model, feed):
    """Every output, onnxruntime's optimizations on (its NHWC int8 layout is what is exercised)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feed)


def _run(model, feed):
    return _run_all(model, feed)[0]


def _assert_same_outputs(rewritten, model, feed):
    """Valid, and every output bit-identical to ``model``'s."""
    onnx.checker.check_model(rewritten)
    for a, b in zip(_run_all(rewritten, feed), _run_all(model, feed)):
        np.testing.assert_array_equal(a, b)


def _ops(model):
    return Counter(n.op_type for n in model.graph.node)


def _copy(model):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _convtranspose(k=2, stride=2, act="Relu", **attrs):
    nodes = [helper.make_node("ConvTranspose", ["x", "w", "b"], ["t"], name="up", kernel_shape=[k, k], strides=[stride, stride], **attrs)]
    if act:
        nodes.append(helper.make_node(act, ["t"], ["y"], name="act"))
    else:
        nodes[0].output[0] = "y"
    groups = attrs.get("group", 1)
    return _model(nodes, [_w("w", (8, 6 // groups, k, k)), _w("b", (6,), 1.0)], [1, 8, 5, 7])


# ------------------------------------------------------------------ ConvTranspose -> Conv + DepthToSpace


@pytest.mark.parametrize("act", ["Relu", "Sigmoid", None])
def test_convtranspose_becomes_conv_and_shuffle_exactly(act):
    model = _convtranspose(act=act)
    feed = {"x": RNG.standard_normal((1, 8, 5, 7)).astype(np.float32)}
    before = _run(model, feed)
    rewritten, count = convtranspose_as_conv_shuffle(_copy(model))
    onnx.checker.check_model(rewritten)
    ops = _ops(rewritten)
    assert count == 1 and ops["ConvTranspose"] == 0 and ops["Conv"] == 1 and ops["DepthToSpace"] == 1
    if act:  # the activation moved before the shuffle: it reads the conv
        order = [n.op_type for n in rewritten.graph.node]
        assert order == ["Conv", act, "DepthToSpace"]
    np.testing.assert_allclose(_run(rewritten, feed), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [3, 4])
def test_larger_blocks_and_batches_stay_exact(k):
    nodes = [helper.make_node("ConvTranspose", ["x", "w", "b"], ["t"], kernel_shape=[k, k], strides=[k, k]),
             helper.make_node("LeakyRelu", ["t"], ["y"], alpha=0.1)]
    model = _model(nodes, [_w("w", (8, 5, k, k)), _w("b", (5,), 1.0)], [2, 8, 3, 4])
    feed = {"x": RNG.standard_normal((2, 8, 3, 4)).astype(np.float32)}
    rewritten, count = convtranspose_as_conv_shuffle(_copy(model))
    assert count == 1
    np.testing.assert_allclose(_run(rewritten, feed), _run(model, feed), rtol=1e-5, atol=1e-5)


def test_one_by_one_convtranspose_becomes_a_conv():
    model = _convtranspose(k=1, stride=1, act=None)
    feed = {"x": RNG.standard_normal((1, 8, 5, 7)).astype(np.float32)}
    rewritten, count = convtranspose_as_conv_shuffle(_copy(model))
    assert count == 1 and _ops(rewritten) == Counter({"Conv": 1})
    np.testing.assert_allclose(_run(rewritten, feed), _run(model, feed), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "why, kwargs",
    [
        ("overlapping windows (kernel 3, stride 2)", dict(k=3, stride=2)),
        ("grouped", dict(group=2)),
        ("padded", dict(pads=[1, 1, 1, 1])),
        ("output_padding", dict(output_padding=[1, 1])),
        ("dilated", dict(dilations=[2, 2])),
    ],
)
def test_convtranspose_refusals(why, kwargs):
    model = _convtranspose(**kwargs)
    _, count = convtranspose_as_conv_shuffle(_copy(model))
    assert count == 0, why


def test_convtranspose_with_activation_weight_is_left():
    nodes = [helper.make_node("ConvTranspose", ["x", "wx"], ["y"], kernel_shape=[2, 2], strides=[2, 2])]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 5, 7]), helper.make_tensor_value_info("wx", TensorProto.FLOAT, [8, 6, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert convtranspose_as_conv_shuffle(model)[1] == 0


# ------------------------------------------------------------------ integer movement in NHWC


def _q(name, tensor, scale, zero):
    return [
        numpy_helper.from_array(np.array(scale, np.float32), f"{name}_s"),
        numpy_helper.from_array(np.array(zero, np.uint8), f"{name}_z"),
    ], helper.make_node("QuantizeLinear", [tensor, f"{name}_s", f"{name}_z"], [f"{name}_q"], name=f"{name}_quant")


def _qdq_movement(op, attrs, extra_inputs, in_shape, requantize=True, out_grid=(0.05, 120)):
    """x -> Q -> DQ -> op -> [Q (same grid or not) -> DQ] -> y."""
    inits, q = _q("in", "x", 0.05, 120)
    nodes = [q, helper.make_node("DequantizeLinear", ["in_q", "in_s", "in_z"], ["in_dq"], name="in_dequant")]
    nodes.append(helper.make_node(op, ["in_dq", *[n for n, _ in extra_inputs]], ["moved" if requantize else "y"], name="move", **attrs))
    inits += [v for _, v in extra_inputs if v is not None]
    if requantize:
        more, q2 = _q("out", "moved", *out_grid)
        inits += more
        nodes += [q2, helper.make_node("DequantizeLinear", ["out_q", "out_s", "out_z"], ["y"], name="out_dequant")]
    return _model(nodes, inits, in_shape)


def _nearest(scales, ctm="asymmetric", nearest_mode="floor", mode="nearest"):
    return "Resize", dict(mode=mode, coordinate_transformation_mode=ctm, nearest_mode=nearest_mode), [
        ("", None), ("scales", numpy_helper.from_array(np.array(scales, np.float32), "scales"))
    ]


@pytest.mark.parametrize(
    "op, attrs, extra, shape",
    [
        (*_nearest([1, 1, 2, 2]), [1, 6, 5, 7]),
        (*_nearest([1, 1, 4, 8]), [2, 3, 3, 2]),
        (*_nearest([1, 1, 3, 3], "half_pixel", "round_prefer_floor"), [1, 4, 4, 5]),
        (*_nearest([1, 1, 4, 4], "pytorch_half_pixel", "round_prefer_ceil"), [1, 4, 3, 3]),
        ("DepthToSpace", dict(blocksize=2, mode="DCR"), [], [1, 12, 5, 7]),
        ("DepthToSpace", dict(blocksize=3, mode="DCR"), [], [2, 18, 2, 3]),
    ],
)
@pytest.mark.parametrize("requantize", [True, False])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_integer_movement_is_bit_exact(op, attrs, extra, shape, requantize, dynamic):
    # static shapes: the output shape is a constant; dynamic: computed from Shape
    model = _qdq_movement(op, attrs, extra, ["n", shape[1], "h", "w"] if dynamic else shape, requantize)
    feed = {"x": (RNG.standard_normal(shape) * 3).astype(np.float32)}
    before = _run(model, feed)
    rewritten, count = nhwc_data_movement(_copy(model))
    onnx.checker.check_model(rewritten)
    ops = _ops(rewritten)
    assert count == 1 and ops[op] == 0 and ops["Transpose"] == 2 and ops["Shape"] == int(dynamic)
    # a Q to the same grid after the op is gone (the moved integers are read
    # directly); the DQ before it too: one Q (the input's) and one DQ remain
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 1
    np.testing.assert_array_equal(_run(rewritten, feed), before)


def test_integer_movement_keeps_a_requantization_to_another_grid():
    model = _qdq_movement(*_nearest([1, 1, 2, 2]), [1, 6, 5, 7], out_grid=(0.1, 128))
    feed = {"x": (RNG.standard_normal((1, 6, 5, 7)) * 3).astype(np.float32)}
    rewritten, count = nhwc_data_movement(_copy(model))
    assert count == 1 and _ops(rewritten)["QuantizeLinear"] == 2  # the other grid's Q stays
    np.testing.assert_array_equal(_run(rewritten, feed), _run(model, feed))


@pytest.mark.parametrize(
    "why, op, attrs, extra",
    [
        ("linear interpolation", *_nearest([1, 1, 2, 2], mode="linear")),
        ("fractional factor", *_nearest([1, 1, 1.5, 2])),
        ("channel factor", *_nearest([1, 2, 2, 2])),
        ("round_prefer_floor with asymmetric (not a repeat at factor 4)", *_nearest([1, 1, 4, 4], "asymmetric", "round_prefer_floor")),
        ("tf_half_pixel_for_nearest", *_nearest([1, 1, 2, 2], "tf_half_pixel_for_nearest", "round_prefer_floor")),
        ("CRD DepthToSpace", "DepthToSpace", dict(blocksize=2, mode="CRD"), []),
    ],
)
def test_integer_movement_refusals(why, op, attrs, extra):
    model = _qdq_movement(op, attrs, extra, [1, 12, 4, 4])
    assert nhwc_data_movement(_copy(model))[1] == 0, why


def test_opset_18_split_names_its_outputs():
    model = _qdq_movement("DepthToSpace", dict(blocksize=2, mode="DCR"), [], [1, 12, 5, 7])
    model.opset_import[0].version = 18
    feed = {"x": (RNG.standard_normal((1, 12, 5, 7)) * 3).astype(np.float32)}
    rewritten, count = nhwc_data_movement(_copy(model))
    assert count == 1
    np.testing.assert_array_equal(_run(rewritten, feed), _run(model, feed))


def test_several_same_grid_requantizers_and_an_output():
    """The moved integers feed two Qs of the same grid (unnamed) and the float result is a graph output too."""
    model = _qdq_movement(*_nearest([1, 1, 2, 2]), [1, 6, 5, 7])
    graph = model.graph
    more, q2 = _q("out", "moved", 0.05, 120)
    q2.name = ""
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] == "moved":
            node.name = ""
    q2.output[0] = "out_q2"
    graph.node.extend([q2, helper.make_node("DequantizeLinear", ["out_q2", "out_s", "out_z"], ["y2"])])
    graph.output.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["n", "c", "h", "w"]))
    feed = {"x": (RNG.standard_normal((1, 6, 5, 7)) * 3).astype(np.float32)}
    rewritten, count = nhwc_data_movement(_copy(model))
    assert count == 1 and _ops(rewritten)["Identity"] == 1
    _assert_same_outputs(rewritten, model, feed)


def test_resize_output_that_is_a_graph_output():
    model = _qdq_movement(*_nearest([1, 1, 2, 2]), [1, 6, 5, 7], requantize=False)
    feed = {"x": (RNG.standard_normal((1, 6, 5, 7)) * 3).astype(np.float32)}
    rewritten, count = nhwc_data_movement(_copy(model))
    assert count == 1 and rewritten.graph.output[0].name == "y"
    np.testing.assert_array_equal(_run(rewritten, feed), _run(model, feed))


def test_resize_with_sizes_is_left():
    inits, q = _q("in", "x", 0.05, 120)
    nodes = [q, helper.make_node("DequantizeLinear", ["in_q", "in_s", "in_z"], ["in_dq"]),
             helper.make_node("Resize", ["in_dq", "", "", "sizes"], ["y"], mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")]
    inits.append(numpy_helper.from_array(np.array([1, 6, 10, 14], np.int64), "sizes"))
    model = _model(nodes, inits, [1, 6, 5, 7])
    assert nhwc_data_movement(model)[1] == 0


def test_float_input_is_left():
    op, attrs, extra = _nearest([1, 1, 2, 2])
    model = _model([helper.make_node(op, ["x", *[n for n, _ in extra]], ["y"], **attrs)], [v for _, v in extra if v is not None], [1, 3, 4, 4])
    assert nhwc_data_movement(model)[1] == 0


# ------------------------------------------------------------------ kept only where onnxruntime cancels the transposes


def _conv_resize_conv():
    """Conv -> Relu -> Resize x2 -> Conv, quantized for the CPU."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Resize", ["r1", "", "scales"], ["up"], name="up", mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
        helper.make_node("Conv", ["up", "w2", "b2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    inits = [_w("w1", (16, 8, 3, 3)), _w("b1", (16,)), _w("w2", (8, 16, 3, 3)), _w("b2", (8,)),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]
    model = _model(nodes, inits, [1, 8, 12, 12], opset=13)
    feeds = [{"x": RNG.standard_normal((1, 8, 12, 12)).astype(np.float32)} for _ in range(4)]
    ranges = tensor_ranges(model, feeds)
    spec = formats.spec_for("cpu", model, vnni=True)
    return formats.static_qdq(model, ranges, spec), feeds


def test_static_qdq_writes_resize_in_nhwc_between_integer_convs():
    quantized, feeds = _conv_resize_conv()
    assert _ops(quantized)["Resize"] == 0 and _ops(quantized)["Expand"] == 1
    optimized = _ops(ort_offline(quantized, level="all"))
    assert optimized["Resize"] == 0 and optimized["Transpose"] <= 2  # only the model's own input/output layout
    assert any(op in optimized for op in ("QLinearConv", "NhwcQLinearConv"))


def test_transposes_that_would_run_are_counted():
    """No integer kernel around the Resize: onnxruntime keeps NCHW and the two
    layout transposes would run for real."""
    model = _qdq_movement(*_nearest([1, 1, 2, 2]), [1, 6, 5, 7])
    moved, count = nhwc_data_movement(_copy(model))
    assert count == 1 and ort_transposes(moved) > ort_transposes(model)  # static_qdq keeps it only when <=


# ------------------------------------------------------------------ end to end through quantize()


def test_quantize_runs_fpn_upsampling_on_integer_kernels():
    """Conv -> ConvTranspose(2, 2) -> Relu -> Conv and Conv -> Resize x2 -> Add: after
    quantize() onnxruntime runs no ConvTranspose, no Resize and no float Conv."""
    from onnxforge.passes.quant.quantize import quantize

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("ConvTranspose", ["r1", "wt", "bt"], ["t"], name="up_learned", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Relu", ["t"], ["rt"], name="relu_t"),
        helper.make_node("Resize", ["r1", "", "scales"], ["up"], name="up_nearest", mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
        helper.make_node("Add", ["rt", "up"], ["s"], name="merge"),
        helper.make_node("Conv", ["s", "w2", "b2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    inits = [_w("w1", (16, 8, 3, 3)), _w("b1", (16,)), _w("wt", (16, 16, 2, 2)), _w("bt", (16,)), _w("w2", (8, 16, 3, 3)), _w("b2", (8,)),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]
    model = _model(nodes, inits, [1, 8, 10, 10], opset=13)
    feeds = [{"x": RNG.standard_normal((1, 8, 10, 10)).astype(np.float32)} for _ in range(6)]
    out, report = quantize(model, feeds, measure_latency=False, budget_seconds=60, log=lambda m: None)
    optimized = _ops(ort_offline(out.to_proto(), level="all"))
    assert optimized["ConvTranspose"] == 0 and optimized["Resize"] == 0 and optimized["Conv"] == 0
    assert optimized["QLinearConv"] + optimized["NhwcQLinearConv"] == 3
    assert report.score >= 0.99
    assert any("ConvTranspose" in note for note in report.notes)


# ------------------------------------------------------------------ per-channel scales widened along W


def _scaled(op="Mul", scale_shape=(1, 6, 1, 1), x_shape=(1, 6, 5, 7)):
    """x -> Q -> DQ, s -> Q -> DQ, op(x, s) -> Q -> DQ -> y (a squeeze-excitation product)."""
    inits, qx = _q("xq", "x", 0.05, 120)
    more, qs = _q("sq", "s", 1 / 255, 0)
    inits += more
    out, qy = _q("yq", "prod", 0.02, 128)
    inits += out
    nodes = [
        qx, helper.make_node("DequantizeLinear", ["xq_q", "xq_s", "xq_z"], ["x_dq"]),
        helper.make_node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=1) if scale_shape[2:] == (1, 1) else helper.make_node("Identity", ["x"], ["m"]),
        helper.make_node("Sigmoid", ["m"], ["s"]),
        qs, helper.make_node("DequantizeLinear", ["sq_q", "sq_s", "sq_z"], ["s_dq"]),
        helper.make_node(op, ["x_dq", "s_dq"], ["prod"], name="scale"),
        qy, helper.make_node("DequantizeLinear", ["yq_q", "yq_s", "yq_z"], ["y"]),
    ]
    return _model(nodes, inits, list(x_shape), opset=17)


@pytest.mark.parametrize("op", ["Mul", "Add"])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_channel_scale_widened_exactly(op, dynamic):
    model = _scaled(op, x_shape=("n", 6, "h", "w") if dynamic else (1, 6, 5, 7))
    feed = {"x": (RNG.standard_normal((1, 6, 5, 7)) * 3).astype(np.float32)}
    rewritten, count = wide_channel_scales(_copy(model))
    onnx.checker.check_model(rewritten)
    assert count == 1 and _ops(rewritten)["Expand"] == 1 and _ops(rewritten)["Shape"] == int(dynamic)
    np.testing.assert_array_equal(_run(rewritten, feed), _run(model, feed))


def test_shared_scale_gets_a_dq_per_product():
    """One gate DQ read by two products of different widths and by the graph output."""
    model = _scaled()
    graph = model.graph
    inits, qz = _q("zq", "x2", 0.05, 120)
    graph.initializer.extend(inits)
    more, qy2 = _q("y2q", "prod2", 0.02, 128)
    graph.initializer.extend(more)
    graph.input.append(helper.make_tensor_value_info("x2", TensorProto.FLOAT, [1, 6, 4, 9]))
    graph.node.extend([
        qz, helper.make_node("DequantizeLinear", ["zq_q", "zq_s", "zq_z"], ["x2_dq"]),
        helper.make_node("Mul", ["x2_dq", "s_dq"], ["prod2"], name="scale2"),
        qy2, helper.make_node("DequantizeLinear", ["y2q_q", "y2q_s", "y2q_z"], ["y2"]),
    ])
    graph.output.extend([helper.make_tensor_value_info("y2", TensorProto.FLOAT, [1, 6, 4, 9]), helper.make_tensor_value_info("s_dq", TensorProto.FLOAT, [1, 6, 1, 1])])
    feed = {"x": (RNG.standard_normal((1, 6, 5, 7)) * 3).astype(np.float32), "x2": (RNG.standard_normal((1, 6, 4, 9)) * 3).astype(np.float32)}
    rewritten, count = wide_channel_scales(_copy(model))
    assert count == 2 and _ops(rewritten)["Expand"] == 2
    _assert_same_outputs(rewritten, model, feed)


def test_channel_scale_refusals():
    one_channel = _scaled()
    for node in one_channel.graph.node:  # the scale is one value per sample: already a long span
        if node.op_type == "ReduceMean":
            node.attribute[0].ints[:] = [1, 2, 3]
    assert wide_channel_scales(one_channel)[1] == 0, "scale with one channel"
    flat = _scaled(x_shape=(1, 6, 1, 7))
    assert wide_channel_scales(flat)[1] == 0, "operand of height 1"
    same = _scaled(scale_shape=(1, 6, 5, 7))
    assert wide_channel_scales(same)[1] == 0, "no broadcast"


def test_static_qdq_widens_squeeze_excitation_scales_between_integer_convs():
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("GlobalAveragePool", ["r1"], ["g"], name="squeeze"),
        helper.make_node("Conv", ["g", "we", "be"], ["e"], name="excite"),
        helper.make_node("Sigmoid", ["e"], ["gate"], name="gate"),
        helper.make_node("Mul", ["r1", "gate"], ["scaled"], name="scale"),
        helper.make_node("Conv", ["scaled", "w2", "b2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    inits = [_w("w1", (16, 8, 3, 3)), _w("b1", (16,)), _w("we", (16, 16, 1, 1)), _w("be", (16,)), _w("w2", (8, 16, 3, 3)), _w("b2", (8,))]
    model = _model(nodes, inits, [1, 8, 12, 12], opset=13)
    feeds = [{"x": RNG.standard_normal((1, 8, 12, 12)).astype(np.float32)} for _ in range(4)]
    spec = formats.spec_for("cpu", model, vnni=True)
    quantized = formats.static_qdq(model, tensor_ranges(model, feeds), spec)
    assert _ops(quantized)["Expand"] == 1
    optimized = _ops(ort_offline(quantized, level="all"))
    assert optimized["QLinearMul"] == 1 and optimized["Transpose"] <= 2


@pytest.mark.parametrize("build, reason", [
    (lambda: _scaled(scale_shape=(1, 6, 5, 7)), "no operand is a per-channel [N, C, 1, 1] scale with C > 1"),
    (lambda: _scaled(x_shape=(1, 6, 1, 7)), "the other operand is one row high or one column wide"),
    (lambda: _scaled(x_shape=(1, 6, 5)), "operand shapes are not known to be 4-D"),
])
def test_wide_channel_scale_refusal_reasons(build, reason):
    """The registered rule (passes/qdq/wide_scales.py) says why it leaves a product alone."""
    from onnxforge.context import PassContext
    from onnxforge.model import Model
    from onnxforge.passes.registry import resolve

    model = Model.from_proto(build())
    ctx = PassContext(model=model)
    result = resolve("wide-channel-scales").run(model.graph, ctx)
    assert not result.changed and [r.reason for r in ctx.refusals] == [reason]


def _no_zero_point():
    model = _qdq_movement(*_nearest([1, 1, 2, 2]), [1, 6, 5, 7], requantize=False)
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            del node.input[2:]
    return model


def _with_sizes():
    inits, q = _q("in", "x", 0.05, 120)
    nodes = [q, helper.make_node("DequantizeLinear", ["in_q", "in_s", "in_z"], ["in_dq"]),
             helper.make_node("Resize", ["in_dq", "", "", "sizes"], ["y"], mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")]
    inits.append(numpy_helper.from_array(np.array([1, 6, 10, 14], np.int64), "sizes"))
    return _model(nodes, inits, [1, 6, 5, 7])


@pytest.mark.parametrize("build, reason", [
    (_with_sizes, "scales not constant, or sizes given"),
    (lambda: _qdq_movement(*_nearest([1, 1, 2, 2], mode="linear"), [1, 12, 4, 4]), "not nearest interpolation"),
    (lambda: _qdq_movement(*_nearest([1, 1, 2, 2], "tf_half_pixel_for_nearest", "round_prefer_floor"), [1, 12, 4, 4]),
     "coordinate mapping tf_half_pixel_for_nearest/round_prefer_floor does not repeat pixels"),
    (lambda: _qdq_movement(*_nearest([1, 1, 1.5, 2]), [1, 12, 4, 4]),
     "scales [1.0, 1.0, 1.5, 2.0] are not integer factors of H and W only"),
    (lambda: _qdq_movement("DepthToSpace", dict(blocksize=2, mode="CRD"), [], [1, 12, 4, 4]), "DepthToSpace in CRD mode"),
    (_no_zero_point, "the input is not quantized per tensor with a zero point"),
])
def test_integer_movement_refusal_reasons(build, reason):
    """The registered rule (passes/qdq/nhwc_movement.py) says why it leaves a movement alone."""
    from onnxforge.context import PassContext
    from onnxforge.model import Model
    from onnxforge.passes.registry import resolve

    model = Model.from_proto(build())
    ctx = PassContext(model=model)
    result = resolve("nhwc-integer-movement").run(model.graph, ctx)
    assert not result.changed and [r.reason for r in ctx.refusals] == [reason]
