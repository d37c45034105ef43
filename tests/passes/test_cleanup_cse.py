import numpy as np

from cleanup_support import assert_parity, histogram, model_from_text, refusal_reasons, run_pass

OPSET = '<ir_version: 8, opset_import: ["" : 17]>'
X = {"x": np.array([[-1.0, 0.5, 2.0]], np.float32)}


def test_identical_nodes_merge_including_equal_small_constants():
    model = model_from_text(OPSET + """
    g (float[1,3] x) => (float[1,3] y) {
      a = Relu(x)
      b = Relu(x)
      k1 = Constant <value = float[3] {1.0, 2.0, 3.0}> ()
      k2 = Constant <value = float[3] {1.0, 2.0, 3.0}> ()
      c = Add(a, k1)
      d = Add(b, k2)
      e = Softmax <axis = 1> (c)
      f = Softmax <axis = 1> (d)
      y = Sub(e, f)
    }""")
    run_pass("constant-to-initializer", model)
    before = model.to_proto()
    result, _ = run_pass("eliminate-common-subexpressions", model)
    # Relu, then the Adds (equal constants), then the Softmaxes.
    assert result.stats == {"merged_node": 3}
    assert histogram(model) == {"Relu": 1, "Add": 1, "Softmax": 1, "Sub": 1}
    assert_parity(before, model, X)


def test_different_attributes_constants_and_random_ops_do_not_merge():
    model = model_from_text(OPSET + """
    g (float[1,3] x) => (float[1,3] y, float[1,3] z, float[1,3] w) {
      a = Softmax <axis = 1> (x)
      b = Softmax <axis = 0> (x)
      y = Add(a, b)
      p = Constant <value = float {0.0}> ()
      n = Constant <value = float {-0.0}> ()
      c = Add(x, p)
      d = Add(x, n)
      z = Div(c, d)
      r1 = RandomUniformLike(x)
      r2 = RandomUniformLike(x)
      w = Sub(r1, r2)
    }""")
    run_pass("constant-to-initializer", model)
    result, _ = run_pass("eliminate-common-subexpressions", model)
    assert not result.changed



def test_scalar_and_one_element_constants_do_not_merge():
    # the dim read of the GQA chunk rewrite (Gather by [2], 1-D, a Slice's ends) beside the exporter's
    # own (Gather by scalar 2): merged, the Slice read a scalar ends ("Ends must be a 1-D array")
    model = model_from_text(OPSET + """
    g (float[N,3,M] x) => (int64 n, float[N,3,M] y) {
      s = Shape(x)
      i0 = Constant <value = int64 {2}> ()
      i1 = Constant <value = int64[1] {2}> ()
      i2 = Constant <value = int64 {2}> ()
      a = Gather <axis = 0> (s, i0)
      b = Gather <axis = 0> (s, i1)
      c = Gather <axis = 0> (s, i2)
      n = Add(a, c)
      start = Constant <value = int64[1] {0}> ()
      axes = Constant <value = int64[1] {2}> ()
      y = Slice(x, start, b, axes)
    }""")
    run_pass("constant-to-initializer", model)
    before = model.to_proto()
    result, _ = run_pass("eliminate-common-subexpressions", model)
    assert result.stats == {"merged_node": 1}  # the two scalar reads only
    assert histogram(model)["Gather"] == 2
    for m in (2, 5):
        assert_parity(before, model, {"x": np.arange(2 * 3 * m, dtype=np.float32).reshape(2, 3, m)})

def test_duplicate_that_is_a_graph_output_stays():
    model = model_from_text(OPSET + """
    g (float[1,3] x) => (float[1,3] y, float[1,3] z) {
      y = Relu(x)
      z = Relu(x)
    }""")
    before = model.to_proto()
    result, ctx = run_pass("eliminate-common-subexpressions", model)
    assert not result.changed
    assert "the duplicate's output is a graph output" in refusal_reasons(ctx)
    assert_parity(before, model, X)


def test_if_nodes_are_not_compared():
    model = model_from_text(OPSET + """
    g (float[1,3] x, bool c) => (float[1,3] y) {
      a = If(c) <then_branch = g1 () => (float[1,3] t) { t = Neg(x) }, else_branch = g2 () => (float[1,3] e) { e = Relu(x) }>
      b = If(c) <then_branch = g3 () => (float[1,3] t2) { t2 = Neg(x) }, else_branch = g4 () => (float[1,3] e2) { e2 = Relu(x) }>
      y = Add(a, b)
    }""")
    result, _ = run_pass("eliminate-common-subexpressions", model)
    assert histogram(model)["If"] == 2 and not result.changed
