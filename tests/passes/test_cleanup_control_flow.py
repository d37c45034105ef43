"""If with a condition known before run time becomes its branch (fold-constants' inlined_if rule)."""
import numpy as np

from cleanup_support import assert_parity, histogram, model_from_text, refusal_reasons, run_pass

OPSET = '<ir_version: 8, opset_import: ["" : 17]>'


def folded(text: str):
    model = model_from_text(OPSET + text)
    run_pass("constant-to-initializer", model)
    before = model.to_proto()
    run_pass("simplify-shapes", model)  # folds a static dim read from a partly dynamic shape
    result, ctx = run_pass("fold-constants", model)
    return model, before, result, ctx


def sizes(*ns):
    return [{"x": np.linspace(-2, 2, 2 * n, dtype=np.float32).reshape(n, 2)} for n in ns]


# The condition is a comparison of a static dim (2) with a constant: it folds after Shape
# folds, with the batch dim N left dynamic. The two Ifs' branches both make `t` and `u`
# (valid while they are branches, a clash once both are inlined) and read the outer h.
SHAPE_IF = """
g (float[N,2] x) => (float[N,2] y) {
  h = Relu(x)
  s = Shape(x)
  one = Constant <value = int64 {1}> ()
  two = Constant <value = int64 {2}> ()
  d = Gather(s, one)
  c = Equal(d, two)
  r = If(c) <then_branch = g1 () => (float[N,2] u) { t = Mul(h, h) u = Add(t, h) },
             else_branch = g2 () => (float[N,2] u) { u = Sub(h, h) }>
  q = If(c) <then_branch = g3 () => (float[N,2] u) { t = Neg(h) u = Add(t, x) },
             else_branch = g4 () => (float[N,2] u) { u = Abs(h) }>
  y = Add(r, q)
}"""


def test_if_on_a_condition_that_folds_becomes_its_branch_with_clashing_names_renamed():
    model, before, result, _ = folded(SHAPE_IF)
    assert result.stats["inlined_if"] == 2
    assert histogram(model) == {"Relu": 1, "Mul": 1, "Neg": 1, "Add": 3}
    names = [t.name for n in model.graph.nodes for t in n.outputs]
    assert len(names) == len(set(names))
    proto = model.to_proto()
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    for feed in sizes(1, 3):
        assert_parity(before, model, feed)


def test_if_on_data_is_refused_with_the_condition_named():
    model, before, result, ctx = folded(SHAPE_IF.replace("c = Equal(d, two)", "m = ReduceMax <keepdims = 0> (x)\n"
                                                         "  z = Constant <value = float {0.0}> ()\n"
                                                         "  c = Greater(m, z)"))
    assert "inlined_if" not in result.stats
    assert histogram(model)["If"] == 2
    assert "the condition depends on data (c)" in refusal_reasons(ctx)
    for feed in sizes(1, 3):
        assert_parity(before, model, feed)


def test_if_inside_a_loop_body_folds():
    model, before, result, _ = folded("""
    g (float[N,2] x) => (float[N,2] y) {
      trip = Constant <value = int64 {3}> ()
      go = Constant <value = bool {1}> ()
      y = Loop(trip, go, x) <body = body (int64 i, bool cin, float[N,2] acc) => (bool cout, float[N,2] next) {
        cout = Identity(cin)
        k = Constant <value = bool {0}> ()
        next = If(k) <then_branch = g1 () => (float[N,2] a) { a = Neg(acc) },
                      else_branch = g2 () => (float[N,2] b) { half = Constant <value = float {0.5}> ()
                                                              b = Mul(acc, half) }>
      }>
    }""")
    assert result.stats["inlined_if"] == 1
    assert histogram(model) == {"Loop": 1, "Identity": 1, "Mul": 1}
    for feed in sizes(1, 4):
        assert_parity(before, model, feed)


def test_if_whose_graph_outputs_would_take_one_branch_tensor_twice_is_refused():
    model, before, result, ctx = folded("""
    g (float[N,2] x) => (float[N,2] y, float[N,2] z) {
      c = Constant <value = bool {1}> ()
      y, z = If(c) <then_branch = g1 () => (float[N,2] t, float[N,2] t) { t = Relu(x) },
                    else_branch = g2 () => (float[N,2] e, float[N,2] f) { e = Neg(x) f = Abs(x) }>
    }""")
    assert "inlined_if" not in result.stats
    assert "an If output is a graph output and the branch returns a value it does not make once" in refusal_reasons(ctx)
    assert histogram(model)["If"] == 1  # kept as it was (onnxruntime itself returns None for the repeated output)


def test_if_feeding_a_model_output_from_an_untyped_branch_output_keeps_the_declared_type():
    """onnx's expanded functions (AffineGrid) leave branch outputs untyped, which a subgraph
    may; the model output that takes the branch tensor's place must keep its type."""
    import onnx

    from cleanup_support import session
    from onnxforge.model import Model

    proto = onnx.parser.parse_model(OPSET + """
    g (float[2] x) => (float[2] y) {
      c = Constant <value = bool {1}> ()
      y = If(c) <then_branch = g1 () => (float[2] t) { t = Relu(x) }, else_branch = g2 () => (float[2] e) { e = Neg(x) }>
    }""")
    for branch in proto.graph.node[1].attribute:
        branch.g.output[0].ClearField("type")
    onnx.checker.check_model(proto, full_check=True)
    model = Model.from_proto(proto)
    run_pass("constant-to-initializer", model)
    before = model.to_proto()
    result, _ = run_pass("fold-constants", model)
    assert result.stats == {"inlined_if": 1}
    out = model.to_proto().graph.output[0]
    assert out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_value for d in out.type.tensor_type.shape.dim] == [2]
    assert_parity(before, model, {"x": np.array([1.0, -2.0], np.float32)})
    assert session(before).run(None, {"x": np.array([1.0, -2.0], np.float32)})[0].tolist() == [1.0, 0.0]
