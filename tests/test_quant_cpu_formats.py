"""INT8 weight formats per CPU class (formats.spec_for, weight_overrides): where
onnxruntime's u8 x s8 kernels saturate and the forms that avoid it, checked on this
machine's kernels (each assertion names the class it holds for)."""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxforge.passes.quant import formats
from onnxforge.runtime.cpuclass import cpu_class, has_int8_dot

RNG = np.random.default_rng(11)


def _qlinear_conv(weight: np.ndarray, group: int) -> float:
    """QLinearConv of an all-255 u8 input with ``weight`` (integers), output / exact sum."""
    cin = weight.shape[1] * group
    x = np.full((1, cin, 6, 6), 255, np.uint8)
    exact = 255.0 * float(weight[0].astype(np.int64).sum())
    zero = np.zeros(weight.shape[0], weight.dtype)
    inits = [numpy_helper.from_array(np.array(1.0, np.float32), "xs"), numpy_helper.from_array(np.array(0, np.uint8), "xz"),
             numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.ones(weight.shape[0], np.float32), "ws"),
             numpy_helper.from_array(zero, "wz"), numpy_helper.from_array(np.array(exact / 200, np.float32), "ys"),
             numpy_helper.from_array(np.array(0, np.uint8), "yz")]
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"], group=group,
                            pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("x", TensorProto.UINT8, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    return float(y[0, 0, 3, 3]) / 200


def test_which_kernels_saturate_on_this_cpu():
    """Full-range s8 weights: a GEMM-based conv saturates without int8 dot products; the
    depthwise kernel and u8 weights never do (why spec_for picks 7 bits for s8 GEMMs only)."""
    full_s8 = np.full((16, 16, 3, 3), 127, np.int8)
    depthwise_s8 = np.full((16, 1, 3, 3), 127, np.int8)
    u8 = np.full((16, 16, 3, 3), 255, np.uint8)
    seven_bit = np.full((16, 16, 3, 3), 64, np.int8)
    assert _qlinear_conv(depthwise_s8, 16) == 1.0
    assert _qlinear_conv(u8, 1) == 1.0
    assert _qlinear_conv(seven_bit, 1) == 1.0
    if has_int8_dot(cpu_class()):
        assert _qlinear_conv(full_s8, 1) == 1.0
    else:
        assert _qlinear_conv(full_s8, 1) < 0.6, cpu_class()  # 16-bit pair sums clipped at 32767


def _dw_pw(channels: int = 8) -> onnx.ModelProto:
    w = RNG.standard_normal((channels, 1, 3, 3)).astype(np.float32)
    w2 = RNG.standard_normal((channels, channels, 1, 1)).astype(np.float32) * 0.3
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="dw", group=channels, pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["c", "w2"], ["y"], name="pw")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, 6, 6])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _int_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
            if t.data_type in (TensorProto.INT8, TensorProto.UINT8) and len(t.dims) == 4}


@pytest.mark.parametrize("full_range", [False, True])
def test_depthwise_weights_keep_8_bits_on_request(full_range):
    model = _dw_pw()
    assert formats.depthwise_weights(model) == {"w": "dw"}
    spec = dataclasses.replace(formats.spec_for("cpu", model, "static", cpu="avx2"), depthwise_full_range=full_range)
    assert formats.weight_overrides(model, spec) == ({"w": [{"axis": 0, "reduce_range": False}]} if full_range else {})
    q = formats.static_qdq(model, {"x": (-3.0, 3.0), "c": (-9.0, 9.0), "y": (-9.0, 9.0)}, spec)
    weights = _int_weights(q)
    assert np.abs(weights["w_quantized"]).max() == (127 if full_range else 64)
    assert np.abs(weights["w2_quantized"]).max() == 64  # the GEMM conv keeps 7 bits
    # no kernel saturates: onnxruntime's fused integer graph equals its unfused QDQ arithmetic
    x = {"x": (RNG.random((1, 8, 6, 6)) * 6 - 3).astype(np.float32)}
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    fused = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    unfused = ort.InferenceSession(q.SerializeToString(), plain, providers=["CPUExecutionProvider"]).run(None, x)[0]
    np.testing.assert_allclose(fused, unfused, atol=0.2)  # one output quantization step at most


def test_uint8_weights_for_dynamic_matmul_without_dot_products():
    from test_quant import _transformer_block

    model = _transformer_block()
    spec = formats.spec_for("cpu", model, "dynamic", cpu="avx2")
    q = formats.dynamic_matmul(model, spec)
    stored = [numpy_helper.to_array(t) for t in q.graph.initializer if t.name.endswith("_quantized")]
    assert stored and all(a.dtype == np.uint8 for a in stored)
    vnni = formats.dynamic_matmul(model, formats.spec_for("cpu", model, "dynamic", cpu="avx512-vnni"))
    assert all(numpy_helper.to_array(t).dtype == np.int8 for t in vnni.graph.initializer if t.name.endswith("_quantized"))


def _fused_attention_block(attention: bool) -> onnx.ModelProto:
    """q/k/v projections -> com.microsoft MultiHeadAttention (as `optimize -O3` writes it: no
    Softmax left in the graph) -> output projection; ``attention=False``: q + k + v instead."""
    d = 32
    inits = [numpy_helper.from_array(RNG.standard_normal((d, d)).astype(np.float32) * 0.1, n) for n in ("wq", "wk", "wv", "wo")]
    nodes = [helper.make_node("MatMul", ["x", w], [w[1]], name=f"mm_{w[1]}") for w in ("wq", "wk", "wv")]
    if attention:
        nodes.append(helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["a"], name="mha", domain="com.microsoft",
                                      num_heads=4))
    else:
        nodes += [helper.make_node("Add", ["q", "k"], ["qk"], name="add_qk"), helper.make_node("Add", ["qk", "v"], ["a"], name="add_v")]
    nodes.append(helper.make_node("MatMul", ["a", "wo"], ["y"], name="mm_out"))
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, d])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=8)


@pytest.mark.parametrize("attention", [True, False])
def test_fused_attention_counts_as_a_transformer(attention):
    """An -O3 transformer (Softmax inside MultiHeadAttention) gets the dynamic MatMul format;
    the same MatMuls without attention do not."""
    model = _fused_attention_block(attention)
    assert formats.is_transformer(model) is attention
    assert formats.spec_for("cpu", model, "auto", cpu="avx2").dynamic_matmul is attention
    if attention:  # the dynamic model runs and stays close to the float one
        x = {"x": RNG.standard_normal((1, 8, 32)).astype(np.float32)}
        q = formats.dynamic_matmul(model, formats.spec_for("cpu", model, cpu="avx2"))
        run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]  # noqa: E731
        ref, got = run(model), run(q)
        assert sum(n.op_type == "MatMulInteger" for n in q.graph.node) == 4
        assert float(np.dot(ref.ravel(), got.ravel()) / np.linalg.norm(ref) / np.linalg.norm(got)) > 0.99
