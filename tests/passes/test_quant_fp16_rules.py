"""convert-to-fp16's rules (passes/quant/fp16_rules.py): where each fires, and one case per
reason a node stays float32, on onnx.parser graphs."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxforge.context import PassContext
from onnxforge.passes.quant.fp16 import to_fp16
from onnxforge.passes.quant.fp16_rules import PASS_NAME

from fusion_support import reasons_by_node

DENSE = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 8] x) => (float[2, 8] y) <float[8, 8] w = {@W@}, float[8] b = {@B@}> {
    m = MatMul(x, w)
    r = Relu(m)
    y = Add(r, b)
}
"""


def _dense(w_scale: float = 0.3, b_value: float = 0.1) -> onnx.ModelProto:
    w = np.random.default_rng(0).standard_normal((8, 8)) * w_scale
    values = ", ".join(f"{v:.6g}" for v in w.reshape(-1))
    text = DENSE.replace("@W@", values).replace("@B@", ", ".join([f"{b_value:g}"] * 8))
    model = onnx.parser.parse_model(text)
    for i, node in enumerate(model.graph.node):
        node.name = ("mm", "relu", "add")[i]
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _fired(ctx: PassContext) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _pass, rule, _nodes in ctx.rewrites:
        counts[rule] = counts.get(rule, 0) + 1
    return counts


def test_node_to_fp16_fires_with_casts_only_at_the_float32_boundary():
    model, ctx = _dense(), PassContext()
    out = to_fp16(model, {}, ctx=ctx)
    onnx.checker.check_model(out)
    assert _fired(ctx) == {"node-to-fp16": 3} and not ctx.refusals
    assert [n.op_type for n in out.graph.node].count("Cast") == 2  # x in, y out
    assert {t.data_type for t in out.graph.initializer} == {TensorProto.FLOAT16}
    assert out.graph.input[0].type.tensor_type.elem_type == out.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    np.testing.assert_allclose(_run(out, x), _run(model, x), rtol=2e-2, atol=2e-3)


def test_a_second_run_changes_nothing():
    """In a pipeline iterating to a fixpoint the pass runs again on its own output."""
    from onnxforge.model import Model
    from onnxforge.passes.registry import resolve

    model = Model.from_proto(_dense())
    options = {PASS_NAME: {"float_tensors": ["m", "r"], "keep": {"relu": "kept float32 by the caller"}}}
    first, again = (resolve(PASS_NAME).run(model.graph, PassContext(model=model, options=options)) for _ in range(2))
    assert first.stats == {"node-to-fp16": 2} and not again.changed
    assert [n.op for n in model.graph.nodes].count("Cast") == 4  # x in, around relu, y out


def test_io_rules_make_graph_inputs_and_outputs_float16():
    model, ctx = _dense(), PassContext()
    out = to_fp16(model, {"relu": "kept float32 by the caller"}, keep_io_types=False, ctx=ctx)
    onnx.checker.check_model(out)
    assert _fired(ctx) == {"input-to-fp16": 1, "node-to-fp16": 2, "output-to-fp16": 1}
    assert out.graph.input[0].type.tensor_type.elem_type == out.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert [n.op_type for n in out.graph.node].count("Cast") == 2  # around the float32 relu only
    x = np.random.default_rng(2).standard_normal((2, 8)).astype(np.float32)
    np.testing.assert_allclose(_run(out, x.astype(np.float16)).astype(np.float32), _run(model, x), rtol=2e-2, atol=2e-3)


def test_refuses_a_node_the_caller_keeps_with_its_reason():
    """Calibration overflow, a missing float16 kernel and the accuracy budget reach the rule this way."""
    ctx = PassContext()
    why = "activation overflows fp16: m reached 7e+04"
    out = to_fp16(_dense(), {"relu": why}, ctx=ctx)
    assert reasons_by_node(ctx, "node-to-fp16") == {"relu": why} and _fired(ctx) == {"node-to-fp16": 2}
    relu = next(n for n in out.graph.node if n.op_type == "Relu")
    assert all(name.endswith("_to_fp32") or name == "m" for name in relu.input)  # reads float32


def test_refuses_a_node_reading_an_initializer_fp16_cannot_hold():
    from onnxforge.model import Model
    from onnxforge.passes.registry import resolve

    model = Model.from_proto(_dense(b_value=1e6))
    ctx = PassContext(model=model, options={PASS_NAME: {"float_tensors": ["m", "r"]}})  # the parser gives no value_info
    resolve(PASS_NAME).run(model.graph, ctx)
    assert reasons_by_node(ctx, "node-to-fp16") == {"add": "initializer b: overflows fp16 (max |x| 1e+06)"}
    assert _fired(ctx) == {"node-to-fp16": 2}


def test_refuses_ops_whose_schema_takes_no_float16():
    ctx = PassContext()
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[4] x, float limit) => (float[4] y) <float start = {0.0}, float delta = {1.0}> {
        r = Range(start, limit, delta)
        y = Add(x, r)
    }""")
    model.graph.node[0].name = "grid"
    to_fp16(model, {}, ctx=ctx)
    assert reasons_by_node(ctx, "node-to-fp16") == {"grid": "ONNX Range-11 takes no float16 (start)"}


def test_refuses_float_only_contrib_ops():
    """DynamicQuantizeLSTM (com.microsoft) takes float X only: onnxruntime's schema says so."""
    from onnxforge.passes.quant.fp16_rules import schema_fp16_problem

    why = schema_fp16_problem("DynamicQuantizeLSTM", "com.microsoft", 1, ["X", "W", "R", "B"], ["Y"])
    assert why is not None and why.startswith("onnxruntime com.microsoft.DynamicQuantizeLSTM-1 takes no float16")


def test_refuses_nodes_holding_subgraphs():
    body = helper.make_graph([helper.make_node("Neg", ["x"], ["t"])], "b", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])])
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["i"], name="if", then_branch=body, else_branch=body),
         helper.make_node("Relu", ["i"], ["y"], name="relu")], "g",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, []), helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    ctx = PassContext()
    out = to_fp16(model, {}, ctx=ctx)
    onnx.checker.check_model(out)
    assert reasons_by_node(ctx, "node-to-fp16") == {"if": "If holds a subgraph: its body is not converted"}
    assert _fired(ctx) == {"node-to-fp16": 1}
    sess = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"c": np.array(True), "x": np.array([-1.5, 2.0], np.float32)})[0]
    np.testing.assert_array_equal(y, [1.5, 0.0])
