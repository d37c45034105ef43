"""Integer HardSwish / HardSigmoid / constant shifts in CPU QDQ models (passes/quant/integer_act.py)
and the whole-window pool rewrite of the float baseline (the global-pool pass)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import tensor_ranges

from onnxforge.passes.quant import formats
from onnxforge.passes.quant.integer_act import integer_activations
from onnxforge.passes.quant.prepare import ort_offline
from onnxforge.passes.quant.registered import apply_passes

RNG = np.random.default_rng(7)
X = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])


def _model(nodes, inits, out_shape=(1, 8, 6, 6), opset=14):
    graph = helper.make_graph(nodes, "g", [X], [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _w(name, shape, scale=0.3):
    return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(np.float32), name)


def _conv_act_conv(act: str, **attrs):
    """Conv -> act -> depthwise Conv (padded): the act sits between two integer convs."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node(act, ["c1"], ["a1"], name="act", **attrs),
        helper.make_node("Conv", ["a1", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1], group=8),
    ]
    return _model(nodes, [_w("w1", (8, 8, 3, 3)), _w("b1", (8,), 1.0), _w("w2", (8, 1, 3, 3))])


def _feeds(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": (rng.standard_normal((1, 8, 6, 6)) * 2).astype(np.float32)} for _ in range(n)]


def _qdq(model, rewrite: bool):
    feeds = _feeds()
    spec = formats.spec_for("cpu", model, vnni=True)
    ranges = tensor_ranges(model, feeds)
    saved = formats.integer_activations
    if not rewrite:
        formats.integer_activations = lambda m: (m, 0)
    try:
        return formats.static_qdq(model, ranges, spec)
    finally:
        formats.integer_activations = saved


def _run(model, feed, optimize=True):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feed)[0]


def _ops(model):
    optimized = ort_offline(model, level="all")
    counts = {}
    for node in optimized.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


@pytest.mark.parametrize("act, attrs", [("HardSwish", {}), ("HardSigmoid", {"alpha": 1 / 6, "beta": 0.5}), ("HardSigmoid", {})])
def test_activation_runs_as_integer_kernels_with_the_same_result(act, attrs):
    model = _conv_act_conv(act, **attrs)
    before, after = _qdq(model, rewrite=False), _qdq(model, rewrite=True)
    onnx.checker.check_model(after, full_check=True)
    ops_before, ops_after = _ops(before), _ops(after)
    assert "HardSigmoid" in ops_before  # float op between the integer convs
    assert not {"HardSigmoid", "HardSwish", "Mul"} & set(ops_after)
    assert ops_after.get("QLinearConv") == 2 and ops_after.get("QLinearAdd") == 1
    assert ops_after.get("QLinearMul", 0) == (1 if act == "HardSwish" else 0)
    for feed in _feeds(3, seed=5):
        reference = _run(model, feed)
        scale = np.abs(reference).max()
        old, new = _run(before, feed), _run(after, feed)
        # the rewrite adds at most a step of the clip grid: same accuracy as the float op between Q/DQ
        assert np.abs(new - reference).max() <= np.abs(old - reference).max() + 0.02 * scale
        assert np.abs(new - old).mean() <= 0.01 * scale


