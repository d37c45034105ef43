"""int8-weights-to-dynamic-matmul (passes/qdq/int8_weights.py): fires with parity, and one
case per refusal reason."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxforge.context import PassContext
from onnxforge.model import Model
from onnxforge.passes.registry import resolve

PASS = "int8-weights-to-dynamic-matmul"


def _model(w_shape=(4, 3), scale_shape=(3,), values=None):
    rng = np.random.default_rng(3)
    w = values if values is not None else rng.integers(-100, 100, w_shape).astype(np.int8)
    nodes = [helper.make_node("Cast", ["wq"], ["wf"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Mul", ["wf", "s"], ["w"], name="mul"),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, w.shape[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, *w.shape[1:]] if w.ndim == 2 else None)],
                              [numpy_helper.from_array(w, "wq"), numpy_helper.from_array(np.full(scale_shape, 0.02, np.float32), "s")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _run_pass(proto, weights=("wq",), saturating=False):
    model = Model.from_proto(proto)
    ctx = PassContext(model=model, options={PASS: {"weights": list(weights), "saturating": saturating}})
    result = resolve(PASS).run(model.graph, ctx)
    return model, result, ctx


@pytest.mark.parametrize("saturating", [False, True])
def test_int8_weight_matmul_fires_with_the_same_values(saturating):
    proto = _model()
    model, result, _ = _run_pass(proto, saturating=saturating)
    assert result.stats == {"int8-weight-matmul": 1}
    out = model.to_proto()
    onnx.checker.check_model(out)
    node = next(n for n in out.graph.node if n.op_type == "DynamicQuantizeMatMul")
    stored = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == node.input[1]))
    assert stored.dtype == (np.uint8 if saturating else np.int8)
    x = np.random.default_rng(4).standard_normal((2, 4)).astype(np.float32)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]  # noqa: E731
    reference = run(proto)
    assert np.abs(run(out) - reference).max() <= 0.02 * np.abs(reference).max()  # X's dynamic u8 rounding only


@pytest.mark.parametrize("kwargs, weights, reason", [
    ({}, (), "the caller keeps the readers of wq float"),
    (dict(w_shape=(2, 2, 3), scale_shape=(3,)), ("wq",), "the int8 weight is not 2-D"),
    (dict(scale_shape=(4, 1)), ("wq",), "the scale is neither per tensor nor per column"),
])
def test_int8_weight_matmul_refusals(kwargs, weights, reason):
    _, result, ctx = _run_pass(_model(**kwargs), weights)
    assert not result.changed and [r.reason for r in ctx.refusals] == [reason]
