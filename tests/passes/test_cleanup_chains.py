import numpy as np
import pytest

from cleanup_support import assert_parity, histogram, model_from_text, refusal_reasons, run_pass

OPSET = '<ir_version: 8, opset_import: ["" : 17]>'
X = {"x": np.linspace(-3, 3, 24, dtype=np.float32).reshape(2, 3, 4)}


def collapsed(text: str):
    model = model_from_text(OPSET + text)
    run_pass("constant-to-initializer", model)
    before = model.to_proto()
    result, ctx = run_pass("collapse-chains", model)
    return model, before, result, ctx


def test_transpose_pairs_compose_or_cancel():
    model, before, result, _ = collapsed("""
    g (float[2,3,4] x) => (float[4,3,2] y, float[2,3,4] z) {
      a = Transpose <perm = [1, 2, 0]> (x)
      b = Transpose <perm = [1, 0, 2]> (a)
      y = Neg(b)
      c = Transpose <perm = [2, 0, 1]> (x)
      d = Transpose <perm = [1, 2, 0]> (c)
      z = Neg(d)
    }""")
    assert result.stats == {"collapsed-transpose": 2}
    assert histogram(model) == {"Transpose": 1, "Neg": 2}
    transpose = next(n for n in model.graph.nodes if n.op == "Transpose")
    assert list(transpose.attrs["perm"]) == [2, 1, 0] and transpose.inputs[0].name == "x"
    assert_parity(before, model, X)


def test_reshape_pair_collapses():
    model, before, result, _ = collapsed("""
    g (float[2,3,4] x) => (float[4,6] y) {
      s1 = Constant <value = int64[2] {6, 4}> ()
      s2 = Constant <value = int64[2] {4, -1}> ()
      a = Reshape(x, s1)
      b = Reshape(a, s2)
      y = Neg(b)
    }""")
    assert result.stats == {"collapsed-reshape": 1}
    assert histogram(model) == {"Reshape": 1, "Neg": 1}
    assert_parity(before, model, X)


@pytest.mark.parametrize(
    "second, outputs, extra, reason",
    [
        ("{0, 4}", "float[6,4] y", "", "the second shape copies dims (0) from the middle tensor"),
        ("{4, -1}", "float[4,6] y, float[6,4] w", "w = Neg(a)", "the middle tensor has other readers"),
    ],
)
def test_reshape_pair_kept(second, outputs, extra, reason):
    model, _, result, ctx = collapsed(f"""
    g (float[2,3,4] x) => ({outputs}) {{
      s1 = Constant <value = int64[2] {{6, 4}}> ()
      s2 = Constant <value = int64[2] {second}> ()
      a = Reshape(x, s1)
      b = Reshape(a, s2)
      y = Neg(b)
      {extra}
    }}""")
    assert not result.changed
    assert reason in refusal_reasons(ctx)


def test_exact_cast_round_trips_removed():
    model, before, result, _ = collapsed("""
    g (float[2,3,4] x, int32[3] i) => (float[2,3,4] y, int32[3] j, double[3] k) {
      a = Cast <to = 11> (x)
      b = Cast <to = 1> (a)
      y = Neg(b)
      c = Cast <to = 7> (i)
      d = Cast <to = 6> (c)
      j = Neg(d)
      e = Cast <to = 11> (c)
      k = Neg(e)
    }""")
    # f32->f64->f32 and i32->i64->i32 vanish; i32->i64->f64 becomes i32->f64 directly.
    assert result.stats == {"collapsed-cast": 3}
    assert histogram(model) == {"Cast": 1, "Neg": 3}
    feeds = {**X, "i": np.array([-(2**31), 5, 2**31 - 1], np.int32)}
    assert_parity(before, model, feeds)


def test_narrowing_cast_chain_kept():
    model, _, result, ctx = collapsed("""
    g (float[2,3,4] x) => (float[2,3,4] y) {
      a = Cast <to = 10> (x)
      b = Cast <to = 1> (a)
      y = Neg(b)
    }""")
    assert not result.changed
    assert "the first Cast is not an exact widening" in refusal_reasons(ctx)


def test_squeeze_unsqueeze_pairs_cancel():
    model, before, result, _ = collapsed("""
    g (float[2,3,4] x) => (float[2,3,4] y, float[2,3,4] z) {
      ax = Constant <value = int64[1] {1}> ()
      a = Unsqueeze(x, ax)
      b = Squeeze(a, ax)
      y = Neg(b)
      neg = Constant <value = int64[1] {-1}> ()
      c = Unsqueeze(x, neg)
      d = Squeeze(c, neg)
      z = Neg(d)
    }""")
    assert result.stats == {"cancelled-squeeze-pair": 2}
    assert histogram(model) == {"Neg": 2}
    assert_parity(before, model, X)