def test_constant_shift_moves_into_the_zero_point_and_pads_like_float():
    """Conv -> HardSwish -> Add(c) -> padded depthwise Conv: the Add disappears; the
    depthwise conv pads with the shifted zero point, i.e. with the real 0 of h + c."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("HardSwish", ["c1"], ["h"], name="hswish"),
        helper.make_node("Add", ["h", "shift"], ["u"], name="shift_add"),
        helper.make_node("Conv", ["u", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1], group=8),
    ]
    shift = numpy_helper.from_array(np.full((8, 1, 1), 0.25, np.float32), "shift")
    model = _model(nodes, [_w("w1", (8, 8, 3, 3)), _w("b1", (8,), 1.0), _w("w2", (8, 1, 3, 3)), shift])
    before, after = _qdq(model, rewrite=False), _qdq(model, rewrite=True)
    assert "Add" in {n.op_type for n in before.graph.node}
    assert "shift_add" not in {n.name for n in after.graph.node}
    ops_after = _ops(after)
    assert ops_after.get("QLinearAdd") == 1  # only HardSwish's +3 remains
    for feed in _feeds(3, seed=9):
        reference = _run(model, feed)
        scale = np.abs(reference).max()
        assert np.abs(_run(after, feed) - reference).max() <= np.abs(_run(before, feed) - reference).max() + 0.02 * scale


def _hand_qdq(act_attrs=None, extra_reader=False, scale_shape=()):
    """x_q (u8) -> DQ -> HardSwish/HardSigmoid -> Q -> DQ -> y, written by hand."""
    op = "HardSigmoid" if act_attrs is not None else "HardSwish"
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zx"], ["xq"], name="q_x"),
        helper.make_node("DequantizeLinear", ["xq", "s", "zx"], ["xd"], name="dq_x"),
        helper.make_node(op, ["xd"], ["h"], name="act", **(act_attrs or {})),
        helper.make_node("QuantizeLinear", ["h", "s2", "z"], ["hq"], name="q_h"),
        helper.make_node("DequantizeLinear", ["hq", "s2", "z"], ["y"], name="dq_h"),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 6, 6])]
    if extra_reader:
        nodes.append(helper.make_node("Relu", ["h"], ["r"], name="other_reader"))
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 8, 6, 6]))
    zero = np.full(scale_shape, 128, np.uint8)
    inits = [numpy_helper.from_array(np.full(scale_shape, 0.05, np.float32), "s"), numpy_helper.from_array(zero, "zx"), numpy_helper.from_array(np.array(0.03, np.float32), "s2"),
             numpy_helper.from_array(np.array(128, np.uint8), "z")]
    graph = helper.make_graph(nodes, "q", [X], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=8)


def test_hand_written_qdq_is_rewritten():
    model, count = integer_activations(_hand_qdq())
    assert count == 1 and "HardSwish" not in {n.op_type for n in model.graph.node}
    feed = _feeds(1)[0]
    reference = _run(_hand_qdq(), feed, optimize=False)
    assert np.abs(_run(model, feed, optimize=False) - reference).max() <= 0.03 + 1e-6  # one output step


@pytest.mark.parametrize("case", ["second_reader", "per_channel_scale", "negative_slope", "no_quantized_neighbours"])
def test_refusals_leave_the_graph_as_it_was(case):
    if case == "second_reader":
        model = _hand_qdq(extra_reader=True)
    elif case == "per_channel_scale":
        model = _hand_qdq(scale_shape=(8,))  # per-channel input: no single grid to shift or clip
        for node in model.graph.node[:2]:
            node.attribute.append(helper.make_attribute("axis", 1))
    elif case == "negative_slope":
        model = _hand_qdq(act_attrs={"alpha": -0.2, "beta": 0.5})
    else:
        model = _conv_act_conv("HardSwish")
    ops = [n.op_type for n in model.graph.node]
    rewritten, count = integer_activations(model)
    assert count == 0 and [n.op_type for n in rewritten.graph.node] == ops


@pytest.mark.parametrize("op", ["AveragePool", "MaxPool"])
def test_whole_window_pool_becomes_global_and_quantizes_right(op):
    """EfficientNet's AvgPool2d(1280, ceil_mode=True) on 7x7: QLinearAveragePool returns the
    zero point; as GlobalAveragePool the int8 model matches float again."""
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node(op, ["c1"], ["p"], name="pool", kernel_shape=[64, 64], strides=[64, 64], ceil_mode=1, **({"count_include_pad": 1} if op == "AveragePool" else {})),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wg"], ["y"], name="fc", transB=1),
    ]
    model = _model(nodes, [_w("w1", (8, 8, 3, 3)), _w("wg", (4, 8))], out_shape=(1, 4), opset=13)
    rewritten, count = apply_passes(onnx.load_from_string(model.SerializeToString()), ("global-pool",))
    assert count == 1 and rewritten.graph.node[1].op_type == "Global" + op
    onnx.checker.check_model(rewritten, full_check=True)
    feed = _feeds(1)[0]
    np.testing.assert_allclose(_run(rewritten, feed), _run(model, feed), rtol=1e-5, atol=1e-5)
    reference, int8 = _run(model, feed).ravel(), _run(_qdq(rewritten, rewrite=True), feed).ravel()
    assert reference @ int8 / (np.linalg.norm(reference) * np.linalg.norm(int8)) > 0.99
    # a window smaller than the input is left alone
    small = _model([helper.make_node(op, ["x"], ["y"], name="pool", kernel_shape=[3, 3])], [], out_shape=(1, 8, 4, 4), opset=13)
    assert apply_passes(small, ("global-pool",))[1] == 0


def test_gemm_row_bias_becomes_a_vector_and_quantizes():
    """magika_v3_3: onnxruntime's MatMul+Add fusion leaves Gemm's C as [1, N], on which its
    QDQ quantizer's per-channel bias check raised 'truth value of an array is ambiguous'."""
    nodes = [helper.make_node("Flatten", ["x"], ["f"], name="flatten"), helper.make_node("Gemm", ["f", "w", "c"], ["y"], name="fc")]
    model = _model(nodes, [_w("w", (288, 4)), _w("c", (1, 4))], out_shape=(1, 4), opset=13)
    rewritten, count = apply_passes(onnx.load_from_string(model.SerializeToString()), ("gemm-bias-vector",))
    assert count == 1 and list(next(t for t in rewritten.graph.initializer if t.name == "c").dims) == [4]
    feed = _feeds(1)[0]
    np.testing.assert_allclose(_run(rewritten, feed), _run(model, feed), rtol=1e-6)
    formats.static_qdq(rewritten, tensor_ranges(rewritten, _feeds()), formats.spec_for("cpu", rewritten, vnni=True))  # no error


