"""sink-transposes: NHWC round trips around elementwise ops cancel (with collapse-chains)."""
import numpy as np

from cleanup_support import assert_parity, histogram, model_from_text, refusal_reasons, run_pass

OPSET = '<ir_version: 8, opset_import: ["" : 17]>'


def sunk(text: str):
    model = model_from_text(OPSET + text)
    run_pass("constant-to-initializer", model)
    before = model.to_proto()
    # The pipeline runs passes to a fixpoint; a Transpose moves one op per run.
    stats, reasons = {}, []
    for _ in range(4):
        result, ctx = run_pass("sink-transposes", model)
        for key, value in result.stats.items():
            stats[key] = stats.get(key, 0) + value
        reasons += refusal_reasons(ctx)
    run_pass("collapse-chains", model)
    return model, before, stats, reasons


def images(*batches, names=("x",)):
    rng = np.random.default_rng(0)
    return [{n: rng.standard_normal((b, 3, 4, 5)).astype(np.float32) for n in names} for b in batches]


NHWC_RELU = """
g (float[N,3,4,5] x) => (float[N,3,4,5] y) {
  a = Transpose <perm = [0, 2, 3, 1]> (x)
  r = Relu(a)
  lo = Constant <value = float {0.0}> ()
  hi = Constant <value = float {6.0}> ()
  c = Clip(r, lo, hi)
  y = Transpose <perm = [0, 3, 1, 2]> (c)
}"""


def test_transpose_round_trip_around_elementwise_ops_cancels():
    model, before, result, _ = sunk(NHWC_RELU)
    assert result == {"transpose-past-elementwise": 2}
    assert histogram(model) == {"Relu": 1, "Clip": 1}
    for feed in images(1, 3):
        assert_parity(before, model, feed)


def test_same_transpose_on_both_operands_moves_past_the_binary_op():
    model, before, result, _ = sunk("""
    g (float[N,3,4,5] x, float[N,3,4,5] z) => (float[N,3,4,5] y) {
      a = Transpose <perm = [0, 2, 3, 1]> (x)
      b = Transpose <perm = [0, 2, 3, 1]> (z)
      s = Add(a, b)
      y = Transpose <perm = [0, 3, 1, 2]> (s)
    }""")
    assert result == {"transpose-pair-past-binary": 1}
    assert histogram(model) == {"Add": 1}
    for feed in images(1, 2, names=("x", "z")):
        assert_parity(before, model, feed)


def test_transposed_tensor_read_elsewhere_is_kept():
    model, before, result, ctx = sunk(NHWC_RELU.replace("(float[N,3,4,5] y)", "(float[N,3,4,5] y, float[N,4,5,3] w)")
                                      .replace("  r = Relu(a)", "  r = Relu(a)\n  w = Neg(a)"))
    assert "the transposed tensor has other readers" in ctx
    assert histogram(model)["Transpose"] >= 2
    for feed in images(1, 3):
        assert_parity(before, model, feed)


def test_operands_of_different_rank_are_not_moved():
    model, before, result, ctx = sunk("""
    g (float[N,3,4,5] x, float[3,4,5] z) => (float[N,3,4,5] y) {
      a = Transpose <perm = [0, 2, 3, 1]> (x)
      b = Transpose <perm = [1, 2, 0]> (z)
      s = Add(a, b)
      y = Transpose <perm = [0, 3, 1, 2]> (s)
    }""")
    assert "transpose-pair-past-binary" not in result
    for feed in images(1, 2, names=("x",)):
        feed["z"] = np.ones((3, 4, 5), np.float32)
        assert_parity(before, model, feed)
