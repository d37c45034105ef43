import numpy as np

from cleanup_support import assert_parity, histogram, model_from_text, refusal_reasons, run_pass

OPSET = '<ir_version: 8, opset_import: ["" : 17]>'
X = {"x": np.array([[1.0, -2.0, 3.0]], np.float32)}


def test_identity_and_dropout_removed():
    model = model_from_text(OPSET + """
    g (float[1,3] x) => (float[1,3] y) {
      a = Identity(x)
      b = Relu(a)
      c = Identity(b)
      d = Dropout(c)
      y = Neg(d)
    }""")
    before = model.to_proto()
    result, _ = run_pass("eliminate-identity", model)
    assert result.stats == {"removed-identity": 2, "removed-dropout": 1}
    assert histogram(model) == {"Relu": 1, "Neg": 1}
    assert_parity(before, model, X)


def test_graph_output_name_is_kept():
    model = model_from_text(OPSET + """
    g (float[1,3] x) => (float[1,3] y, float[1,3] z) {
      h = Relu(x)
      y = Identity(h)
      z = Identity(x)
    }""")
    before = model.to_proto()
    result, ctx = run_pass("eliminate-identity", model)
    assert result.stats == {"removed-identity": 1}
    # y: Relu now writes y directly; z reads a graph input, so its Identity stays.
    assert histogram(model) == {"Relu": 1, "Identity": 1}
    relu = next(n for n in model.graph.nodes if n.op == "Relu")
    assert relu.outputs[0].name == "y"
    assert any("graph input or output" in r for r in refusal_reasons(ctx))
    assert_parity(before, model, X)


def test_dropout_that_may_drop_or_whose_mask_is_used_stays():
    model = model_from_text(OPSET + """
    g (float[1,3] x) => (float[1,3] y, bool[1,3] m) {
      r = Constant <value = float {0.5}> ()
      t = Constant <value = bool {1}> ()
      a = Dropout(x, r, t)
      y, m = Dropout(a)
    }""")
    result, ctx = run_pass("eliminate-identity", model)
    assert not result.changed
    reasons = refusal_reasons(ctx)
    assert "its mask output is used" in reasons
    assert any("training_mode" in r for r in reasons)


def test_identity_inside_if_branch():
    model = model_from_text(OPSET + """
    g (float[1,3] x, bool c) => (float[1,3] y) {
      h = Relu(x)
      y = If(c) <then_branch = g1 () => (float[1,3] t) { u = Identity(h) t = Neg(u) },
                 else_branch = g2 () => (float[1,3] e) { e = Identity(h) }>
    }""")
    before = model.to_proto()
    result, ctx = run_pass("eliminate-identity", model)
    # The else branch's Identity forwards an outer tensor as the branch output: it stays.
    assert result.stats == {"removed-identity": 1}
    assert histogram(model) == {"Relu": 1, "If": 1, "Neg": 1, "Identity": 1}
    assert any("another scope" in r for r in refusal_reasons(ctx))
    for c in (True, False):
        assert_parity(before, model, {**X, "c": np.array(c)})
