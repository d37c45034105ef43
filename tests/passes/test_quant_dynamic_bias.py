"""Rule dynamic-matmul-bias (passes/qdq/int8_weights.py): a constant bias added to a
DynamicQuantizeMatMul goes into the kernel's bias input; one case where it fires (counts,
onnxruntime parity, checker) and one per refusal reason."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fusion_support import histogram, run_pass, session
from onnxforge.model import Model

PASS = "int8-weights-to-dynamic-matmul"
RULE = "dynamic-matmul-bias"
RNG = np.random.default_rng(5)
X = RNG.standard_normal((3, 4)).astype(np.float32)


def _model(bias: np.ndarray | None, extra_reader: bool = False, zero_point: bool = True) -> onnx.ModelProto:
    """y = DynamicQuantizeMatMul(x, W, s[, z]) + b; ``bias`` None: b is a graph input."""
    w = RNG.integers(0, 256, (4, 6)).astype(np.uint8)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.full(6, 0.02, np.float32), "s"),
             numpy_helper.from_array(np.full(6, 128, np.uint8), "z")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])]
    if bias is None:
        inputs.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, [6]))
    else:
        inits.append(numpy_helper.from_array(bias, "b"))
    nodes = [helper.make_node("DynamicQuantizeMatMul", ["x", "w", "s", "z"] if zero_point else ["x", "w", "s"], ["p"],
                              name="dqmm", domain="com.microsoft"),
             helper.make_node("Add", ["p", "b"], ["y"], name="add")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 6])]
    if extra_reader:
        nodes.append(helper.make_node("Relu", ["p"], ["r"], name="relu"))
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [3, 6]))
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=8)


@pytest.mark.parametrize("zero_point", [True, False])
def test_constant_bias_goes_into_the_kernel(zero_point):
    bias = RNG.standard_normal(6).astype(np.float32)
    proto = _model(bias, zero_point=zero_point)
    model = Model.from_proto(proto)
    result, ctx = run_pass(model, PASS)
    fused = model.to_proto()
    onnx.checker.check_model(fused, full_check=True)
    assert result.stats.get(RULE) == 1 and histogram(model) == {"DynamicQuantizeMatMul": 1}
    node = fused.graph.node[0]
    assert len(node.input) == 5 and node.output[0] == "y"
    expect = session(proto).run(None, {"x": X})[0]
    np.testing.assert_allclose(session(fused).run(None, {"x": X})[0], expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case, reason", [
    ("input", "the added tensor is not a constant"),
    ("rows", "is not one float per weight column"),
    ("reader", "the product is read outside the Add"),
])
def test_refusals(case, reason):
    proto = {"input": lambda: _model(None),
             "rows": lambda: _model(RNG.standard_normal((3, 6)).astype(np.float32)),
             "reader": lambda: _model(RNG.standard_normal(6).astype(np.float32), extra_reader=True)}[case]()
    model = Model.from_proto(proto)
    result, ctx = run_pass(model, PASS)
    assert not result.changed and histogram(model)["Add"] == 1
    reasons = [r.reason for r in ctx.refusals if r.rule == RULE]
    assert len(reasons) == 1 and reason in reasons[0], reasons
