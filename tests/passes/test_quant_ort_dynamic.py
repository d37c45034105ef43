"""onnxruntime-dynamic (passes/quant/ort_dynamic.py): onnxruntime's dynamic MatMul quantizer wrapped as a
rule; where it fires, and one case per reason a node is not handed to it (input outliers among them,
the decision of passes/quant/outliers.py), on onnx.helper graphs."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxforge.context import PassContext
from onnxforge.model import Model
from onnxforge.passes.quant.ort_dynamic import PASS_NAME
from onnxforge.passes.quant.outliers import input_stats, outlier_nodes
from onnxforge.passes.registry import resolve

from fusion_support import reasons_by_node, session

RULE = "onnxruntime-dynamic-matmul"


def _model(extra_nodes=(), extra_inits=None, outputs=("ya", "yb"), int_outputs=()) -> onnx.ModelProto:
    """a @ Wa -> ya (mm_a), b @ Wb -> yb (mm_b) on inputs [64, 256], then ``extra_nodes``; ``outputs``
    are 2-D (``int_outputs`` int32)."""
    rng = np.random.default_rng(0)
    inits = {"Wa": rng.standard_normal((256, 16)), "Wb": rng.standard_normal((256, 16)), **(extra_inits or {})}
    nodes = [helper.make_node("MatMul", ["a", "Wa"], ["ya"], name="mm_a"),
             helper.make_node("MatMul", ["b", "Wb"], ["yb"], name="mm_b"), *extra_nodes]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [64, 256]) for n in "ab"],
                              [helper.make_tensor_value_info(n, TensorProto.INT32 if n in int_outputs else TensorProto.FLOAT,
                                                             [None, None]) for n in outputs],
                              [numpy_helper.from_array(_stored(v), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _stored(v) -> np.ndarray:
    v = np.asarray(v)
    return v.astype(np.float32) if v.dtype.kind == "f" else v


def _feeds(count: int = 4, outlier: bool = False) -> list[dict]:
    rng = np.random.default_rng(1)
    out = []
    for _ in range(count):
        b = rng.standard_normal((64, 256)).astype(np.float32)
        if outlier:  # one channel of two tokens at 100 sets the u8 step for every token (test_quant_outliers.py)
            b[:2, 5] = 100.0
        out.append({"a": rng.standard_normal((64, 256)).astype(np.float32), "b": b})
    return out


def _run_pass(proto: onnx.ModelProto, denied=(), **settings):
    model = Model.from_proto(proto)
    ctx = PassContext(model=model, options={PASS_NAME: settings}, denied_rewrites=frozenset(denied))
    result = resolve(PASS_NAME).run(model.graph, ctx)
    return model.to_proto(), result, ctx


def _ops(proto: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in proto.graph.node]


def test_fires_on_each_constant_weight_matmul_and_the_result_runs_close_to_float():
    model = _model()
    out, result, ctx = _run_pass(model)
    assert result.stats == {RULE: 2} and not ctx.refusals
    assert [r[1:] for r in ctx.rewrites] == [(RULE, ("mm_a",)), (RULE, ("mm_b",))]
    onnx.checker.check_model(out, full_check=True)
    assert _ops(out).count("MatMulInteger") == 2 and "MatMul" not in _ops(out)
    assert {"Wa", "Wb"}.isdisjoint(t.name for t in out.graph.initializer)  # the float originals are gone
    feed = _feeds(1)[0]
    for want, got in zip(session(model).run(None, feed), session(out).run(None, feed)):
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.05


def test_refuses_an_input_with_outlier_channels_with_the_outlier_decisions_reason():
    model, feeds = _model(), _feeds(outlier=True)
    stats = input_stats(model, feeds, ["a", "b"])
    out, result, ctx = _run_pass(model, input_stats=stats, max_input_error=0.06)
    assert result.stats == {RULE: 1}
    reasons = reasons_by_node(ctx, RULE)
    assert reasons == outlier_nodes(model, feeds, 0.06)  # the same decision, named by the same node
    assert list(reasons) == ["mm_b"] and reasons["mm_b"].startswith("input outliers: b loses")
    kept = next(n for n in out.graph.node if n.name == "mm_b")
    assert kept.op_type == "MatMul" and kept.input[1] == "Wb"
    feed = feeds[0]
    np.testing.assert_array_equal(session(out).run(["yb"], feed)[0], session(model).run(["yb"], feed)[0])


def test_outliers_under_the_bound_are_quantized():
    model, feeds = _model(), _feeds(outlier=True)
    _, result, ctx = _run_pass(model, input_stats=input_stats(model, feeds, ["a", "b"]), max_input_error=1.0)
    assert result.stats == {RULE: 2} and not ctx.refusals


def test_fires_on_a_gemm_that_onnxruntime_writes_as_matmul_and_add():
    gemm = helper.make_node("Gemm", ["ya", "Wg", "bg"], ["yg"], name="gemm", transB=1)
    model = _model([gemm], {"Wg": np.ones((4, 16)), "bg": np.ones(4)}, ("yg", "yb"))
    out, result, ctx = _run_pass(model)
    assert result.stats == {RULE: 3} and not ctx.refusals
    assert "Gemm" not in _ops(out) and _ops(out).count("MatMulInteger") == 3
    feed = _feeds(1)[0]
    want, got = session(model).run(["yg"], feed)[0], session(out).run(["yg"], feed)[0]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.05


def test_a_refused_gemm_stays_float():
    """onnxruntime writes a Gemm as MatMul ``<name>_MatMul`` (+ Add) before it excludes by name: a Gemm
    kept float is handed over under both names."""
    gemm = helper.make_node("Gemm", ["ya", "Wg", "bg"], ["yg"], name="gemm")
    model = _model([gemm], {"Wg": np.ones((16, 4)), "bg": np.ones(4)}, ("yg", "yb"))
    out, result, ctx = _run_pass(model, exclude={"gemm": "scored better in float"})
    assert result.stats == {RULE: 2}
    assert reasons_by_node(ctx, RULE) == {"gemm": "kept float: scored better in float"}
    assert _ops(out).count("MatMulInteger") == 2 and any(n.op_type == "MatMul" and n.input[1] == "Wg" for n in out.graph.node)


def test_refuses_a_gemm_onnxruntime_keeps_as_it_is():
    gemm = helper.make_node("Gemm", ["ya", "Wg"], ["yg"], name="gemm", alpha=0.5)
    out, result, ctx = _run_pass(_model([gemm], {"Wg": np.ones((16, 4))}, ("yg", "yb")))
    assert result.stats == {RULE: 2}
    assert reasons_by_node(ctx, RULE) == {
        "gemm": "Gemm with alpha 0.5, beta 1, transA 0: onnxruntime's dynamic quantizer quantizes only alpha = beta = 1, "
                "transA = 0"}
    assert "Gemm" in _ops(out)


def test_refuses_an_activation_by_activation_product():
    product = helper.make_node("MatMul", ["ya", "t"], ["yt"], name="mm_act")
    transpose = helper.make_node("Transpose", ["yb"], ["t"], name="transpose")
    out, result, ctx = _run_pass(_model([transpose, product], outputs=("yt",)))
    assert result.stats == {RULE: 2}
    assert reasons_by_node(ctx, RULE) == {
        "mm_act": "activation x activation product: t is not a constant (onnxruntime quantizes constant weights only)"}
    assert next(n for n in out.graph.node if n.name == "mm_act").op_type == "MatMul"


def test_refuses_a_weight_that_is_not_float():
    nodes = [helper.make_node("Cast", ["ya"], ["yi"], to=TensorProto.INT32, name="cast"),
             helper.make_node("MatMul", ["yi", "Wi"], ["yint"], name="mm_int")]
    _, result, ctx = _run_pass(_model(nodes, {"Wi": np.ones((16, 4), np.int32)}, ("yint", "yb"), ("yint",)))
    assert result.stats == {RULE: 2}
    assert reasons_by_node(ctx, RULE) == {"mm_int": "its weight Wi is int32, not float"}


def test_refuses_a_node_the_caller_keeps_float():
    out, result, ctx = _run_pass(_model(), exclude={"mm_a": "the accuracy search returns it to float"})
    assert result.stats == {RULE: 1}
    assert reasons_by_node(ctx, RULE) == {"mm_a": "kept float: the accuracy search returns it to float"}
    assert next(n for n in out.graph.node if n.name == "mm_a").input[1] == "Wa"


def test_refuses_a_node_rolled_back_by_the_pass_manager():
    _, result, ctx = _run_pass(_model(), denied={(RULE, ("mm_b",))})
    assert result.stats == {RULE: 1}
    assert reasons_by_node(ctx, RULE) == {"mm_b": "rolled back: this rewrite broke verification"}


def test_refuses_nodes_inside_a_subgraph():
    inner = helper.make_graph([helper.make_node("MatMul", ["yb", "Wi"], ["inner"], name="inner_mm")], "then", [],
                              [helper.make_tensor_value_info("inner", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.ones((16, 4), np.float32), "Wi")])
    other = helper.make_graph([helper.make_node("Slice", ["yb", "s0", "s4", "s1"], ["sl"], name="slice")], "else", [],
                              [helper.make_tensor_value_info("sl", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("If", ["flag"], ["yif"], name="if", then_branch=inner, else_branch=other)]
    consts = {"flag": np.array(True), "s0": np.array([0]), "s4": np.array([4]), "s1": np.array([1])}
    _, result, ctx = _run_pass(_model(nodes, consts, ("ya", "yif")))
    assert result.stats == {RULE: 2}
    assert reasons_by_node(ctx, RULE) == {
        "inner_mm": "inside a subgraph: onnxruntime's dynamic quantizer quantizes the main graph only"}


def test_optimize_explain_lists_the_refusals(tmp_path, capsys):
    from onnxforge.cli import main

    gemm = helper.make_node("Gemm", ["ya", "Wg"], ["yg"], name="gemm", alpha=0.5)
    path = tmp_path / "m.onnx"
    onnx.save(_model([gemm], {"Wg": np.ones((16, 4))}, ("yg", "yb")), str(path))
    rc = main(["optimize", str(path), "-o", str(tmp_path / "q.onnx"), "--passes", PASS_NAME, "--explain"])
    printed = capsys.readouterr()
    assert rc in (0, None), printed.out + printed.err
    assert "onnxruntime's dynamic quantizer quantizes only alpha = beta = 1" in printed.out + printed.err
    assert "MatMulInteger" in _ops(onnx.load(str(tmp_path / "q.onnx")))
