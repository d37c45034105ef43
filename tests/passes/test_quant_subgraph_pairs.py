"""unpair-before-subgraph-reads (passes/quant/subgraph_pairs.py): an activation Q -> DQ pair from which an
If branch's read is reached through ops onnxruntime moves Q/DQ across is dropped; where it fires, and one
case per refusal reason, on onnx.parser graphs (the process-abort case itself: test_quant_unseen_models.py)."""
from __future__ import annotations

import numpy as np
import onnx

from onnxforge.context import PassContext
from onnxforge.model import Model
from onnxforge.passes.quant.subgraph_pairs import PASS_NAME
from onnxforge.passes.registry import resolve

from fusion_support import reasons_by_node, session

RULE = "unpair-qdq-before-subgraph-read"


def _model(tail: str, y: str = "float[3,2] y") -> onnx.ModelProto:
    """Relu(x) -> Q -> DQ (named n4), then ``tail``; nodes named n0, n1, ... in order."""
    model = onnx.parser.parse_model(f"""<ir_version: 8, opset_import: ["" : 17]>
    g (float[2,3] x, bool c) => ({y}) {{
      m = Relu (x)
      s = Constant <value = float {{0.01}}> ()
      z = Constant <value = uint8 {{128}}> ()
      q = QuantizeLinear (m, s, z)
      d = DequantizeLinear (q, s, z)
      {tail}
    }}""")
    for i, node in enumerate(model.graph.node):
        node.name = f"n{i}"
    return model


def _run(proto: onnx.ModelProto):
    model = Model.from_proto(proto)
    ctx = PassContext(model=model)
    result = resolve(PASS_NAME).run(model.graph, ctx)
    return model.to_proto(), result, ctx


BRANCHES = "<then_branch = g1 () => (float[3,2] a) { a = Relu (r) }, else_branch = g2 () => (float[3,2] b) { b = Neg (r) }>"


def test_fires_on_a_pair_a_branch_reads_through_propagated_ops_and_the_model_reads_the_float_tensor():
    model = _model("t = Transpose (d)\n shape = Constant <value = int64[2] {3, 2}> ()\n r = Reshape (t, shape)\n"
                   f" y = If (c) {BRANCHES}")
    out, result, ctx = _run(model)
    assert result.stats == {RULE: 1} and not ctx.refusals
    ops = [n.op_type for n in out.graph.node]
    assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops
    onnx.checker.check_model(out)
    x = np.array([[1, -2, 3], [-4, 5, -6]], np.float32)
    np.testing.assert_array_equal(session(out).run(None, {"x": x, "c": np.array(True)})[0], np.maximum(x, 0).T)


def test_refuses_a_pair_no_branch_reads():
    out, result, ctx = _run(_model("y = Transpose (d)"))
    assert result.stats == {}
    assert reasons_by_node(ctx, RULE) == {
        "n4": "no subgraph reads its output through ops onnxruntime moves Q/DQ across (onnxruntime loads the pair)"}
    assert [n.op_type for n in out.graph.node].count("DequantizeLinear") == 1


def test_refuses_a_pair_reached_only_through_an_op_onnxruntime_does_not_move_it_across():
    model = _model(f"t = Transpose (d)\n r = Neg (t)\n y = If (c) {BRANCHES}")
    out, result, ctx = _run(model)
    assert result.stats == {}
    assert list(reasons_by_node(ctx, RULE)) == ["n4"]
    assert [n.op_type for n in out.graph.node].count("DequantizeLinear") == 1


def test_refuses_a_pair_inside_a_subgraph():
    branch = """<then_branch = g1 () => (float[2,3] a) {
        s1 = Constant <value = float {0.01}> ()
        z1 = Constant <value = uint8 {128}> ()
        qi = QuantizeLinear (x, s1, z1)
        di = DequantizeLinear (qi, s1, z1)
        a = Relu (di)
      }, else_branch = g2 () => (float[2,3] b) { b = Neg (x) }>"""
    model = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[2,3] x, bool c) => (float[2,3] y) {
      y = If (c) """ + branch + """
    }""")
    model.graph.node[0].attribute[0].g.node[3].name = "inner_dq"
    _, result, ctx = _run(model)
    assert result.stats == {}
    assert reasons_by_node(ctx, RULE) == {"inner_dq": "inside a subgraph: the abort this avoids is of main-graph pairs"}
