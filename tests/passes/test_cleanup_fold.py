import numpy as np
import onnx
import onnx_graphsurgeon as gs

from cleanup_support import assert_parity, histogram, model_from_text, refusal_reasons, run_pass, session

OPSET = '<ir_version: 8, opset_import: ["" : 17]>'


def folded(text: str, **settings):
    model = model_from_text(OPSET + text)
    run_pass("constant-to-initializer", model)
    before = model.to_proto()
    result, ctx = run_pass("fold-constants", model, **settings)
    return model, before, result, ctx


def test_constant_subgraph_folds_bit_identically():
    model, before, result, _ = folded("""
    g (float[4] x) => (float[4] y) {
      a = Constant <value = float[4] {0.1, 0.2, 0.3, 0.7}> ()
      b = Constant <value = float[4] {3.0, 7.0, 11.0, 13.0}> ()
      c = Div(a, b)
      d = Exp(c)
      e = Sqrt(d)
      y = Mul(x, e)
    }""")
    assert result.stats == {"folded_node": 3}
    assert histogram(model) == {"Mul": 1}
    # The stored constant is exactly what onnxruntime computes from the original graph.
    const = next(t for t in model.graph.nodes[0].inputs if isinstance(t, gs.Constant))
    ref = model_from_text(OPSET + """
    g () => (float[4] e) {
      a = Constant <value = float[4] {0.1, 0.2, 0.3, 0.7}> ()
      b = Constant <value = float[4] {3.0, 7.0, 11.0, 13.0}> ()
      c = Div(a, b)
      d = Exp(c)
      e = Sqrt(d)
    }""")
    assert session(ref).run(None, {})[0].tobytes() == np.asarray(const.values).tobytes()
    assert_parity(before, model, {"x": np.array([1, -2, 3, 4], np.float32)})


def test_static_shape_chain_folds_to_a_constant_reshape():
    model, before, result, _ = folded("""
    g (float[2,3,4] x) => (float[6,4] y) {
      s = Shape(x)
      i0 = Constant <value = int64 {0}> ()
      i1 = Constant <value = int64 {1}> ()
      d0 = Gather(s, i0)
      d1 = Gather(s, i1)
      m = Mul(d0, d1)
      ax = Constant <value = int64[1] {0}> ()
      u = Unsqueeze(m, ax)
      last = Constant <value = int64[1] {-1}> ()
      shape = Concat <axis = 0> (u, last)
      y = Reshape(x, shape)
    }""")
    assert result.stats == {"folded_shape": 1, "folded_node": 5}
    assert histogram(model) == {"Reshape": 1}
    shape = model.graph.nodes[0].inputs[1]
    assert isinstance(shape, gs.Constant) and shape.values.tolist() == [6, -1]
    assert_parity(before, model, {"x": np.arange(24, dtype=np.float32).reshape(2, 3, 4)})


def test_dynamic_dims_stay_dynamic():
    model, before, result, _ = folded("""
    g (float[N,4] x) => (float[N,4] y) {
      s = Shape(x)
      tail = Shape <start = 1> (x)
      t = Cast <to = 1> (tail)
      z = Mul(x, t)
      y = Reshape(z, s)
    }""")
    # Only the static part (dims from 1 on) folds; the full Shape reads N and stays.
    assert result.stats == {"folded_shape": 1, "folded_node": 1}
    assert histogram(model) == {"Shape": 1, "Mul": 1, "Reshape": 1}
    for n in (1, 3):
        assert_parity(before, model, {"x": np.ones((n, 4), np.float32)})


def test_random_ops_are_not_folded():
    model, _, result, _ = folded("""
    g (float[4] x) => (float[4] y) {
      a = Constant <value = float[4] {1.0, 2.0, 3.0, 4.0}> ()
      r = RandomUniformLike(a)
      y = Add(x, r)
    }""")
    assert not result.changed
    assert histogram(model) == {"RandomUniformLike": 1, "Add": 1}


def test_large_expand_is_not_folded():
    model, _, result, ctx = folded("""
    g (float[1024,1024] x) => (float[1024,1024] y) {
      one = Constant <value = float {1.5}> ()
      s = Constant <value = int64[2] {1024, 1024}> ()
      big = Expand(one, s)
      y = Add(x, big)
    }""")
    assert not result.changed
    assert any("would exceed" in r for r in refusal_reasons(ctx))


def test_dequantizing_cast_of_int8_weights_is_not_folded():
    weights = np.arange(256 * 256).astype(np.int8).reshape(256, 256)
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 256])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 256])
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Cast", ["w"], ["wf"], to=onnx.TensorProto.FLOAT),
         onnx.helper.make_node("MatMul", ["x", "wf"], ["y"])],
        "g", [x], [y], [onnx.numpy_helper.from_array(weights, "w")])
    from onnxforge.model import Model

    model = Model.from_proto(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]))
    result, ctx = run_pass("fold-constants", model)
    assert not result.changed  # 64 KiB of int8 would become 256 KiB of float32
    assert any("exceed" in r for r in refusal_reasons(ctx))


