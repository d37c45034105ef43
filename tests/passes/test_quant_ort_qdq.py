"""onnxruntime-qdq (passes/quant/ort_qdq.py): onnxruntime's QDQ placement wrapped as a rule;
where it fires, and one case per reason a node is not handed to it, on onnx.helper graphs."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxforge.context import PassContext
from onnxforge.model import Model
from onnxforge.passes.quant.calibrate import calibrate
from onnxforge.passes.quant.formats import spec_for
from onnxforge.passes.quant.ort_qdq import PASS_NAME
from onnxforge.passes.registry import resolve

from fusion_support import reasons_by_node, session

RNG = np.random.default_rng(11)
RULE = "onnxruntime-qdq-placement"


def _model(extra_nodes=(), extra_inits=None, y: str = "y") -> onnx.ModelProto:
    """Conv -> Relu -> Conv (named conv1, relu, conv2), then ``extra_nodes``."""
    inits = {"w1": RNG.standard_normal((8, 3, 3, 3)) * 0.3, "b1": RNG.standard_normal(8) * 0.1,
             "w2": RNG.standard_normal((4, 8, 1, 1)) * 0.3, **(extra_inits or {})}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["c2" if extra_nodes else y], name="conv2"), *extra_nodes]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(_stored(v), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _stored(v) -> np.ndarray:
    v = np.asarray(v)
    return v.astype(np.float32) if v.dtype.kind == "f" else v


def _feeds(n: int = 4) -> list[dict]:
    return [{"x": RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(n)]


def _run_pass(proto: onnx.ModelProto, exclude: dict | None = None, denied=()):
    ranges = calibrate(proto, _feeds())[0]
    model = Model.from_proto(proto)
    options = {PASS_NAME: {"ranges": ranges, "spec": spec_for("cpu", proto, mode="static", vnni=True),
                           "exclude": exclude or {}}}
    ctx = PassContext(model=model, options=options, denied_rewrites=frozenset(denied))
    result = resolve(PASS_NAME).run(model.graph, ctx)
    return model.to_proto(), result, ctx


def test_fires_on_every_quantizable_node_and_the_result_runs_close_to_float():
    model = _model()
    out, result, ctx = _run_pass(model)
    assert result.stats == {RULE: 3} and not ctx.refusals
    assert [r[1:] for r in ctx.rewrites] == [(RULE, ("conv1",)), (RULE, ("relu",)), (RULE, ("conv2",))]
    onnx.checker.check_model(out, full_check=True)  # also: nodes in order (onnxruntime appends Q/DQ after readers)
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("QuantizeLinear") >= 2 and ops.count("DequantizeLinear") >= 4
    read = {i for n in out.graph.node for i in n.input}
    assert {t.name for t in out.graph.initializer} <= read  # the float originals of the weights are gone
    assert {"w1", "w2"}.isdisjoint(t.name for t in out.graph.initializer)
    feed = _feeds(1)[0]
    (want,), (got,) = session(model).run(None, feed), session(out).run(None, feed)
    cosine = float(np.dot(want.ravel(), got.ravel()) / np.linalg.norm(want) / np.linalg.norm(got))
    assert cosine > 0.99


def test_refuses_an_op_type_the_format_does_not_quantize():
    out, result, ctx = _run_pass(_model([helper.make_node("Softmax", ["c2"], ["y"], name="softmax", axis=1)]))
    assert result.stats == {RULE: 3}
    assert reasons_by_node(ctx, RULE) == {"softmax": "Softmax is not among the op types this format quantizes"}
    softmax = next(n for n in out.graph.node if n.op_type == "Softmax")
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] == softmax.output[0] for n in out.graph.node)


def test_refuses_a_node_the_caller_keeps_float_and_onnxruntime_leaves_it_float():
    out, result, ctx = _run_pass(_model(), exclude={"conv2": "scored better in float"})
    assert result.stats == {RULE: 2}
    assert reasons_by_node(ctx, RULE) == {"conv2": "kept float: scored better in float"}
    conv2 = next(n for n in out.graph.node if n.name == "conv2")
    assert conv2.input[1] == "w2"  # its float weight, read directly


def test_refuses_a_node_rolled_back_by_the_pass_manager():
    _, result, ctx = _run_pass(_model(), denied={(RULE, ("relu",))})
    assert result.stats == {RULE: 2}
    assert reasons_by_node(ctx, RULE) == {"relu": "rolled back: this rewrite broke verification"}


def test_refuses_nodes_inside_a_subgraph():
    branch = helper.make_graph([helper.make_node("Relu", ["c2"], ["inner"], name="inner_relu")], "then", [],
                               [helper.make_tensor_value_info("inner", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Neg", ["c2"], ["neg"], name="neg")], "else", [],
                              [helper.make_tensor_value_info("neg", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("If", ["flag"], ["y"], name="if", then_branch=branch, else_branch=other)]
    _, result, ctx = _run_pass(_model(nodes, {"flag": np.array(True)}))
    assert result.stats == {RULE: 3}
    refusals = reasons_by_node(ctx, RULE)
    assert refusals["inner_relu"] == "inside a subgraph: onnxruntime's QDQ quantizer places Q/DQ in the main graph only"
    assert refusals["if"] == "If is not among the op types this format quantizes"
    assert refusals["neg"] == "Neg is not among the op types this format quantizes"
