import numpy as np

from cleanup_support import assert_parity, histogram, model_from_text, run_pass

OPSET = '<ir_version: 8, opset_import: ["" : 17]>'


def test_dead_nodes_and_constants_removed_interface_kept():
    model = model_from_text(OPSET + """
    g (float[2] x, float[2] unused) => (float[2] y) <float[2] k = {1.0, 2.0}> {
      dead = Mul(x, k)
      dead2 = Relu(dead)
      y = Neg(x)
    }""")
    before = model.to_proto()
    result, _ = run_pass("eliminate-dead-code", model)
    assert result.stats == {"removed_node": 2, "removed_initializer": 1}
    assert histogram(model) == {"Neg": 1}
    assert [t.name for t in model.graph.inputs] == ["x", "unused"]
    assert_parity(before, model, {"x": np.array([1.0, -1.0], np.float32), "unused": np.zeros(2, np.float32)})


def test_outer_tensor_read_only_inside_if_survives():
    model = model_from_text(OPSET + """
    g (float[2] x, bool c) => (float[2] y) {
      h = Relu(x)
      only_inside = Exp(x)
      y = If(c) <then_branch = g1 () => (float[2] t) { dead = Sin(h) t = Mul(only_inside, h) },
                 else_branch = g2 () => (float[2] e) { e = Neg(h) }>
    }""")
    before = model.to_proto()
    result, _ = run_pass("eliminate-dead-code", model)
    assert result.stats == {"removed_node": 1}  # only the Sin inside the branch
    assert histogram(model) == {"Relu": 1, "Exp": 1, "If": 1, "Mul": 1, "Neg": 1}
    for c in (True, False):
        assert_parity(before, model, {"x": np.array([1.0, -1.0], np.float32), "c": np.array(c)})
