"""bias-correction (passes/quant/bias_rules.py): where its rule fires, and one case per refusal
reason, on onnx.helper graphs."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxforge.context import PassContext
from onnxforge.model import Model
from onnxforge.passes.quant.bias_rules import PASS_NAME
from onnxforge.passes.registry import resolve

from fusion_support import reasons_by_node, session

RNG = np.random.default_rng(13)
RULE = "add-bias-correction"


def _model(shared: bool = False) -> onnx.ModelProto:
    """conv1(x, w1, b1) -> conv2(., w2, b2 or b1 when ``shared``)."""
    inits = {"w1": RNG.standard_normal((4, 3, 3, 3)), "b1": RNG.standard_normal(4),
             "w2": RNG.standard_normal((4, 4, 1, 1)), "b2": RNG.standard_normal(4)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["c1", "w2", "b1" if shared else "b2"], ["y"], name="conv2")]
    if shared:
        del inits["b2"]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 5, 5])],
                              [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _run_pass(proto: onnx.ModelProto, deltas: dict):
    model = Model.from_proto(proto)
    ctx = PassContext(model=model, options={PASS_NAME: {"deltas": deltas}})
    result = resolve(PASS_NAME).run(model.graph, ctx)
    return model.to_proto(), result, ctx


def test_fires_and_shifts_each_output_channel_by_its_correction():
    model = _model()
    delta = np.array([0.5, -1.0, 0.25, 2.0], np.float32)
    out, result, ctx = _run_pass(model, {"b2": delta})
    assert result.stats == {RULE: 1}
    onnx.checker.check_model(out, full_check=True)
    biases = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_allclose(biases["b2"], before["b2"] + delta, rtol=1e-6)  # the same name, corrected
    np.testing.assert_array_equal(biases["b1"], before["b1"])
    feed = {"x": RNG.standard_normal((1, 3, 5, 5)).astype(np.float32)}
    (want,), (got,) = session(model).run(None, feed), session(out).run(None, feed)
    np.testing.assert_allclose(got - want, np.broadcast_to(delta.reshape(1, 4, 1, 1), want.shape), atol=1e-5)


def test_refuses_a_layer_without_a_correction():
    _, result, ctx = _run_pass(_model(), {"b2": np.zeros(4, np.float32)})
    assert result.stats == {RULE: 1}
    assert reasons_by_node(ctx, RULE) == {"conv1": "no correction for its bias b1"}


def test_refuses_a_correction_of_another_shape():
    _, result, ctx = _run_pass(_model(), {"b1": np.zeros(3, np.float32)})
    assert not result.changed
    assert reasons_by_node(ctx, RULE)["conv1"] == "the correction has shape (3,), bias b1 (4,)"


def test_refuses_a_shared_bias_the_second_time():
    model, delta = _model(shared=True), np.ones(4, np.float32)
    out, result, ctx = _run_pass(model, {"b1": delta})
    assert result.stats == {RULE: 1}
    assert reasons_by_node(ctx, RULE) == {"conv2": "bias b1 is shared with a layer corrected already"}
    before = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "b1"))
    after = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "b1"))
    np.testing.assert_allclose(after, before + delta, rtol=1e-6)  # added once