def _shift_qdq(c_values=(0.25,), zero=128, extra=None, zx_dtype=np.uint8, u_reader="DequantizeLinear"):
    """x -> Q -> DQ -> h, c_q -> DQ -> c, Add(h, c) -> Q -> DQ -> y: a constant shift of h."""
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zx"], ["xq"], name="q_x"),
        helper.make_node("DequantizeLinear", ["xq", "s", "zx"], ["h"], name="dq_x"),
        helper.make_node("DequantizeLinear", ["cq", "cs", "cz"], ["c"], name="dq_c"),
        helper.make_node("Add", ["h", "c"], ["u"], name="shift_add"),
        helper.make_node("QuantizeLinear", ["u", "s2", "z"], ["uq"], name="q_u"),
        helper.make_node(u_reader, ["uq", "s2", "z"] if u_reader == "DequantizeLinear" else ["uq"], ["y"], name="read_u"),
    ]
    c = np.asarray(c_values, np.float32)
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s"), numpy_helper.from_array(np.array(zero, zx_dtype), "zx"),
             numpy_helper.from_array(np.full(c.shape, 255, np.uint8), "cq"),
             numpy_helper.from_array(np.array(1 / 255, np.float32), "cs"), numpy_helper.from_array(np.array(0, np.uint8), "cz"),
             numpy_helper.from_array(np.array(0.05, np.float32), "s2"), numpy_helper.from_array(np.array(128, np.uint8), "z")]
    inits[2] = numpy_helper.from_array(np.round(c * 255).astype(np.uint8), "cq")
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT if u_reader == "DequantizeLinear" else TensorProto.UINT8, None)]
    if extra:
        nodes.append(helper.make_node("Relu", [extra], ["r"], name="other_reader"))
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "q", [X], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=8)


def _refusals(proto) -> list[str]:
    from onnxforge.context import PassContext
    from onnxforge.model import Model
    from onnxforge.passes.registry import resolve

    model = Model.from_proto(proto)
    ctx = PassContext(model=model)
    assert not resolve("integer-activations").run(model.graph, ctx).changed
    return [r.reason for r in ctx.refusals]


def test_shift_fires_on_the_hand_written_model():
    model, count = integer_activations(_shift_qdq())
    assert count == 1 and "shift_add" not in {n.name for n in model.graph.node}
    feed = _feeds(1)[0]
    reference = _run(_shift_qdq(), feed, optimize=False)
    assert np.abs(_run(model, feed, optimize=False) - reference).max() <= 0.05 + 1e-6  # c rounded to h's grid


@pytest.mark.parametrize("build, reason", [
    (lambda: _shift_qdq(c_values=(0.25, 0.5)), "the constant is not one value on a per-tensor grid"),
    (lambda: _shift_qdq(extra="u"), "the sum is not read by exactly one QuantizeLinear"),
    (lambda: _shift_qdq(u_reader="Identity"), "the quantized sum is read by something other than DequantizeLinear"),
    (lambda: _shift_qdq(extra="h"), "the dequantized input has other readers"),
    (lambda: _shift_qdq(zx_dtype=np.int8, zero=0), "the input is not a u8 per-tensor activation"),
    (lambda: _shift_qdq(zero=0), "the shift leaves the u8 zero-point range"),
    (lambda: _hand_qdq(scale_shape=(8,)), "DequantizeLinear dq_x is not u8 per tensor"),
    (lambda: _hand_qdq(act_attrs={"alpha": -0.2, "beta": 0.5}), "alpha <= 0: the output does not saturate like a u8 grid"),
])
def test_integer_activation_refusal_reasons(build, reason):
    proto = build()
    if reason.startswith("DequantizeLinear"):
        for node in proto.graph.node[:2]:
            node.attribute.append(helper.make_attribute("axis", 1))
    assert _refusals(proto) == [reason]


def test_the_activations_own_adds_are_not_shifts():
    """A second sweep (the pass manager iterates) leaves HardSwish's +3 before its clip alone."""
    from onnxforge.context import PassContext
    from onnxforge.model import Model
    from onnxforge.passes.registry import resolve

    model = Model.from_proto(_hand_qdq())
    ctx = PassContext(model=model)
    rewrite = resolve("integer-activations")
    assert rewrite.run(model.graph, ctx).stats == {"integer-hardswish": 1}
    assert not rewrite.run(model.graph, ctx).changed
    assert [r.reason for r in ctx.refusals] == ["an Add this pass made: the QuantizeLinear after it clips"]
