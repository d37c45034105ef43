"""INT8 dynamic: a MatMul whose calibration input has outlier channels stays float with its reason
(passes/quant/outliers.py); one without is quantized. Graphs built with onnx.helper."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxforge.passes.quant.outliers import dynamic_quantization_error, outlier_nodes
from onnxforge.passes.quant.quantize import quantize


def _two_matmuls() -> onnx.ModelProto:
    """a @ Wa -> ya, b @ Wb -> yb: two independent weighted MatMuls on inputs [64, 256]."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((256, 16)).astype(np.float32), n) for n in ("Wa", "Wb")]
    nodes = [helper.make_node("MatMul", ["a", "Wa"], ["ya"], name="mm_plain"),
             helper.make_node("MatMul", ["b", "Wb"], ["yb"], name="mm_outlier")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [64, 256]) for n in "ab"],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [64, 16]) for n in ("ya", "yb")],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _feeds(count=4):
    rng = np.random.default_rng(1)
    out = []
    for _ in range(count):
        b = rng.standard_normal((64, 256)).astype(np.float32)
        # a "massive activation": one channel of two tokens at 100 (the rest ~N(0, 1)) sets the per-tensor
        # u8 step to ~0.8, coarse for every other token: ~12% of each of their norms lost
        b[:2, 5] = 100.0
        out.append({"a": rng.standard_normal((64, 256)).astype(np.float32), "b": b})
    return out


def test_quantization_error_is_small_without_outliers_and_large_with_them():
    feed = _feeds(1)[0]
    assert dynamic_quantization_error(feed["a"]) < 0.02
    assert dynamic_quantization_error(feed["b"]) > 0.1
    assert dynamic_quantization_error(np.zeros((2, 3), np.float32)) == 0.0


def test_outlier_input_is_named_with_its_reason():
    reasons = outlier_nodes(_two_matmuls(), _feeds(), 0.06)
    assert list(reasons) == ["mm_outlier"]
    assert reasons["mm_outlier"].startswith("input outliers: b loses") and "median channel" in reasons["mm_outlier"]
    assert outlier_nodes(_two_matmuls(), _feeds(), 1.0) == {}  # a bound no input exceeds


def test_dynamic_quantize_keeps_the_outlier_matmul_float_and_quantizes_the_other():
    model, report = quantize(_two_matmuls(), _feeds(), mode="dynamic", max_drop=0.5, measure_latency=False,
                             max_evaluations=1, log=lambda _m: None)
    assert report.int8_nodes == ["mm_plain"]
    assert report.float_nodes["mm_outlier"].startswith("input outliers: b loses")
    proto = model.to_proto()
    onnx.checker.check_model(proto)
    kept = [n for n in proto.graph.node if n.op_type == "MatMul"]
    assert [n.name for n in kept] == ["mm_outlier"]
    assert any(n.op_type == "MatMulInteger" for n in proto.graph.node)
    import onnxruntime as ort

    feed = _feeds(1)[0]
    got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    want = ort.InferenceSession(_two_matmuls().SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    np.testing.assert_array_equal(got[1], want[1])  # the float one is exact
    assert np.linalg.norm(got[0] - want[0]) / np.linalg.norm(want[0]) < 0.05


def test_without_the_check_both_are_quantized():
    _, report = quantize(_two_matmuls(), _feeds(), mode="dynamic", max_drop=0.99, measure_latency=False,
                         max_evaluations=1, max_input_error=None, log=lambda _m: None)
    assert sorted(report.int8_nodes) == ["mm_outlier", "mm_plain"]


def test_a_non_positive_bound_is_refused():
    from onnxforge.errors import OptionError

    with pytest.raises(OptionError, match="max-input-error"):
        quantize(_two_matmuls(), _feeds(), mode="dynamic", max_input_error=0.0, log=lambda _m: None)
