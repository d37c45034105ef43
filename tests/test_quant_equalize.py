"""Cross-layer equalization and smoothing: exact in float, ranges balanced, only across homogeneous ops."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxforge.passes.quant import equalize as eq
from onnxforge.passes.quant.finish import slower
from onnxforge.passes.quant.quantize import QuantReport, quantize

RNG = np.random.default_rng(3)


def _run(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def _model(nodes, inits, x_shape, y_shape) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=8)


def _spread(shape, axis=0):
    """Weights whose channels along ``axis`` differ by orders of magnitude."""
    w = RNG.standard_normal(shape)
    mags = np.logspace(-2, 1, shape[axis])
    return w * mags.reshape([-1 if i == axis else 1 for i in range(len(shape))])


def _conv_relu_conv(group2: int = 1, activation: str = "Relu") -> onnx.ModelProto:
    """Conv(8, pad) -> act -> Conv(group2, pad) -> Conv(1x1): two CLE pairs in a chain."""
    inits = {
        "w1": _spread((8, 3, 3, 3)), "b1": RNG.standard_normal(8),
        "w2": RNG.standard_normal((8, 8 // group2, 3, 3)), "b2": RNG.standard_normal(8),
        "w3": RNG.standard_normal((4, 8, 1, 1)),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node(activation, ["c1"], ["a1"], name="act1"),
        helper.make_node("Conv", ["a1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], group=group2),
        helper.make_node("Conv", ["c2", "w3"], ["y"], name="conv3"),
    ]
    return _model(nodes, inits, [1, 3, 6, 6], [1, 4, 6, 6])


def _x(shape):
    return {"x": RNG.standard_normal(shape).astype(np.float32)}


def _assert_same(a: onnx.ModelProto, b: onnx.ModelProto, feed: dict) -> None:
    # float32 sums of rescaled terms round differently: 1e-5 of the output's scale
    for got, want in zip(_run(b, feed), _run(a, feed)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


@pytest.mark.parametrize("group2", [1, 2, 8])
@pytest.mark.parametrize("activation", ["Relu", "LeakyRelu"])
def test_cle_is_exact_and_equalizes_ranges(group2, activation):
    model = _conv_relu_conv(group2, activation)
    out, count = eq.equalize(model, iterations=1)
    assert count == 2  # conv1 -> act -> conv2 and conv2 -> conv3
    _assert_same(model, out, _x((1, 3, 6, 6)))
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    nodes = {n.name: n for n in out.graph.node}
    # the last pair applied (conv2 -> conv3) leaves equal ranges on both sides
    r1 = eq.output_channel_range(nodes["conv2"], inits[nodes["conv2"].input[1]])
    r2 = eq.input_channel_range(nodes["conv3"], inits[nodes["conv3"].input[1]], 8)
    np.testing.assert_allclose(r1, r2, rtol=1e-5)


def test_cle_narrows_the_spread_of_the_first_layer():
    model = _conv_relu_conv()
    out, _ = eq.equalize(model)
    before = eq.output_channel_range(model.graph.node[0], numpy_helper.to_array(model.graph.initializer[0]))
    conv1 = out.graph.node[0]
    after = eq.output_channel_range(conv1, numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == conv1.input[1])))
    assert after.max() / after.min() < before.max() / before.min() / 10


def _hardswish_affine() -> onnx.ModelProto:
    """PP-LCNetV3 block: Conv -> HardSwish -> Mul(scalar) -> Add(scalar) -> Conv(pad)."""
    inits = {"w1": RNG.standard_normal((6, 3, 1, 1)), "a": np.array([1.3]), "c": np.array([0.2]),
             "w2": RNG.standard_normal((5, 6, 3, 3))}
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
        helper.make_node("HardSwish", ["c1"], ["h"], name="hs"),
        helper.make_node("Mul", ["h", "a"], ["m"], name="scale"),
        helper.make_node("Add", ["m", "c"], ["s"], name="shift"),
        helper.make_node("Conv", ["s", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    return _model(nodes, inits, [1, 3, 5, 5], [1, 5, 5, 5])


def test_walk_stops_at_hardswish():
    sites = eq.find_sites(_hardswish_affine())
    assert [s.reader.name for s in sites] == ["conv2"]
    assert sites[0].end is None and [n.name for n, _ in sites[0].steps] == ["shift", "scale"]
    direct = _hardswish_affine()
    del direct.graph.node[2:4]
    direct.graph.node[-1].input[0] = "h"
    assert eq.find_sites(direct) == []  # HardSwish(x / s) != HardSwish(x) / s
    assert eq.equalize(direct)[1] == 0


def test_tensor_with_two_readers_is_not_rescaled():
    model = _conv_relu_conv()
    model.graph.node.append(helper.make_node("Relu", ["a1"], ["side"], name="side"))
    model.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, [1, 8, 6, 6]))
    assert [s.reader.name for s in eq.find_sites(model)] == ["conv3"]


def test_smoothing_through_affine_is_exact_and_balances_activation_and_weight():
    model = _hardswish_affine()
    feeds = [_x((1, 3, 5, 5)) for _ in range(3)]
    out, count = eq.equalize(model, feeds)
    assert count == 1
    _assert_same(model, out, _x((1, 3, 5, 5)))
    before = eq.channel_amax(model, ["s"], feeds, {"s": 1})["s"]
    after = eq.channel_amax(out, ["s"], feeds, {"s": 1})["s"]
    conv2 = next(n for n in out.graph.node if n.name == "conv2")
    w2 = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == conv2.input[1]))
    np.testing.assert_allclose(after, eq.input_channel_range(conv2, w2, 6), rtol=1e-4)  # alpha 0.5: a/s == w*s
    assert not np.allclose(before, after)


def test_smoothing_matmul_through_layernorm_affine_is_exact():
    inits = {"gamma": RNG.standard_normal(16) * 3, "beta": RNG.standard_normal(16), "w": _spread((16, 8)),
             "w0": _spread((12, 16), axis=1)}
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h0"], name="mm0"),
        helper.make_node("LayerNormalization", ["h0", "ones", "zeros"], ["n"], name="ln", axis=-1),
        helper.make_node("Mul", ["n", "gamma"], ["g"], name="gamma_mul"),
        helper.make_node("Add", ["g", "beta"], ["b"], name="beta_add"),
        helper.make_node("MatMul", ["b", "w"], ["y"], name="mm"),
    ]
    inits.update(ones=np.ones(16), zeros=np.zeros(16))
    model = _model(nodes, inits, [2, 4, 12], [2, 4, 8])
    model.opset_import[0].version = 17
    feeds = [_x((2, 4, 12)) for _ in range(2)]
    out, count = eq.equalize(model, feeds)
    assert count == 1
    _assert_same(model, out, _x((2, 4, 12)))


def test_quantize_equalizes_before_calibration_and_calibrates_on_every_feed():
    model = _conv_relu_conv()
    feeds = [_x((1, 3, 6, 6)) for _ in range(6)]
    for mode in ("cle", "smooth"):
        _, report = quantize(model, feeds, equalize=mode, measure_latency=False, log=lambda _m: None)
        assert report.equalized == 2 and report.calibration_feeds == 6
        assert report.score_before_fallback > 0.99
    _, report = quantize(model, feeds, equalize="none", measure_latency=False, log=lambda _m: None)
    assert report.equalized == 0


def test_slower_int8_returns_float_and_says_so():
    report = QuantReport("cpu", {}, "minmax", "x", 1, "x", "cosine", 0.01, int8_nodes=["conv1"])
    report.latency = {"ratio": 2.5, "ci_low": 2.0, "ci_high": 3.0}
    baseline, int8 = onnx.ModelProto(), onnx.ModelProto()
    baseline.graph.name, int8.graph.name = "float", "int8"
    assert slower(report, baseline, int8, keep_float=True) is baseline
    assert report.kept_float and not report.int8_nodes and "float model was returned" in report.warnings[0]
    report = QuantReport("cpu", {}, "minmax", "x", 1, "x", "cosine", 0.01, int8_nodes=["conv1"])
    report.latency = {"ratio": 2.5, "ci_low": 2.0, "ci_high": 3.0}
    assert slower(report, baseline, int8, keep_float=False) is int8 and not report.kept_float


def _affine_conv(pads, group=1, a=None, with_add=True) -> onnx.ModelProto:
    """Conv -> HardSwish -> Mul(a) [-> Add(b)] -> Conv(pads, group) -> y."""
    a = RNG.standard_normal((6, 1, 1)) if a is None else a
    inits = {"w1": RNG.standard_normal((6, 3, 1, 1)), "a": a, "c": RNG.standard_normal((1, 6, 1, 1)),
             "w2": RNG.standard_normal((6, 6 // group, 3, 3)), "b2": RNG.standard_normal(6)}
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
        helper.make_node("HardSwish", ["c1"], ["h"], name="hs"),
        helper.make_node("Mul", ["h", "a"], ["m"], name="scale"),
    ]
    if with_add:
        nodes.append(helper.make_node("Add", ["c", "m"], ["s"], name="shift"))
    nodes.append(helper.make_node("Conv", ["s" if with_add else "m", "w2", "b2"], ["y"], name="conv2", pads=[pads] * 4, group=group))
    out = 5 - 2 + 2 * pads
    return _model(nodes, inits, [1, 3, 5, 5], [1, 6, out, out])


@pytest.mark.parametrize("group", [1, 2, 6])
@pytest.mark.parametrize("pads,with_add,left", [(0, True, []), (1, True, ["Add"]), (1, False, []), (0, False, [])])
def test_fold_affine_into_next_conv_is_exact(group, pads, with_add, left):
    model = _affine_conv(pads, group, with_add=with_add)
    out, count = eq.fold_affine(model)
    assert count == 1
    assert [n.op_type for n in out.graph.node] == ["Conv", "HardSwish", *left, "Conv"]
    _assert_same(model, out, _x((1, 3, 5, 5)))


def test_fold_affine_keeps_a_zero_scale_before_a_padded_conv():
    a = np.ones((6, 1, 1))
    a[2] = 0.0  # b / a undefined: the affine stays
    model = _affine_conv(1, a=a)
    out, count = eq.fold_affine(model)
    assert count == 0 and [n.op_type for n in out.graph.node] == [n.op_type for n in model.graph.node]


def _residual() -> onnx.ModelProto:
    """conv1 -> sq = c1 * c1 -> r = sq + c1 -> conv2: sq lies between two elementwise ops."""
    inits = {"w1": RNG.standard_normal((4, 4, 1, 1)), "w2": RNG.standard_normal((4, 4, 1, 1))}
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
        helper.make_node("Mul", ["c1", "c1"], ["sq"], name="square"),
        helper.make_node("Add", ["sq", "c1"], ["r"], name="residual"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2"),
    ]
    return _model(nodes, inits, [1, 4, 5, 5], [1, 4, 5, 5])


@pytest.mark.parametrize("lean_better", [True, False])
def test_elementwise_ops_stay_float_only_when_that_scores_better(lean_better):
    import importlib

    qmod = importlib.import_module("onnxforge.passes.quant.quantize")  # the package exports the function
    full, lean = onnx.ModelProto(), onnx.ModelProto()
    full.graph.name, lean.graph.name = "full", "lean"
    scores = {"full": 0.9, "lean": 0.95 if lean_better else 0.8}
    lean_plan = qmod._Plan(lambda ex: lean, {"conv1": "Conv"}, {"residual": "elementwise"}, {}, [])
    plan = qmod._Plan(lambda ex: full, {"conv1": "Conv", "residual": "Add"}, {}, {}, [], lean=lean_plan)
    report = QuantReport("cpu", {}, "minmax", "x", 1, "x", "cosine", 0.01)
    chosen, score = qmod._leaner(plan, full, 0.9, lambda m: scores[m.graph.name], report, lambda _m: None)
    assert (chosen is lean) == lean_better and score == max(0.9, scores["lean"])
    assert ("residual" in plan.candidates) != lean_better and "elementwise" in report.notes[0]


def test_lean_cpu_build_leaves_the_residual_add_float():
    from onnxforge.passes.quant.quantize import _plan
    from onnxforge.passes.quant.formats import spec_for
    from onnxforge.passes.quant.detect import detect
    from onnxforge.passes.quant.prepare import float_baseline

    model = _residual()
    baseline = float_baseline(model)
    report = QuantReport("cpu", {}, "minmax", "x", 1, "x", "cosine", 0.01)
    plan = _plan(model, baseline, spec_for("cpu", baseline, "static"), detect(model), [_x((1, 4, 5, 5))], "minmax",
                 report, lambda _m: None)
    assert plan.lean is not None and "residual" not in plan.lean.candidates

    def quantized(proto, tensor):
        return any(n.op_type == "QuantizeLinear" and n.input[0] == tensor for n in proto.graph.node)

    assert quantized(plan.build([]), "sq") and not quantized(plan.lean.build([]), "sq")
    assert quantized(plan.lean.build([]), "r")  # conv2 still reads int8