def test_fold_size_limit_is_respected():
    model, _, result, ctx = folded("""
    g (float[64] x) => (float[64] y) {
      a = Constant <value = float[64] {""" + ", ".join(["2.0"] * 64) + """}> ()
      b = Sqrt(a)
      y = Add(x, b)
    }""", fold_size_limit=128)
    assert not result.changed
    assert any("fold_size_limit" in r for r in refusal_reasons(ctx))


def test_unknown_domain_and_graph_output_are_not_folded():
    model = model_from_text('<ir_version: 8, opset_import: ["" : 17, "custom.ops" : 1]>' + """
    g (float[2] x) => (float[2] y, float[2] c) {
      a = Constant <value = float[2] {1.0, 4.0}> ()
      b = custom.ops.Twice(a)
      c = Sqrt(a)
      y = Add(x, b)
    }""")
    run_pass("constant-to-initializer", model)
    result, ctx = run_pass("fold-constants", model)
    assert not result.changed
    assert histogram(model) == {"Twice": 1, "Sqrt": 1, "Add": 1}
    assert "an output is a graph output" in refusal_reasons(ctx)


def test_folds_inside_if_branches():
    model, before, result, _ = folded("""
    g (float[2] x, bool c) => (float[2] y) {
      y = If(c) <then_branch = g1 () => (float[2] t) {
                    k = Constant <value = float[2] {1.0, 4.0}> ()
                    r = Sqrt(k)
                    t = Mul(x, r) },
                 else_branch = g2 () => (float[2] e) { e = Neg(x) }>
    }""")
    assert result.stats == {"folded_node": 1}
    assert histogram(model) == {"If": 1, "Mul": 1, "Neg": 1}
    for c in (True, False):
        assert_parity(before, model, {"x": np.array([1.0, -2.0], np.float32), "c": np.array(c)})


def test_if_with_constant_condition_becomes_its_branch():
    model, before, result, _ = folded("""
    g (float[2] x) => (float[2] y) {
      c = Constant <value = bool {1}> ()
      h = Relu(x)
      r = If(c) <then_branch = g1 () => (float[2] t) { k = Constant <value = float[2] {2.0, 3.0}> () t = Mul(h, k) },
                 else_branch = g2 () => (float[2] e) { e = Neg(h) }>
      y = Sqrt(r)
    }""")
    assert result.stats == {"inlined_if": 1}
    assert histogram(model) == {"Relu": 1, "Mul": 1, "Sqrt": 1}
    assert [i.name for i in model.to_proto().graph.initializer] == ["k"]
    assert_parity(before, model, {"x": np.array([1.0, -2.0], np.float32)})


def test_if_whose_output_is_a_graph_output_is_inlined_under_the_output_name():
    model, before, result, ctx = folded("""
    g (float[2] x) => (float[2] y) {
      c = Constant <value = bool {0}> ()
      y = If(c) <then_branch = g1 () => (float[2] t) { t = Relu(x) }, else_branch = g2 () => (float[2] e) { e = Neg(x) }>
    }""")
    assert result.stats == {"inlined_if": 1}
    assert histogram(model) == {"Neg": 1}
    assert_parity(before, model, {"x": np.array([1.0, -2.0], np.float32)})


def test_size_limit_option_reaches_the_pass_and_bad_options_are_refused(tmp_path):
    """The recipe/API ``options`` table reaches fold-constants; unknown keys, wrong types
    and passes outside the pipeline are refused before any work."""
    import numpy as np
    import onnx
    from onnx import TensorProto as T
    from onnx import helper

    from onnxforge import optimize
    import pytest

    from onnxforge.errors import OptionError

    big = onnx.numpy_helper.from_array(np.ones((64, 64), np.float32), "big")  # 16 KiB
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Neg", ["big"], ["n"]), helper.make_node("Add", ["x", "n"], ["y"])], "g",
        [helper.make_tensor_value_info("x", T.FLOAT, [64, 64])], [helper.make_tensor_value_info("y", T.FLOAT, [64, 64])],
        initializer=[big]), opset_imports=[helper.make_opsetid("", 17)])
    folded, _ = optimize(model, passes=["fold-constants"])
    assert "Neg" not in [n.op for n in folded.graph.nodes]
    kept, report = optimize(model, passes=["fold-constants"], options={"fold-constants": {"size_limit": 1024}})
    assert "Neg" in [n.op for n in kept.graph.nodes]
    assert any("fold_size_limit" in r["reason"] or "exceed" in r["reason"] for r in report.refusals)
    for options, needle in (({"fold-constants": {"size": 1}}, "has no option 'size'"),
                            ({"fold-constants": {"size_limit": "big"}}, "takes a int"),
                            ({"fuse-gelu": {}}, "does not run")):
        with pytest.raises(OptionError, match=needle):
            optimize(model, passes=["fold-constants"], options=options)
