"""equalize-channels (passes/quant/equalize_rules.py): where its rule fires (CLE and smoothing),
and one case per refusal reason, on onnx.helper graphs."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxforge.context import PassContext
from onnxforge.model import Model
from onnxforge.passes.quant.equalize_rules import PASS_NAME
from onnxforge.passes.registry import resolve

from fusion_support import session

RNG = np.random.default_rng(5)
RULE = "equalize-input-channels"


def _model(nodes, inits: dict, x_shape, y_shape) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=8)


def _run_pass(proto: onnx.ModelProto, options: dict | None = None):
    model = Model.from_proto(proto)
    ctx = PassContext(model=model, options={PASS_NAME: options} if options is not None else {})
    result = resolve(PASS_NAME).run(model.graph, ctx)
    return model.to_proto(), result, ctx


def _reasons(ctx: PassContext) -> list[str]:
    return [r.reason for r in ctx.refusals if r.rule == RULE]


def _conv_chain() -> onnx.ModelProto:
    """Conv -> Relu -> Conv(group 2) -> Conv: two pairs."""
    w1 = RNG.standard_normal((8, 3, 3, 3)) * np.logspace(-2, 1, 8).reshape(-1, 1, 1, 1)
    inits = {"w1": w1, "b1": RNG.standard_normal(8), "w2": RNG.standard_normal((8, 4, 3, 3)),
             "b2": RNG.standard_normal(8), "w3": RNG.standard_normal((4, 8, 1, 1))}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["a1"], name="relu1"),
             helper.make_node("Conv", ["a1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], group=2),
             helper.make_node("Conv", ["c2", "w3"], ["y"], name="conv3")]
    return _model(nodes, inits, [1, 3, 6, 6], [1, 4, 6, 6])


def _hardswish_affine() -> onnx.ModelProto:
    """Conv -> HardSwish -> Mul(scalar) -> Conv: the walk ends at the Mul."""
    inits = {"w1": RNG.standard_normal((6, 3, 1, 1)), "a": [1.3], "w2": RNG.standard_normal((5, 6, 3, 3))}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
             helper.make_node("HardSwish", ["c1"], ["h"], name="hs"),
             helper.make_node("Mul", ["h", "a"], ["m"], name="scale"),
             helper.make_node("Conv", ["m", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    return _model(nodes, inits, [1, 3, 5, 5], [1, 5, 5, 5])


def _same(a: onnx.ModelProto, b: onnx.ModelProto, x: np.ndarray) -> None:
    (want,), (got,) = session(a).run(None, {"x": x}), session(b).run(None, {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def _ranges(proto: onnx.ModelProto, producer: str, reader: str) -> tuple[np.ndarray, np.ndarray]:
    nodes = {n.name: n for n in proto.graph.node}
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    w1, w2 = inits[nodes[producer].input[1]], inits[nodes[reader].input[1]]
    return np.abs(w1.reshape(w1.shape[0], -1)).max(axis=1), np.abs(w2).max(axis=(0, 2, 3))


def test_cle_fires_on_both_pairs_exactly_and_balances_the_last():
    model = _conv_chain()
    out, result, ctx = _run_pass(model)
    assert result.stats == {RULE: 2} and not _reasons(ctx)
    onnx.checker.check_model(out, full_check=True)
    assert [n.op_type for n in out.graph.node] == ["Conv", "Relu", "Conv", "Conv"]
    _same(model, out, RNG.standard_normal((1, 3, 6, 6)).astype(np.float32))
    r1, r2 = _ranges(out, "conv2", "conv3")
    np.testing.assert_allclose(r1, r2, rtol=1e-5)  # the last pair applied: equal ranges on both sides


def test_smoothing_fires_through_the_affine_with_calibrated_ranges():
    model = _hardswish_affine()
    amax = {"m": np.linspace(0.5, 4.0, 6)}
    out, result, ctx = _run_pass(model, {"amax": amax})
    assert result.stats == {RULE: 1} and not _reasons(ctx)
    onnx.checker.check_model(out, full_check=True)
    _same(model, out, RNG.standard_normal((1, 3, 5, 5)).astype(np.float32))
    scale = next(n for n in out.graph.node if n.name == "scale")
    assert numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == scale.input[1])).shape == (6, 1, 1)


def test_refuses_a_constant_that_does_not_act_per_channel():
    inits = {"w1": RNG.standard_normal((8, 3, 1, 1)), "c": RNG.standard_normal((1, 1, 1, 6)),
             "w2": RNG.standard_normal((4, 8, 1, 1))}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
             helper.make_node("Add", ["c1", "c"], ["s"], name="shift"),
             helper.make_node("Conv", ["s", "w2"], ["y"], name="conv2")]
    _, result, ctx = _run_pass(_model(nodes, inits, [1, 3, 6, 6], [1, 4, 6, 6]))
    assert not result.changed
    assert _reasons(ctx) == ["the constant of Add shift does not act per channel of s (scalar or [8] along its channel axis)"]


def test_refuses_a_producer_with_another_channel_count():
    inits = {"w1": RNG.standard_normal((4, 1)), "c": RNG.standard_normal(8), "w2": RNG.standard_normal((8, 3))}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Add", ["h", "c"], ["s"], name="broadcast"),
             helper.make_node("MatMul", ["s", "w2"], ["y"], name="mm2")]
    _, result, ctx = _run_pass(_model(nodes, inits, [2, 4], [2, 3]))
    assert not result.changed
    assert _reasons(ctx) == ["MatMul mm1 writes 1 channels, mm2 reads 8"]


def test_refuses_data_free_equalization_without_a_producing_layer():
    _, result, ctx = _run_pass(_hardswish_affine())
    assert not result.changed
    assert _reasons(ctx) == ["data-free equalization needs a Conv/MatMul making m; the walk ends at Mul scale "
                             "(smoothing, with calibration data, rescales it)"]


def test_refuses_smoothing_without_a_range_for_the_input():
    _, result, ctx = _run_pass(_hardswish_affine(), {"amax": {}})
    assert not result.changed
    assert _reasons(ctx) == ["no calibrated range for m"]
