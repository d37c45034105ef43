"""simplify-shapes: shape arithmetic over dynamic dims folds without pinning a dim."""
import numpy as np
import pytest

from cleanup_support import assert_parity, histogram, model_from_text, refusal_reasons, run_pass

OPSET = '<ir_version: 8, opset_import: ["" : 17]>'


def simplified(text: str):
    model = model_from_text(OPSET + text)
    run_pass("constant-to-initializer", model)
    before = model.to_proto()
    result, ctx = run_pass("simplify-shapes", model)
    return model, before, result, ctx


def feeds(*shapes, name="x"):
    return [{name: np.arange(np.prod(s), dtype=np.float32).reshape(s) / 7} for s in shapes]


def output_dims(model):
    proto = model.to_proto()
    return [[d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in proto.graph.output]


# A PaddlePaddle flatten: Reshape(x, Concat(Shape(x)[0:1], [-1])) over a dynamic batch.
FLATTEN = """
g (float[N,8,1,1] x) => (float[N,8] y) {
  s = Shape(x)
  b = Slice(s, starts, ends)
  t = Concat <axis = 0> (b, minus1)
  y = Reshape(x, t)
}"""
CONSTS = """
  starts = Constant <value = int64[1] {0}> ()
  ends = Constant <value = int64[1] {1}> ()
  minus1 = Constant <value = int64[1] {-1}> ()
"""


def with_consts(body: str) -> str:
    head, rest = body.split("{", 1)
    return head + "{" + CONSTS + rest


def test_reshape_target_from_own_dims_becomes_a_constant():
    model, before, result, _ = simplified(with_consts(FLATTEN))
    assert result.stats == {"reshape-copies-own-dims": 1}
    assert histogram(model) == {"Reshape": 1}
    reshape = model.graph.nodes[0]
    assert reshape.inputs[1].values.tolist() == [0, -1]
    assert output_dims(model) == [["N", 8]]  # the batch dim stays dynamic
    for feed in feeds((1, 8, 1, 1), (3, 8, 1, 1)):
        assert_parity(before, model, feed)


def test_gathered_dims_at_their_own_positions_fold():
    model, before, result, _ = simplified("""
    g (float[N,T,6] x) => (float[N,T,2,3] y) {
      s = Shape(x)
      i0 = Constant <value = int64 {0}> ()
      i1 = Constant <value = int64 {1}> ()
      ax = Constant <value = int64[1] {0}> ()
      tail = Constant <value = int64[2] {2, 3}> ()
      n = Gather(s, i0)
      t = Gather(s, i1)
      nu = Unsqueeze(n, ax)
      tu = Unsqueeze(t, ax)
      target = Concat <axis = 0> (nu, tu, tail)
      y = Reshape(x, target)
    }""")
    assert result.stats == {"reshape-copies-own-dims": 1}
    assert histogram(model) == {"Reshape": 1}
    assert model.graph.nodes[0].inputs[1].values.tolist() == [0, 0, 2, 3]
    for feed in feeds((1, 5, 6), (4, 2, 6)):
        assert_parity(before, model, feed)


@pytest.mark.parametrize("body, reason", [
    (FLATTEN.replace("Reshape(x, t)", "Reshape <allowzero = 1> (x, t)"),
     "allowzero=1: a 0 entry would be a literal zero, not a copied dim"),
    (FLATTEN.replace("(float[N,8,1,1] x)", "(float[N,8,1,1] x, int64[1] d)").replace("Concat <axis = 0> (b, minus1)",
                                                                                    "Concat <axis = 0> (d, minus1)"),
     "a piece of the target shape is computed from tensor values (depends on data)"),
    (FLATTEN.replace("(float[N,8,1,1] x)", "(float[N,8,1,1] x, float[N,4] z)").replace("Shape(x)", "Shape(z)"),
     "a piece of the target shape reads another tensor's shape"),
    (FLATTEN.replace("Concat <axis = 0> (b, minus1)", "Concat <axis = 0> (minus1, b)").replace(
        "float[N,8] y", "float[8,N] y"),
     "a piece of the target shape moves a dim to another position"),
])
def test_reshape_target_kept(body, reason):
    model, _, result, ctx = simplified(with_consts(body))
    assert "reshape-copies-own-dims" not in result.stats
    assert reason in refusal_reasons(ctx)
    assert histogram(model)["Concat"] == 1


# magika (tf2onnx): the batch dim read from another input's shape as int32, the target cast back to int64.
OTHER_BATCH = """
g (float[N,8] x, int32[N,4] z) => (float[N,2,4] y) {
  s = Shape(z)
  s32 = Cast <to = 6> (s)
  b = Slice(s32, starts, ends)
  two = Constant <value = int32[1] {2}> ()
  four = Constant <value = int32[1] {4}> ()
  t32 = Concat <axis = 0> (b, two, four)
  t = Cast <to = 7> (t32)
  y = Reshape(x, t)
}"""


def test_reshape_target_with_one_dim_not_a_constant_infers_it():
    model, before, result, _ = simplified(with_consts(OTHER_BATCH))
    assert result.stats == {"reshape-infers-one-dim": 1}
    assert histogram(model) == {"Reshape": 1}
    assert model.graph.nodes[0].inputs[1].values.tolist() == [-1, 2, 4]
    assert output_dims(model) == [["N", 2, 4]]
    for n in (1, 3):
        assert_parity(before, model, {"x": np.arange(n * 8, dtype=np.float32).reshape(n, 8),
                                      "z": np.zeros((n, 4), np.int32)})


def test_reshape_target_entry_from_data_is_inferred():
    model, before, result, _ = simplified("""
    g (float[N,6] x, int64[1] d) => (float[M,3] y) {
      three = Constant <value = int64[1] {3}> ()
      t = Concat <axis = 0> (d, three)
      y = Reshape(x, t)
    }""")
    assert result.stats == {"reshape-infers-one-dim": 1}
    for n in (1, 4):
        assert_parity(before, model, {"x": np.ones((n, 6), np.float32), "d": np.array([2 * n], np.int64)})


@pytest.mark.parametrize("target, out, reason", [
    ("Concat <axis = 0> (d, d)", "M,K", "more than one entry of the target shape is not a constant"),
    ("Concat <axis = 0> (d2, three)", "M,K,3", "the entry that is not a constant is not one dim"),
    ("Concat <axis = 0> (d, zero, three)", "M,K,3", "a constant entry of the target is 0 or negative (a -1 would not be unique)"),
])
def test_reshape_target_not_inferred(target, out, reason):
    model, _, result, ctx = simplified(f"""
    g (float[N,6] x, int64[1] d, int64[2] d2) => (float[{out}] y) {{
      three = Constant <value = int64[1] {{3}}> ()
      zero = Constant <value = int64[1] {{0}}> ()
      t = {target}
      y = Reshape(x, t)
    }}""")
    assert "reshape-infers-one-dim" not in result.stats
    assert reason in refusal_reasons(ctx)
    assert histogram(model)["Concat"] == 1


def test_nested_concat_flattens():
    model, before, result, _ = simplified("""
    g (float[2,N] a, float[3,N] b, float[4,N] c) => (float[9,N] y) {
      ab = Concat <axis = 0> (a, b)
      y = Concat <axis = -2> (ab, c)
    }""")
    assert result.stats == {"flatten-nested-concat": 1}
    assert histogram(model) == {"Concat": 1}
    assert [t.name for t in model.graph.nodes[0].inputs] == ["a", "b", "c"]
    for n in (1, 5):
        rng = np.random.default_rng(n)
        assert_parity(before, model, {k: rng.standard_normal((r, n)).astype(np.float32)
                                      for k, r in (("a", 2), ("b", 3), ("c", 4))})


def test_nested_concat_read_elsewhere_is_kept():
    model, _, result, ctx = simplified("""
    g (float[2,N] a, float[3,N] b, float[4,N] c) => (float[9,N] y, float[5,N] z) {
      ab = Concat <axis = 0> (a, b)
      y = Concat <axis = 0> (ab, c)
      z = Neg(ab)
    }""")
    assert not result.changed
    assert "the inner Concat has other readers (flattening would save nothing)" in refusal_reasons(ctx)


EXPAND = """
g (float[N,T] x, float[1,1,4] v) => (float[N,T,4] y) {
  s = Shape(x)
  i0 = Constant <value = int64 {0}> ()
  i1 = Constant <value = int64 {1}> ()
  ax = Constant <value = int64[1] {0}> ()
  four = Constant <value = int64[1] {4}> ()
  n = Gather(s, i0)
  t = Gather(s, i1)
  nu = Unsqueeze(n, ax)
  tu = Unsqueeze(t, ax)
  target = Concat <axis = 0> (nu, tu, four)
  y = Expand(v, target)
  EXTRA
}"""


def test_consecutive_dims_of_one_shape_become_one_shape_node():
    model, before, result, _ = simplified(EXPAND.replace("EXTRA", ""))
    assert result.stats == {"merge-shape-pieces": 1}
    assert histogram(model) == {"Shape": 1, "Concat": 1, "Expand": 1}
    shape = next(n for n in model.graph.nodes if n.op == "Shape")
    assert (shape.attrs["start"], shape.attrs["end"]) == (0, 2)
    rng = np.random.default_rng(0)
    v = rng.standard_normal((1, 1, 4)).astype(np.float32)
    for s in ((1, 3), (2, 5)):
        assert_parity(before, model, {"x": np.zeros(s, np.float32), "v": v})
    assert output_dims(model) == [["N", "T", 4]]


def test_shape_pieces_read_elsewhere_are_not_merged():
    model, _, result, ctx = simplified(EXPAND.replace("EXTRA", "").replace(
        "(float[N,T,4] y)", "(float[N,T,4] y, int64[1] w)").replace("  y = Expand", "  w = Neg(tu)\n  y = Expand"))
    assert not result.changed
    assert "a piece of the shape is read elsewhere too (merging would add a node)" in refusal_reasons(ctx)


# tf2onnx's LSTM initial state: zeros of [1, batch, hidden] with the batch read from X.
LSTM = """
g (float[T,N,2] x) => (float[T,1,N,3] y) {
  s = Shape(x)
  b0 = Constant <value = int64[1] {1}> ()
  b1 = Constant <value = int64[1] {2}> ()
  n = Slice(s, b0, b1)
  one = Constant <value = int64[1] {1}> ()
  hid = Constant <value = int64[1] {3}> ()
  dims = Concat <axis = 0> (one, n, hid)
  h0 = ConstantOfShape <value = float[1] {FILL}> (dims)
  w = Constant <value = float[1,12,2] {W}> ()
  r = Constant <value = float[1,12,3] {R}> ()
  y, yh, yc = LSTM <hidden_size = 3> (x, w, r, , , h0, h0)
}"""


def lstm_text(fill: str) -> str:
    w = ", ".join(f"{v:.3f}" for v in np.linspace(-0.5, 0.5, 24))
    r = ", ".join(f"{v:.3f}" for v in np.linspace(0.4, -0.4, 36))
    return LSTM.replace("FILL", fill).replace("{W}", "{" + w + "}").replace("{R}", "{" + r + "}")


def lstm_feeds():
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((4, n, 2)).astype(np.float32)} for n in (1, 3)]


def test_zero_initial_lstm_state_is_dropped_with_its_shape_chain():
    model, before, result, _ = simplified(lstm_text("0.0"))
    assert result.stats == {"zero-initial-state-dropped": 1}
    assert histogram(model) == {"LSTM": 1}
    for feed in lstm_feeds():
        assert_parity(before, model, feed, rtol=1e-6, atol=1e-7)


def test_nonzero_initial_lstm_state_is_kept():
    model, _, result, ctx = simplified(lstm_text("0.5"))
    assert "zero-initial-state-dropped" not in result.stats
    assert "the initial state is not zero (not the default)" in refusal_reasons(ctx)
    assert histogram(model)["ConstantOfShape"] == 1


def test_lstm_state_from_data_is_kept():
    text = lstm_text("0.0").replace("(float[T,N,2] x)", "(float[T,N,2] x, float[1,N,3] h)").replace(
        "(x, w, r, , , h0, h0)", "(x, w, r, , , h, h)")
    model, _, result, ctx = simplified(text)
    assert "zero-initial-state-dropped" not in result.stats
    assert "the initial state is computed from tensor values (depends on data)" in refusal_reasons(ctx)
