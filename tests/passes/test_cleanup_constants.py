import numpy as np

from cleanup_support import assert_parity, histogram, model_from_text, refusal_reasons, run_pass

OPSET = '<ir_version: 8, opset_import: ["" : 17]>'


def test_constant_nodes_become_initializers():
    model = model_from_text(OPSET + """
    g (float[2,3] x) => (float[3,2] y) {
      a = Constant <value = float[3] {1.0, 2.0, 3.0}> ()
      b = Constant <value_float = 2.0> ()
      s = Constant <value_ints = [3, 2]> ()
      t = Add(x, a)
      u = Mul(t, b)
      y = Reshape(u, s)
    }""")
    before = model.to_proto()
    result, _ = run_pass("constant-to-initializer", model)
    assert result.stats == {"constant-to-initializer": 3}
    assert histogram(model) == {"Add": 1, "Mul": 1, "Reshape": 1}
    proto = model.to_proto()
    assert sorted(i.name for i in proto.graph.initializer) == ["a", "b", "s"]
    assert_parity(before, model, {"x": np.arange(6, dtype=np.float32).reshape(2, 3)})


def test_constant_in_subgraph_stays_in_subgraph():
    model = model_from_text(OPSET + """
    g (float[2] x, bool c) => (float[2] y) {
      y = If(c) <then_branch = g1 () => (float[2] t) { k = Constant <value = float[2] {1.0, 2.0}> () t = Mul(x, k) },
                 else_branch = g2 () => (float[2] e) { kk = Constant <value_float = 3.0> () e = Sub(x, kk) }>
    }""")
    before = model.to_proto()
    result, _ = run_pass("constant-to-initializer", model)
    assert result.stats == {"constant-to-initializer": 2}
    proto = model.to_proto()
    assert not proto.graph.initializer
    branches = {a.name: a.g for a in proto.graph.node[0].attribute}
    assert [i.name for i in branches["then_branch"].initializer] == ["k"]
    assert [i.name for i in branches["else_branch"].initializer] == ["kk"]
    for c in (True, False):
        assert_parity(before, model, {"x": np.array([1.0, -2.0], np.float32), "c": np.array(c)})


def test_constant_that_is_a_graph_output_stays():
    model = model_from_text(OPSET + """
    g (float[2] x) => (float[2] y, float[2] k) {
      k = Constant <value = float[2] {1.0, 2.0}> ()
      y = Add(x, k)
    }""")
    result, ctx = run_pass("constant-to-initializer", model)
    assert not result.changed
    assert histogram(model)["Constant"] == 1
    assert "its output is a graph output" in refusal_reasons(ctx)


def test_large_constant_read_by_two_scopes_stays():
    values = ", ".join(["1.0"] * 512)  # 2 KiB: too large to copy into the branch
    model = model_from_text(OPSET + f"""
    g (float[512] x, bool c) => (float[512] y) {{
      k = Constant <value = float[512] {{{values}}}> ()
      a = Add(x, k)
      y = If(c) <then_branch = g1 () => (float[512] t) {{ t = Mul(a, k) }},
                 else_branch = g2 () => (float[512] e) {{ e = Identity(a) }}>
    }}""")
    result, ctx = run_pass("constant-to-initializer", model)
    assert not result.changed
    assert any("other (sub)graphs" in r for r in refusal_reasons(ctx))
