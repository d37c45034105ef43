import numpy as np
import pytest

from cleanup_support import assert_parity, histogram, model_from_text, refusal_reasons, run_pass

OPSET = '<ir_version: 8, opset_import: ["" : 17]>'


def feeds(batch=2):
    return {"x": np.linspace(-1, 1, batch * 12, dtype=np.float32).reshape(batch, 3, 4)}


def test_noops_removed_with_dynamic_batch():
    model = model_from_text(OPSET + """
    g (float[N,3,4] x) => (float[N,3,4] y) {
      s = Constant <value = int64[3] {0, 3, -1}> ()
      a = Reshape(x, s)
      b = Cast <to = 1> (a)
      c = Transpose <perm = [0, 1, 2]> (b)
      p = Constant <value = int64[6] {0, 0, 0, 0, 0, 0}> ()
      d = Pad(c, p)
      e1 = Constant <value = int64[2] {1, 4}> ()
      e = Expand(d, e1)
      st = Constant <value = int64[2] {0, 0}> ()
      en = Constant <value = int64[2] {9223372036854775807, 4}> ()
      ax = Constant <value = int64[2] {0, 2}> ()
      f = Slice(e, st, en, ax)
      h = Concat <axis = 0> (f)
      one = Constant <value = float[1,4] {1.0, 1.0, 1.0, 1.0}> ()
      i = Mul(one, h)
      zero = Constant <value = float {0.0}> ()
      j = Sub(i, zero)
      nz = Constant <value = float {-0.0}> ()
      k = Add(j, nz)
      y = Div(k, one)
    }""")
    run_pass("constant-to-initializer", model)
    before = model.to_proto()
    result, ctx = run_pass("eliminate-noop", model)
    assert result.stats == {
        "removed-reshape": 1, "removed-cast": 1, "removed-transpose": 1, "removed-pad": 1, "removed-expand": 1,
        "removed-slice": 1, "removed-concat": 1, "removed-neutral-arithmetic": 3,
    }
    # Removing the last Div too would make y the graph input x: the interface keeps it.
    assert histogram(model) == {"Div": 1}
    assert "graph output name kept: the input is itself a graph input or output" in refusal_reasons(ctx)
    assert_parity(before, model, feeds(2))
    assert_parity(before, model, feeds(5))


def test_add_positive_zero_is_kept_for_floats():
    model = model_from_text(OPSET + """
    g (float[3] x) => (float[3] y) {
      zero = Constant <value = float {0.0}> ()
      a = Add(x, zero)
      y = Neg(a)
    }""")
    run_pass("constant-to-initializer", model)
    result, ctx = run_pass("eliminate-noop", model)
    assert not result.changed
    assert any("-0.0" in r for r in refusal_reasons(ctx))
    # Why: -0.0 + 0.0 is +0.0, so Neg gives -0.0 where Neg(x) gives +0.0.
    out = model.to_proto()
    from cleanup_support import session

    got = session(out).run(None, {"x": np.array([-0.0, 1.0, 2.0], np.float32)})[0]
    assert np.signbit(got[0])


def test_integer_add_zero_removed():
    model = model_from_text(OPSET + """
    g (int64[3] x) => (int64[3] y) {
      zero = Constant <value = int64 {0}> ()
      a = Add(zero, x)
      y = Neg(a)
    }""")
    run_pass("constant-to-initializer", model)
    before = model.to_proto()
    result, _ = run_pass("eliminate-noop", model)
    assert result.stats == {"removed-neutral-arithmetic": 1}
    assert_parity(before, model, {"x": np.array([-3, 0, 7], np.int64)})


@pytest.mark.parametrize(
    "body, out_type, reason",
    [
        ("one = Constant <value = float[2,3] {1.0, 1.0, 1.0, 1.0, 1.0, 1.0}> ()\n a = Mul(x, one)",
         "float[?,?]", "broadcasting adds dimensions"),
        ("s = Constant <value = int64[1] {3}> ()\n a = Expand(x, s)", "float[?]", "broadcasting may enlarge the input"),
        ("a = Cast <to = 11> (x)", "double[?]", "changes the type"),
        ("s = Constant <value = int64[1] {1}> ()\n e = Constant <value = int64[1] {100}> ()\n a = Slice(x, s, e)",
         "float[?]", "a start is not the beginning of its axis"),
        ("s = Constant <value = int64[1] {0}> ()\n e = Constant <value = int64[1] {2}> ()\n a = Slice(x, s, e)",
         "float[?]", "an end is not provably past its axis"),
    ],
)
def test_noop_candidates_that_change_something_stay(body, out_type, reason):
    model = model_from_text(OPSET + f"""
    g (float[N] x) => ({out_type} y) {{
      {body}
      y = Neg(a)
    }}""")
    run_pass("constant-to-initializer", model)
    result, ctx = run_pass("eliminate-noop", model)
    assert not result.changed
    assert reason in refusal_reasons(ctx)
